"""Bad input is refused before any work: one message naming the cause and the fix, exit 2, nothing written.

Parameters go through every entry point (flows/mnist.py, `mnist-flow train/tune`, a Python call of the flow,
the deployment's parameter schema); corrupt data goes through the CLI's user-facing path.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import jsonschema
import pytest
import torch
from rel_helpers import REPO, clean_env, flow_script, mnist_flow, written_files
from testlib import file_server

from mnist_flow.cli import main as cli_main
from mnist_flow.data import datasets as data
from mnist_flow.data.idx import encode_idx
from mnist_flow.errors import ConfigError


@pytest.fixture(scope="module")
def flow_module():
    spec = importlib.util.spec_from_file_location("mnist_flow_script_under_test", REPO / "flows" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def user_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in __import__("os").environ if k.startswith("MNIST_FLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MNIST_FLOW_HOME", str(home))
    return home


# (flags, words the message must contain) -- each is refused by RunParams / TrainConfig before any work
TUNE_CASES = {
    "n_trials < 1": (["--n-trials", "0"], ["n_trials", "0"]),
    "unknown dataset": (["--dataset", "cifar10"], ["dataset", "cifar10"]),
    "unknown source": (["--source", "ftp"], ["source", "ftp"]),
    "source dir without data_dir": (["--source", "dir"], ["data_dir"]),
    "data_dir missing": (["--source", "dir", "--data-dir", "/nonexistent/idx"], ["/nonexistent/idx"]),
    "inverted lr bounds": (["--lr-min", "0.5", "--lr-max", "0.1"], ["inverted", "lr_min=0.5"]),
    "inverted hidden bounds": (["--hidden1-min", "512", "--hidden1-max", "128"], ["inverted", "hidden1"]),
    "momentum bound 1.0": (["--momentum-max", "1.0"], ["momentum_max"]),
    "hidden bound < 1": (["--hidden2-min", "0"], ["hidden2_min"]),
    "lr bound <= 0": (["--lr-min", "0"], ["lr_min"]),
    "absurd width": (["--hidden1-max", "10000000"], ["hidden1_max", "4096", "capped"]),
    "infinite lr bound": (["--lr-max", "inf"], ["lr_max", "finite"]),
    "infinite weight decay": (["--weight-decay", "inf"], ["weight_decay", "finite"]),
    "NaN momentum": (["--momentum-min", "nan"], ["momentum_min", "finite"]),
    "NaN validation share": (["--val-fraction", "nan"], ["val_fraction", "finite"]),
    "seed >= 2**32": (["--seed", str(2**32)], ["seed", "2147483647"]),
    "absurd n_trials": (["--n-trials", "1000000000"], ["n_trials", "10000"]),
    "absurd epochs": (["--final-epochs", "99999999"], ["final_epochs", "1000"]),
    "absurd batch size": (["--batch-size", "100000000"], ["batch_size", "65536"]),
}
TRAIN_CASES = {
    "lr <= 0": (["--lr", "0"], ["learning rate", "0"]),
    "lr negative": (["--lr", "-0.1"], ["learning rate", "-0.1"]),
    "momentum 1.0": (["--momentum", "1.0"], ["momentum", "[0, 1)"]),
    "momentum < 0": (["--momentum", "-0.5"], ["momentum"]),
    "hidden < 1": (["--hidden", "0,64"], ["hidden", "0"]),
    "hidden not a number": (["--hidden", "wide"], ["--hidden", "wide"]),
    "absurd width": (["--hidden", "10000000,256"], ["--hidden", "4096"]),
    "infinite lr": (["--lr", "inf"], ["--lr", "finite"]),
    "infinite weight decay": (["--weight-decay", "inf"], ["--weight-decay", "finite"]),
    "NaN momentum": (["--momentum", "nan"], ["--momentum", "finite"]),
    "seed >= 2**32": (["--seed", str(2**32)], ["--seed", "2147483647"]),
    "absurd epochs": (["--epochs", "100000000000000000000"], ["--epochs", "1000"]),
}


def _refused(code: int, err: str, words: list[str]) -> str:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert "Fix:" in err, err
    for word in words:
        assert word in err, (word, err)
    return err.strip().splitlines()[0]


def _argparse_or_config(capsys, call) -> tuple[int, str]:
    """Run an entry point; argparse refusals (unknown choice) exit 2 with a usage message too."""
    try:
        code = call()
    except SystemExit as exc:  # argparse: "invalid choice"
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(TUNE_CASES))
def test_bad_flow_parameters_are_refused_by_every_command_line_before_any_work(
        case: str, user_home: Path, flow_module, capsys: pytest.CaptureFixture, reliability) -> None:
    flags, words = TUNE_CASES[case]
    observed = []
    for entry, call in (("flows/mnist.py", lambda: flow_module.main(flags)),
                        ("mnist-flow tune", lambda: cli_main(["tune", *flags]))):
        code, err = _argparse_or_config(capsys, call)
        assert code == 2, err
        assert "Traceback" not in err and all(w in err for w in words), err
        if "invalid choice" not in err:
            _refused(code, err, words)
        assert written_files(user_home) == []
        observed.append(f"{entry}: exit {code}")
    reliability.record(f"parameter: {case} ({' '.join(flags)})", "refused: exit 2, one message + fix, nothing written",
                       "; ".join(observed) + f" — “{err.strip().splitlines()[-1][:110]}”", group="bad input")


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_training_parameters_of_mnist_flow_train_are_refused(case: str, user_home: Path,
                                                                  capsys: pytest.CaptureFixture, reliability) -> None:
    flags, words = TRAIN_CASES[case]
    code = cli_main(["train", "--source", "sample", *flags])
    line = _refused(code, capsys.readouterr().err, words)
    assert written_files(user_home) == []
    reliability.record(f"mnist-flow train {' '.join(flags)}", "refused: exit 2, message + fix, nothing written",
                       f"exit 2 — “{line[:110]}”", group="bad input")


def test_python_call_of_the_flow_raises_config_error_before_prefect_creates_a_run(
        user_home: Path, flow_module, monkeypatch: pytest.MonkeyPatch, reliability) -> None:
    import prefect.flows

    started = []
    monkeypatch.setattr(prefect.flows.Flow, "__call__", lambda *a, **k: started.append(a))  # the real run
    for bad in ({"n_trials": 0}, {"lr_min": 0.5, "lr_max": 0.1}, {"source": "dir"}, {"dataset": "cifar10"}):
        with pytest.raises(ConfigError) as caught:
            flow_module.mnist(**bad)
        assert caught.value.fix
    assert started == [] and written_files(user_home) == []
    reliability.record("Python call mnist(n_trials=0), inverted bounds, source=dir without data_dir, unknown dataset",
                       "ConfigError before Prefect creates a flow run",
                       f"4/4 raised ConfigError, 0 flow runs started — “{str(caught.value).splitlines()[0][:90]}”",
                       group="bad input")


def test_deployment_parameter_schema_rejects_out_of_range_values(flow_module, reliability) -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow_module.mnist).model_dump_for_openapi()
    jsonschema.validate({"n_trials": 3, "source": "sample"}, schema)
    bad = {"n_trials": 0, "max_epochs": 0, "lr_min": 0.0, "lr_max": -1.0, "momentum_min": -0.1, "momentum_max": 1.0,
           "hidden1_min": 0, "hidden2_max": 0, "val_fraction": 1.0, "batch_size": 0, "dataset": "cifar10",
           "source": "ftp", "seed": -1}
    refused = []
    for key, value in bad.items():
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({key: value}, schema)
        refused.append(f"{key}={value}")
    # inverted bounds cannot be said in JSON schema: the flow's own check refuses them when the run starts
    with pytest.raises(ConfigError, match="inverted"):
        flow_module.mnist.validate_parameters({"lr_min": 0.5, "lr_max": 0.1})
    reliability.record("deployment parameter schema (`prefect deployment run --param`, enforced schema)",
                       "out-of-range values rejected by the schema; inverted bounds by the flow before any work",
                       f"{len(refused)}/{len(bad)} rejected by jsonschema ({', '.join(refused[:4])}, ...); "
                       "inverted lr bounds: ConfigError in validate_parameters", group="bad input")


@pytest.mark.slow
def test_bad_input_in_a_fresh_process_prints_one_message_without_traceback(home: Path, reliability) -> None:
    env = clean_env(home)
    script = flow_script(["--n-trials", "0", "--source", "sample"], env, timeout=120)
    cli = mnist_flow(["train", "--lr", "0"], env, timeout=120)
    for proc in (script, cli):
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
        assert proc.stdout == ""
    assert written_files(home) == []
    reliability.record("`python flows/mnist.py --n-trials 0` and `mnist-flow train --lr 0` as real processes",
                       "exit 2, one message, no traceback, nothing written",
                       f"exit {script.returncode}/{cli.returncode}, stderr {len(script.stderr.splitlines())}+"
                       f"{len(cli.stderr.splitlines())} lines, no traceback, home empty", group="bad input")


@pytest.mark.slow
def test_a_prefect_home_that_cannot_be_a_folder_is_one_message_naming_it(home: Path, tmp_path: Path,
                                                                         reliability) -> None:
    # a missing one is made (with its parents); one under a file failed after the server's 90 s start-up
    # timeout, with a database traceback and a message blaming the machine's load
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = clean_env(home, PREFECT_HOME=str(blocker / "prefect"))
    proc = flow_script(["--source", "sample", "--n-trials", "1", "--max-epochs", "1"], env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: PREFECT_HOME ({blocker / 'prefect'}) cannot hold"), proc.stderr
    assert "Fix: Point PREFECT_HOME at a writable folder" in proc.stderr
    assert written_files(home) == []
    reliability.record("`flows/mnist.py` with PREFECT_HOME under a file (no PREFECT_API_URL)",
                       "exit 2, one message naming PREFECT_HOME and the fix, before the temporary server starts",
                       f"exit {proc.returncode}, {len(proc.stderr.splitlines())} lines, no traceback",
                       group="bad input")


# --- corrupt data through the CLI --------------------------------------------------------------------------------


def _tiny(n_train: int = 30, n_test: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"train_images": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
            "train_labels": (torch.arange(n_train) % 10).to(torch.uint8),
            "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
            "test_labels": (torch.arange(n_test) % 10).to(torch.uint8)}


def _write(folder: Path, arrays: dict[str, torch.Tensor], gz: bool = True) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for field, base in data.FILES.items():
        paths[field] = folder / (f"{base}.gz" if gz else base)
        data.write_idx(paths[field], arrays[field])
    return paths


def _corrupt(kind: str, folder: Path) -> tuple[str, list[str]]:
    """Write a dataset with one defect; return the damaged file's name and words the message must show."""
    arrays = _tiny()
    if kind == "truncated gzip":
        paths = _write(folder, arrays)
        raw = paths["train_images"].read_bytes()
        paths["train_images"].write_bytes(raw[: len(raw) // 2])
        return paths["train_images"].name, []
    if kind == "wrong magic":
        paths = _write(folder, arrays)
        data.write_idx(paths["train_images"], arrays["train_labels"])  # a labels file under the images name
        return paths["train_images"].name, ["expected 0x00000803", "found 0x00000801"]
    if kind == "header disagrees with file size":
        paths = _write(folder, arrays, gz=False)
        raw = paths["test_images"].read_bytes()
        paths["test_images"].write_bytes(raw[:-100])
        return paths["test_images"].name, [f"should be {len(raw)} bytes", f"it is {len(raw) - 100} bytes"]
    if kind == "image and label counts differ":
        arrays["train_labels"] = arrays["train_labels"][:29]
        paths = _write(folder, arrays)
        return paths["train_labels"].name, ["30 images", "29 labels"]
    if kind == "label outside 0-9":
        arrays["test_labels"][3] = 12
        paths = _write(folder, arrays)
        return paths["test_labels"].name, ["expected 0..9", "found 12"]
    if kind == "checksum mismatch (claims official counts)":
        arrays["test_images"] = torch.zeros(10_000, 28, 28, dtype=torch.uint8)
        arrays["test_labels"] = (torch.arange(10_000) % 10).to(torch.uint8)
        paths = _write(folder, arrays)
        expected = data._torchvision_resources("mnist")["t10k-images-idx3-ubyte.gz"]
        actual = hashlib.md5(paths["test_images"].read_bytes()).hexdigest()
        return paths["test_images"].name, [f"expected md5 {expected}", f"found {actual}"]
    raise AssertionError(kind)


DATA_CASES = ["truncated gzip", "wrong magic", "header disagrees with file size", "image and label counts differ",
              "label outside 0-9", "checksum mismatch (claims official counts)"]


@pytest.mark.parametrize("kind", DATA_CASES)
def test_corrupt_data_is_one_cli_message_with_the_file_and_expected_and_found_values(
        kind: str, tmp_path: Path, user_home: Path, capsys: pytest.CaptureFixture, reliability) -> None:
    folder = tmp_path / "idx"
    name, words = _corrupt(kind, folder)
    code = cli_main(["train", "--source", "dir", "--data-dir", str(folder), "--epochs", "1"])
    err = capsys.readouterr().err
    line = _refused(code, err, [name, *words])
    assert written_files(user_home) == []
    reliability.record(f"data: {kind}", "exit 2; message names the file, expected and found values; no traceback",
                       f"exit 2 — “{line.replace(str(folder) + '/', '')[:130]}”", group="bad input")


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch):
    """A loopback HTTP mirror serving a tiny MNIST; the loader is told its md5s and no other mirrors."""
    files = {f"{base}.gz": gzip.compress(encode_idx(_tiny()[field]), mtime=0) for field, base in data.FILES.items()}
    requests: list[str] = []
    monkeypatch.setattr(data, "_torchvision_resources",
                        lambda name: {n: hashlib.md5(b).hexdigest() for n, b in files.items()})
    monkeypatch.setattr(data, "_torchvision_mirrors", lambda name: [])
    with file_server(lambda path: files.get(path.rsplit("/", 1)[-1]), requests) as url:
        monkeypatch.setenv("MNIST_FLOW_MIRRORS", f"{url}/mnist/")
        yield files, requests


def test_corrupt_file_in_the_cache_is_moved_aside_and_fetched_again_through_the_cli(
        user_home: Path, mirror, capsys: pytest.CaptureFixture, reliability) -> None:
    files, requests = mirror
    args = ["train", "--source", "download", "--epochs", "1", "--hidden", "8", "--json"]
    assert cli_main(args) == 0
    cached = user_home / "data" / "mnist" / "raw" / "train-images-idx3-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:-40])
    capsys.readouterr()
    assert cli_main(args) == 0, capsys.readouterr().err
    assert cached.read_bytes() == files[cached.name]
    assert (cached.parent / f"{cached.name}.corrupt").exists()
    assert len(requests) == 5 and requests[-1].endswith(cached.name)
    reliability.record("a truncated file in the download cache, then `mnist-flow train --source download`",
                       "the corrupt file is moved aside and fetched again; the run succeeds",
                       f"{cached.name} moved to {cached.name}.corrupt, re-fetched (1 extra request), exit 0",
                       group="bad input")


# --- usage errors of the `mnist-flow` command line ---------------------------------------------------------------

USAGE_CASES = {
    "registry promote -1": ["registry", "promote", "-1", "--reason", "x"],
    "registry promote abc": ["registry", "promote", "abc", "--reason", "x"],
    "registry promote 0": ["registry", "promote", "0", "--reason", "x"],
    "registry promote beyond SQLite's INTEGER": ["registry", "promote", str(2**63), "--reason", "x"],
    "registry promote without --reason": ["registry", "promote", "1"],
    "predict with no file": ["predict"],
    "unknown option": ["train", "--epoch", "3"],
    "typo of a command": ["trian"],
    "typo of a subcommand": ["registry", "lsit"],
    "wrong type": ["train", "--epochs", "many"],
    "dashboard port out of range": ["dashboard", "--port", "70000"],
    "tune: unknown option": ["tune", "--n-trails", "3"],
    "tune: not a number": ["tune", "--n-trials", "three"],
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_errors_are_one_line_and_exit_2_without_traceback(case: str, user_home: Path,
                                                                capsys: pytest.CaptureFixture, reliability) -> None:
    argv = USAGE_CASES[case]
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "--help" in err, err
    assert written_files(user_home) == []
    reliability.record(f"usage error: {case} (`mnist-flow {' '.join(argv)}`)", "exit 2, one line, no traceback",
                       f"exit 2 — “{err.strip()[:110]}”", group="bad input")


@pytest.mark.parametrize("ref", [str(2**63), "99999999999999999999", "0", "v0", "²"])
def test_registry_versions_beyond_the_database_integer_are_refused_with_one_message(
        ref: str, user_home: Path, capsys: pytest.CaptureFixture, reliability) -> None:
    from mnist_flow.registry.store import Registry

    with Registry(f"sqlite:///{user_home / 'mnist-flow.db'}", str(user_home / "artifacts")) as registry:
        registry.migrate()
    for argv in (["registry", "show", ref], ["predict", "--model", ref, "digit.png"]):
        code = cli_main(argv)
        line = _refused(code, capsys.readouterr().err, [])
        assert "version" in line.lower()
    reliability.record(f"`mnist-flow registry show {ref}` and `predict --model {ref}`",
                       "exit 2, one message (versions are 1 to 2**63-1), no traceback",
                       f"exit 2 — “{line[:100]}”", group="bad input")


@pytest.mark.slow
def test_usage_errors_in_a_fresh_process_are_one_line_and_exit_2(home: Path, reliability) -> None:
    env = clean_env(home)
    seen = []
    for argv in (["registry", "promote", "abc", "--reason", "x"], ["predict"], ["trian"]):
        proc = mnist_flow(argv, env, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        seen.append(" ".join(argv))
    script = flow_script(["--n-trails", "3"], env, timeout=120)
    assert script.returncode == 2 and len(script.stderr.strip().splitlines()) == 1, script.stderr
    assert written_files(home) == []
    reliability.record("usage errors as real processes: " + "; ".join(f"`mnist-flow {a}`" for a in seen)
                       + "; `flows/mnist.py --n-trails 3`", "exit 2, one line each, no traceback",
                       f"{len(seen) + 1}/{len(seen) + 1} exit 2 with one line", group="bad input")


# --- settings --------------------------------------------------------------------------------------------------


def test_a_lower_case_typo_of_a_setting_is_refused_like_an_upper_case_one(
        user_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, reliability) -> None:
    monkeypatch.setenv("mnist_flow_theads", "2")
    code = cli_main(["registry", "list"])
    line = _refused(code, capsys.readouterr().err, ["mnist_flow_theads", "MNIST_FLOW_THREADS"])
    monkeypatch.delenv("mnist_flow_theads")
    monkeypatch.setenv("mnist_flow_threads", "3")  # lower-case names are honoured, as pydantic-settings does
    from mnist_flow.settings import load_settings

    assert load_settings().threads == 3
    reliability.record("lower-case typo of a setting (`mnist_flow_theads=2`)",
                       "refused like MNIST_FLOW_THEADS (the lower-case name of a real setting is honoured)",
                       f"exit 2 — “{line[:90]}”", group="bad input")


@pytest.mark.parametrize("where", ["a file", "a folder under a file"])
def test_mnist_flow_home_pointing_at_a_file_is_one_message(where: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture, reliability) -> None:
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    home = afile if where == "a file" else afile / "home"
    for key in [k for k in __import__("os").environ if k.upper().startswith("MNIST_FLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MNIST_FLOW_HOME", str(home))
    for argv in (["registry", "list"], ["train", "--source", "sample", "--epochs", "1"]):
        code = cli_main(argv)
        line = _refused(code, capsys.readouterr().err, ["MNIST_FLOW_HOME", "not a folder"])
    assert afile.read_text() == "x"
    reliability.record(f"MNIST_FLOW_HOME pointing at {where}", "exit 2, one message naming the setting",
                       f"exit 2 — “{line.replace(str(tmp_path), '…')[:100]}”", group="bad input")


# --- queued configurations and the user's bounds -----------------------------------------------------------------


def test_the_seed_and_champion_configurations_are_fitted_to_the_users_bounds_before_they_run(
        tmp_path: Path, reliability) -> None:
    import optuna

    from mnist_flow.params import TrainConfig
    from mnist_flow.search.study import SEED_PARAMS, open_study, suggest_config

    params = _run_params(lr_min=0.05, lr_max=0.2, momentum_min=0.5, momentum_max=0.8, hidden1_min=64,
                             hidden1_max=256, hidden2_min=100, hidden2_max=200)
    space = params.space
    champion = {"lr": 0.001, "momentum": 0.97, "hidden1": 1024, "hidden2": 64}
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", seed=0, max_epochs=2, warm_start=[champion],
                       space=space)
    seen = []

    def objective(trial: optuna.Trial) -> float:
        config = suggest_config(trial, space, TrainConfig())
        seen.append((config.lr, config.momentum, config.hidden))
        return 0.0

    study.optimize(objective, n_trials=2)
    for lr, momentum, (h1, h2) in seen:
        assert space.lr_min <= lr <= space.lr_max and space.momentum_min <= momentum <= space.momentum_max
        assert h1 in range(64, 257, 64) and h2 in range(100, 201, 64)
    assert [t.user_attrs["fitted_from"] for t in study.trials] == [SEED_PARAMS, champion]
    reliability.record("seed (lr 0.01, 512-256) and champion (lr 0.001, 1024-64) configurations queued in a study "
                       "whose bounds exclude them (lr 0.05-0.2, hidden1 64-256, hidden2 100-200)",
                       "fitted into the bounds before they run (the originals kept as `fitted_from`)",
                       "ran as " + "; ".join(f"lr {lr:.3g}, momentum {m:.3g}, {h[0]}-{h[1]}" for lr, m, h in seen),
                       group="bad input")


def _run_params(**values):
    from mnist_flow.params import RunParams

    return RunParams.parse(source="sample", **values)
