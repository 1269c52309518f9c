"""The champion/challenger gate: McNemar's exact test and the promotion rules."""

from __future__ import annotations

import pytest
import torch

from mnist_flow.registry.promotion import decide, mcnemar_exact


def correct(pattern: str) -> torch.Tensor:
    return torch.tensor([ch == "1" for ch in pattern])


def test_mcnemar_matches_hand_computed_value():
    # 2 * (C(10,0) + C(10,1)) / 2**10 = 22/1024
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375, abs=1e-15)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0


def gate(challenger, champion, *, fp="a", champ_fp="a", margin=0.0, alpha=0.05):
    return decide(challenger, champion, challenger_fingerprint=fp, champion_fingerprint=champ_fp,
                  margin=margin, alpha=alpha)


def test_first_model_becomes_champion():
    decision = gate(correct("1101"), None, champ_fp=None)
    assert decision.outcome == "first" and decision.challenger_accuracy == 0.75


def test_clearly_better_challenger_is_promoted():
    # challenger right on 20 samples the champion gets wrong, never the reverse
    challenger = torch.ones(100, dtype=torch.bool)
    champion = torch.cat([torch.zeros(20, dtype=torch.bool), torch.ones(80, dtype=torch.bool)])
    decision = gate(challenger, champion)
    assert decision.outcome == "promoted"
    assert (decision.b, decision.c) == (20, 0) and decision.p_value < 0.05


@pytest.mark.parametrize("challenger,champion", [("1100", "1100"), ("1000", "1100"), ("1010", "1100")])
def test_equal_or_worse_challenger_is_kept(challenger, champion):
    decision = gate(correct(challenger), correct(champion), alpha=None)
    assert decision.outcome == "kept" and "margin" in decision.reason


def test_gain_within_margin_is_kept():
    decision = gate(correct("1111"), correct("1110"), margin=0.3, alpha=None)
    assert decision.outcome == "kept"


def test_insignificant_gain_is_kept_and_alpha_none_skips_the_test():
    challenger, champion = correct("1111111111"), correct("1111111110")  # b=1, c=0: p=1.0
    assert gate(challenger, champion, alpha=0.05).outcome == "kept"
    assert gate(challenger, champion, alpha=None).outcome == "promoted"


def test_changed_fingerprint_is_blocked():
    decision = gate(torch.ones(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool), fp="new", champ_fp="old")
    assert decision.outcome == "blocked" and not decision.promotes
    assert "fingerprints differ" in decision.reason


def test_a_champion_on_other_data_blocks_promotion_even_without_its_per_sample_results():
    # The pipeline never scores a champion on data with another fingerprint, so it passes None.
    decision = gate(torch.ones(10, dtype=torch.bool), None, fp="sample", champ_fp="full-mnist")
    assert decision.outcome == "blocked" and not decision.promotes


def test_register_and_decide_keeps_a_champion_trained_on_other_data(tmp_path, sample_prepared):
    from dataclasses import replace

    from mnist_flow.params import TrainConfig
    from mnist_flow.pipeline import Candidate, evaluate_test, register_and_decide
    from mnist_flow.registry.store import Registry
    from mnist_flow.training.loop import train_model

    config = TrainConfig(hidden=(32,), epochs=1)
    s = sample_prepared.splits
    model, history = train_model(config, s.train_x, s.train_y, s.val_x, s.val_y)
    test = evaluate_test(model, sample_prepared)
    lineage = dict(study_name="s", trial_number=0, flow_run_id=None)
    with Registry(f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "artifacts")) as registry:
        first, _ = register_and_decide(
            registry, Candidate(sample_prepared, model, config, history, test, run_key="a", **lineage),
            margin=0.0, alpha=None)
        other_data = replace(sample_prepared, bundle=replace(sample_prepared.bundle, fingerprint="f" * 64))
        second, decision = register_and_decide(
            registry, Candidate(other_data, model, config, history, test, run_key="b", **lineage),
            margin=0.0, alpha=None)
        assert decision.outcome == "blocked"
        assert registry.champion("mnist").version == first.version != second.version
