"""The multilayer perceptron, and how it turns into bytes and back (safetensors, never pickle)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from mnist_flow.errors import ConfigError

IMAGE_SIZE = 28
IN_FEATURES = IMAGE_SIZE * IMAGE_SIZE
NUM_CLASSES = 10


class MLP(nn.Module):
    """784 -> hidden... -> 10 with ReLU; returns logits (the loss applies the softmax once)."""

    def __init__(
        self, hidden: Sequence[int] = (500, 256), in_features: int = IN_FEATURES, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if not hidden or any(h < 1 for h in hidden):
            raise ConfigError(
                f"Hidden sizes must be one or more integers >= 1, got {list(hidden)}.",
                fix="Pass e.g. --hidden 500,256.",
            )
        self.hidden = hidden
        self.in_features = in_features
        self.num_classes = num_classes
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))

    def architecture(self) -> dict[str, Any]:
        """What it takes to rebuild this model: stored in the artifact's sidecar."""
        return {
            "type": "mlp",
            "in_features": self.in_features,
            "hidden": list(self.hidden),
            "num_classes": self.num_classes,
        }

    def to_safetensors(self) -> bytes:
        """The weights as safetensors bytes (contiguous CPU tensors)."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        return save_safetensors(state)

    @classmethod
    def from_safetensors(cls, data: bytes, architecture: dict[str, Any]) -> MLP:
        """Rebuild a model from its sidecar architecture and safetensors weights."""
        if architecture.get("type") != "mlp":
            raise ConfigError(
                f"Unknown model type {architecture.get('type')!r} in the artifact sidecar.",
                fix="Only 'mlp' artifacts can be loaded: restore the sidecar from a backup, or "
                "register the model again with this version of mnist-flow.",
            )
        model = cls(
            architecture["hidden"],
            architecture.get("in_features", IN_FEATURES),
            architecture.get("num_classes", NUM_CLASSES),
        )
        model.load_state_dict(load_safetensors(data))
        model.eval()
        return model


def multiply_adds_per_sample(
    hidden: Sequence[int], in_features: int = IN_FEATURES, num_classes: int = NUM_CLASSES
) -> int:
    """Multiply-adds of one forward pass for one sample (used for the FLOP floor)."""
    sizes = (in_features, *hidden, num_classes)
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
