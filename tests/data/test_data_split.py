"""stratified_split: per-class proportional, disjoint, covering, deterministic per seed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_flow.data.datasets import stratified_split
from mnist_flow.errors import ConfigError


def _check(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, val = stratified_split(labels, fraction, seed)
    assert train.dtype == val.dtype == torch.int64
    both = torch.cat([train, val])
    assert both.numel() == labels.numel() and torch.equal(both.sort().values, torch.arange(labels.numel()))
    assert val.numel() == round(labels.numel() * fraction)
    for cls in labels.unique():
        count = int((labels == cls).sum())
        in_val = int((labels[val] == cls).sum())
        assert abs(in_val - count * fraction) < 1 + 1e-9, (int(cls), in_val, count * fraction)
    return train, val


def test_split_is_stratified_disjoint_and_covering_with_uneven_classes() -> None:
    counts = [7, 13, 50, 1, 2, 30, 9, 11, 4, 73]
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    _check(labels, 0.3, seed=0)


def test_split_is_exact_for_balanced_classes() -> None:
    labels = torch.arange(1000) % 10
    _, val = _check(labels, 0.1, seed=3)
    assert torch.bincount(labels[val]).tolist() == [10] * 10


def test_split_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    labels = torch.arange(500) % 10
    a = stratified_split(labels, 0.2, 42)
    b = stratified_split(labels, 0.2, 42)
    c = stratified_split(labels, 0.2, 43)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=4, max_size=300),
    st.floats(0.05, 0.95),
    st.integers(0, 2**31),
)
def test_split_properties_hold_for_any_labels(values: list[int], fraction: float, seed: int) -> None:
    labels = torch.tensor(values)
    total_val = round(len(values) * fraction)
    if total_val in (0, len(values)):
        with pytest.raises(ConfigError, match="empty"):
            stratified_split(labels, fraction, seed)
        return
    _check(labels, fraction, seed)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_zero_one(fraction: float) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        stratified_split(torch.arange(100) % 10, fraction, 0)
