"""`mnist-flow report`: trials.csv, summary.md and the PNG plots of a study; the run summary's Markdown."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
from PIL import Image

from mnist_flow import cli
from mnist_flow.review.report import table_records, trials_frame, write_report
from mnist_flow.summary import (
    BestTrial,
    DataSummary,
    DecisionSummary,
    FinalMetrics,
    FitSummary,
    ModelSummary,
    RunSummary,
    TrialCounts,
)


def _pngs(folder: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            assert image.format == "PNG"
            sizes[path.name] = image.size
    return sizes


def test_report_writes_the_trials_csv_the_summary_and_the_plots_with_the_champions_confusion_matrix(world, tmp_path):
    registry = world.registry()
    report = write_report(world.study, registry, tmp_path / "report")
    registry.dispose()

    frame = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert list(frame["number"]) == [t.number for t in world.study.trials]
    assert {"state", "value", "params_lr", "params_momentum", "params_hidden1", "params_hidden2", "duration_s",
            "worker", "run_key", "epochs"} <= set(frame.columns)
    assert set(frame["state"]) == {"COMPLETE", "PRUNED"}
    assert (frame["run_key"] == "review-tests").all() and frame["worker"].str.contains(":").all()
    complete = frame[frame["state"] == "COMPLETE"]
    assert complete["value"].notna().all() and (complete["epochs"] == 3).all()

    sizes = _pngs(tmp_path / "report")
    assert {"optimization_history.png", "param_importances.png", "validation_curves.png",
            "confusion_matrix.png"} <= set(sizes)
    assert len(sizes) >= 4 and all(w >= 300 and h >= 200 for w, h in sizes.values())
    assert report.skipped == {}
    # the champion, reloaded through the registry, scores on the sample's test set what it scored when registered
    assert report.champion is not None and report.champion.accuracy == pytest.approx(world.test_accuracy, abs=1e-6)
    assert int(report.champion.matrix.sum()) == 1000

    summary = (tmp_path / "report" / "summary.md").read_text()
    assert world.study.study_name in summary and world.study.user_attrs["fingerprint"] in summary
    assert f"`mnist` v{world.version.version}" in summary and "## Hyperparameter importances" in summary
    assert "- lr:" in summary and "confusion_matrix.png" in summary


def test_importances_fall_back_to_an_explanation_with_fewer_than_two_complete_trials(tmp_path):
    study = optuna.create_study(direction="maximize", study_name="lonely")
    study.enqueue_trial({"lr": 0.1, "momentum": 0.9})
    study.optimize(lambda t: t.suggest_float("lr", 1e-3, 0.3) + t.suggest_float("momentum", 0.5, 0.98), n_trials=1)

    report = write_report(study, None, tmp_path)

    assert (tmp_path / "param_importances.png").is_file() and len(report.plots) == 4
    summary = (tmp_path / "summary.md").read_text()
    assert "importances need at least 2 complete trials; the study has 1" in summary
    assert "confusion_matrix.png: skipped (the study has no 'dataset' attribute" in summary


def test_report_command_writes_the_files_of_the_only_study(world_env, tmp_path, capsys):
    out = tmp_path / "cli-report"

    assert cli.main(["report", "--out", str(out)]) == 0

    assert {"trials.csv", "summary.md", "confusion_matrix.png"} <= {p.name for p in out.iterdir()}
    assert world_env.study.study_name in capsys.readouterr().out


def test_report_command_names_the_studies_when_the_one_asked_for_does_not_exist(world_env, tmp_path, capsys):
    assert cli.main(["report", "--study", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No study named 'nope'" in err and world_env.study.study_name in err


def test_trials_table_records_are_json_ready(world):
    records = table_records(trials_frame(world.study))
    assert len(records) == len(world.study.trials)
    pruned = [r for r in records if r["state"] == "PRUNED"]
    assert pruned and all(isinstance(r["value"], float) and r["epochs"] < 3 for r in pruned)  # stopped early
    assert all(isinstance(r["number"], int) and isinstance(r["epochs"], int) for r in records)


def _run_summary(**changes) -> RunSummary:
    summary = RunSummary(
        data=DataSummary(name="mnist", source="sample", origin="/x", fingerprint="ab" * 32, train_samples=3600,
                         val_samples=400, test_samples=1000),
        study="mnist-abababababab",
        trials=TrialCounts(finished=3, complete=2, pruned=1, in_study=7, epochs=8),
        best=BestTrial(trial=4, params={"lr": 0.0123, "momentum": 0.9, "hidden1": 256, "hidden2": 128},
                       val_accuracy=0.931),
        params={"n_trials": 3},
        metrics=FinalMetrics(val_accuracy=0.94, test_accuracy=0.9375, test_loss=0.2),
        final_fit=FitSummary(seed=0, fits=1, epochs=24, best_epoch=19, recoveries=1, notes=("restored epoch 7",)),
        model=ModelSummary(name="mnist", version=3, champion=False, artifact="/a"),
        decision=DecisionSummary(outcome="kept", reason="not significantly better (p=0.41)", p_value=0.41,
                                 challenger_accuracy=0.9375, champion_accuracy=0.9391),
        seconds={"data": 1.0, "tune": 12.5, "train": 3.25, "evaluate": 0.1, "register": 0.4},
        database="postgresql+psycopg://mnist:s3cret@db/mnist",
        dashboard_command="mnist-flow dashboard   # optuna-dashboard on postgresql+psycopg://mnist:s3cret@db/mnist",
    )
    return dataclasses.replace(summary, **changes)


def test_run_summary_markdown_has_params_accuracies_comparison_stage_times_and_fingerprint():
    text = _run_summary().markdown()

    for expected in ("`lr` = 0.0123", "`hidden1` = 256", "0.9400", "0.9375", "challenger (not promoted)", "**kept**",
                     "not significantly better (p=0.41)", "McNemar p-value: 0.4100", "champion test accuracy: 0.9391",
                     "| tune | 12.5 |", "1 pruned), 8 epochs;", "ab" * 32, "mnist:***@db"):
        assert expected in text, expected
    assert "s3cret" not in text
    assert "No comparison was needed" in _run_summary(decision=None).markdown()


def test_run_summary_lines_and_json_say_the_same_and_mask_the_password():
    summary = _run_summary()
    text = "\n".join(summary.lines())
    for expected in ("mnist from sample (3600 train / 400 val / 1000 test), fingerprint abababababababab",
                     "3 trials this run: 2 complete, 1 pruned; 8 epochs", "trial #4: lr=0.0123", "final model val 0.9400, test 0.9375",
                     "epoch 19 of 24 kept (best val), 1 divergence recovery", "mnist v3 (challenger, not promoted): not",
                     "tune 12.5s"):
        assert expected in text, expected
    as_json = json.loads(json.dumps(summary.to_dict()))
    assert as_json["trials"]["finished"] == 3 and as_json["trials"]["epochs"] == 8 and as_json["decision"]["p_value"] == 0.41
    assert as_json["final_fit"]["notes"] == ["restored epoch 7"] and set(as_json) == {
        f.name for f in dataclasses.fields(RunSummary)}


def test_test_data_of_another_fingerprint_is_refused_without_starting_a_download(tmp_path):
    from mnist_flow.errors import DataError
    from mnist_flow.review.report import ChampionData, load_test_data

    with pytest.raises(DataError, match=r"No mnist data with the champion's fingerprint 0000000000000000") as caught:
        load_test_data("mnist", "0" * 64, ChampionData(cache_dir=tmp_path))  # empty cache: only the sample is tried
    assert "sample: " in caught.value.message and "--source dir --data-dir" in caught.value.fix
    assert not any(tmp_path.iterdir())
