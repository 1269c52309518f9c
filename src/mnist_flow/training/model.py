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


def ensemble_mlp(models: Sequence[MLP]) -> MLP:
    """One MLP whose logits are the mean of ``models``' logits: the models side by side, exactly.

    The models must share their input, output and depth (e.g. fits of one configuration with other seeds).
    Layer by layer: the first layers' weights stacked (each model's units see the same input), every
    hidden layer after it block-diagonal (each model's units see only its own), and the output layer the
    models' output layers side by side, divided by their number, with the mean of their biases. The hidden
    widths add up; what serves and stores an MLP serves and stores it unchanged.
    """
    if not models:
        raise ValueError("no models to put together")
    first = models[0]
    shape = (first.in_features, len(first.hidden), first.num_classes)
    if any((m.in_features, len(m.hidden), m.num_classes) != shape for m in models):
        raise ValueError("the models differ in their inputs, outputs or depth")
    hidden = [sum(m.hidden[i] for m in models) for i in range(len(first.hidden))]
    merged = MLP(hidden, first.in_features, first.num_classes).to(next(first.parameters()).device)
    layers = [[layer for layer in m.net if isinstance(layer, nn.Linear)] for m in models]
    targets = [layer for layer in merged.net if isinstance(layer, nn.Linear)]
    last = len(targets) - 1
    with torch.no_grad():
        for i, target in enumerate(targets):
            weights: list[torch.Tensor] = [m[i].weight for m in layers]
            biases: list[torch.Tensor] = [m[i].bias for m in layers]
            if i == last:
                target.weight.copy_(torch.cat(weights, dim=1) / len(models))
                target.bias.copy_(torch.stack(biases).mean(dim=0))
            else:
                target.weight.copy_(torch.cat(weights, dim=0) if i == 0 else torch.block_diag(*weights))
                target.bias.copy_(torch.cat(biases))
    return merged.eval()
