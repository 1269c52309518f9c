"""The MLP: shapes, logits, configurable hidden sizes, and the safetensors round trip."""

from __future__ import annotations

import pytest
import torch

from mnist_flow.errors import ConfigError
from mnist_flow.training.model import MLP, ensemble_mlp, multiply_adds_per_sample


def test_the_default_mlp_is_the_seed_architecture_and_returns_logits():
    model = MLP()
    assert model.hidden == (500, 256)
    assert sum(p.numel() for p in model.parameters()) == 784 * 500 + 500 + 500 * 256 + 256 + 256 * 10 + 10
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    # Logits, not log-probabilities: rows do not sum to 1 after exp.
    assert not torch.allclose(out.exp().sum(dim=1), torch.ones(3), atol=1e-3)


def test_hidden_sizes_are_configurable_and_bad_ones_refused():
    assert [m.out_features for m in MLP((64, 32, 16)).modules() if isinstance(m, torch.nn.Linear)] == [64, 32, 16, 10]
    with pytest.raises(ConfigError, match="Hidden sizes"):
        MLP((64, 0))
    with pytest.raises(ConfigError):
        MLP(())


def test_safetensors_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    model = MLP((32, 16))
    x = torch.rand(5, 784)
    clone = MLP.from_safetensors(model.to_safetensors(), model.architecture())
    assert torch.equal(model(x), clone(x))
    assert clone.architecture() == {"type": "mlp", "in_features": 784, "hidden": [32, 16], "num_classes": 10}


def test_multiply_adds_count_every_layer():
    assert multiply_adds_per_sample((500, 256)) == 784 * 500 + 500 * 256 + 256 * 10


def test_unknown_model_type_in_a_sidecar_is_a_config_error_with_a_fix():
    data = MLP((8,)).to_safetensors()
    with pytest.raises(ConfigError, match="Unknown model type 'cnn'") as caught:
        MLP.from_safetensors(data, {"type": "cnn", "hidden": [8]})
    assert caught.value.fix and "register the model again" in caught.value.fix


@pytest.mark.parametrize("hidden", [(48,), (40, 24), (32, 16, 8)], ids=["one", "two", "three"])
def test_the_ensemble_mlp_returns_the_mean_of_its_models_logits(hidden):
    torch.manual_seed(0)
    models = [MLP(hidden) for _ in range(3)]
    x = torch.rand(16, 1, 28, 28)
    merged = ensemble_mlp(models)
    assert merged.hidden == tuple(3 * h for h in hidden)
    expected = torch.stack([m(x) for m in models]).mean(dim=0)
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    # the plain MLP it is: it goes through the artifact format unchanged
    again = MLP.from_safetensors(merged.to_safetensors(), merged.architecture())
    assert torch.equal(again(x), merged(x))
    assert torch.equal(ensemble_mlp(models[:1])(x), models[0].eval()(x))


def test_models_of_different_depths_make_no_ensemble():
    with pytest.raises(ValueError, match="depth"):
        ensemble_mlp([MLP((32, 16)), MLP((32,))])
    with pytest.raises(ValueError):
        ensemble_mlp([])
