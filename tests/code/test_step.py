"""The hand-written step does what autograd, autocast and torch.optim.SGD do, and its schedule is OneCycleLR's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_flow.training.model import MLP
from mnist_flow.training.step import MLPStep, constant, one_cycle

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n_batches: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 784, generator=g)
        out.append((x, x[:, :10].argmax(dim=1)))
    return out


def _twins(hidden: tuple[int, ...], seed: int = 0) -> tuple[MLP, MLP]:
    torch.manual_seed(seed)
    a = MLP(hidden)
    b = MLP(hidden)
    b.load_state_dict(a.state_dict())
    return a, b


def _reference_step(model: MLP, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    bf16: bool) -> float:
    """The textbook step the hand-written one replaces."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * x.shape[0]


@pytest.mark.parametrize("hidden", [(500, 256), (40,), (48, 32, 16)])
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.0), (0.5, 5e-4), (0.0, 0.0)])
def test_fp32_steps_match_autograd_and_torch_sgd(hidden, momentum, weight_decay):
    ours, ref = _twins(hidden)
    lrs = [0.05, 0.02, 0.08, 0.01, 0.03]  # a changing rate, as a schedule gives
    step = MLPStep(ours, lr=lambda k: lrs[k], momentum=momentum, weight_decay=weight_decay)
    optimizer = torch.optim.SGD(ref.parameters(), lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    for k, (x, y) in enumerate(_batches(len(lrs), 32)):
        optimizer.param_groups[0]["lr"] = lrs[k]
        expected = _reference_step(ref, optimizer, x, y, bf16=False)
        assert step(x, y).item() == pytest.approx(expected, rel=1e-5)
    momenta = [m for pair in zip(step.weight_momenta, step.bias_momenta) for m in pair]
    for (name, p), q, buf in zip(ours.named_parameters(), ref.parameters(), momenta, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        if momentum:  # SGD keeps no buffer without momentum
            torch.testing.assert_close(buf, optimizer.state[q]["momentum_buffer"], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_steps_follow_autocast_within_bfloat16_rounding():
    ours, ref = _twins((500, 256))
    step = MLPStep(ours, lr=constant(0.05), momentum=0.9, precision="bf16")
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    start = [p.detach().clone() for p in ref.parameters()]
    for x, y in _batches(5, 64):
        expected = _reference_step(ref, optimizer, x, y, bf16=True)
        assert step(x.bfloat16(), y).item() == pytest.approx(expected, rel=2e-2)
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), start, strict=True):
        assert p.dtype == torch.float32  # the master weights stay float32
        moved, differ = (q - p0).norm(), (p - q).norm()
        assert moved > 0
        assert differ < 0.05 * moved  # the updates agree to bfloat16's precision
    # The bf16 copies the matmuls read are the updated weights, not stale ones.
    for low, w in zip(step.low_weights, step.weights, strict=True):
        assert low.dtype == torch.bfloat16
        assert torch.equal(low, w.to(torch.bfloat16))


def test_the_returned_loss_is_the_batch_sum_of_cross_entropy_before_the_update():
    model, twin = _twins((32,))
    x, y = _batches(1, 17)[0]
    expected = F.cross_entropy(twin(x), y, reduction="sum").item()
    step = MLPStep(model, lr=constant(0.1), momentum=0.9)
    assert step(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert step.count == 1
    assert not torch.equal(model.net[0].weight, twin.net[0].weight)  # and it did update


def test_the_step_leaves_no_autograd_state_behind():
    model, _ = _twins((32,))
    x, y = _batches(1, 8)[0]
    MLPStep(model, lr=constant(0.1), momentum=0.9)(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_a_model_that_is_not_an_mlp_is_refused():
    with pytest.raises(TypeError, match="MLP"):
        MLPStep(nn.Sequential(nn.Linear(784, 10), nn.Tanh(), nn.Linear(10, 10)), lr=constant(0.1), momentum=0.9)


@pytest.mark.parametrize("total_steps", [10, 37, 844 * 3])
@pytest.mark.parametrize("max_lr", [0.1, 0.003])
def test_one_cycle_gives_onecycle_lr_rates_step_by_step(total_steps, max_lr):
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=max_lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                    cycle_momentum=False)
    expected = []
    for _ in range(total_steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    schedule = one_cycle(max_lr, total_steps)
    assert [schedule(k) for k in range(total_steps)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
