"""Property-based fuzzing of every way a user hands mnist-flow values: flow parameters, settings, CLI arguments.

Each target runs >= 2,000 hypothesis examples through the real parsers (argparse of `python flows/mnist.py`
and `mnist-flow tune`, RunParams, pydantic-settings, Typer's parser of `mnist-flow`), with no training behind
them: a tripwire in place of the data loader fails the test if a bad value gets past the checks and work
starts. The properties: bad input ends in exit code 2 with one message (cause, fix) and no traceback;
whatever is accepted is sane (finite, within the caps, bounds ordered).
"""

from __future__ import annotations

import math
import os
import string
import typing
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_flow import params as limits
from mnist_flow import pipeline
from mnist_flow.cli import main as cli_main
from mnist_flow.cli.flow import build_parser
from mnist_flow.errors import ConfigError
from mnist_flow.params import RunParams, flat_fields
from mnist_flow.settings import ENV_PREFIX, Settings, load_settings

EXAMPLES = 2000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class WorkStarted(AssertionError):
    """Raised by the tripwire: a command got past its checks and began real work."""


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real work: loading data fails the test; the home is a fresh path that must stay unwritten."""
    def started(*args, **kwargs):
        raise WorkStarted(f"work started: load_data{args[:1]}")

    monkeypatch.setattr(pipeline, "load_data", started)
    for key in [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("MNIST_FLOW_HOME", str(home))
    return home


def _one_message(err: str) -> None:
    """A refusal: `error: ...` (one line, or the message and its `Fix:` line), never a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("error: "), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("Fix: ")), err


# --- values ------------------------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["inf", "-inf", "nan", "NaN", "1e309", "-0", "0", "1", "0x10", "1_000", "١", "²", "", " ",
                     "1e-400", "4096", "4097", "2147483647", "2147483648", "4294967296", "9223372036854775808"]),
)
JUNK = st.text(alphabet=string.printable + "é\u00a0\u2028²", max_size=20)
VALUES = st.one_of(NUMBERS, JUNK)

FLOW_FLAGS = [f"--{name.replace('_', '-')}" for name in flat_fields()]
PARSER = build_parser("flows/mnist.py")  # the parser of `python flows/mnist.py` (and, with --run-key, of tune)


def _sane(params: RunParams) -> None:
    """What RunParams accepts can run: finite, capped, ordered."""
    flat = params.flat()
    for name, value in flat.items():
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)
    assert 1 <= flat["hidden1_min"] <= flat["hidden1_max"] <= limits.MAX_WIDTH
    assert 1 <= flat["hidden2_min"] <= flat["hidden2_max"] <= limits.MAX_WIDTH
    assert 0 < flat["lr_min"] <= flat["lr_max"] <= limits.MAX_LR
    assert 0 <= flat["momentum_min"] <= flat["momentum_max"] < 1
    workers = params.workers if isinstance(params.workers, int) else limits.MAX_WORKERS
    assert 0 <= params.seed <= limits.MAX_SEED and params.seed + pipeline.WORKER_SEED_STRIDE * workers < 2**32
    assert 1 <= params.n_trials <= limits.MAX_TRIALS and 1 <= flat["batch_size"] <= limits.MAX_BATCH_SIZE
    assert params.max_epochs <= limits.MAX_EPOCHS and params.final_epochs <= limits.MAX_EPOCHS
    assert 0 <= flat["weight_decay"] <= limits.MAX_WEIGHT_DECAY and 0 < params.val_fraction < 1


# --- target 1: the flow's parameters (argparse of flows/mnist.py and `mnist-flow tune`, then RunParams) -----------


def _flag_value(name: str) -> st.SearchStrategy[tuple[str, str]]:
    """Values of the right form for the flag (so most examples reach RunParams), with junk now and then."""
    annotation = RunParams.model_fields[name].annotation
    choices = [str(a) for a in typing.get_args(annotation) if isinstance(a, str)]
    if annotation is int:
        good = st.one_of(st.integers(-5, 5000), st.integers(-(2**70), 2**70)).map(str)
    elif annotation is float:
        good = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(0, 1).map(repr),
                         st.sampled_from(["inf", "-inf", "nan", "1e309", "1e-400", "0", "10", "10.0000001"]))
    elif choices:
        good = st.sampled_from(choices)
    else:
        good = JUNK.filter(lambda t: not t.startswith("-"))
    flag = f"--{name.replace('_', '-')}"
    return st.tuples(st.just(flag), st.one_of(*[good] * 9, VALUES))


FLOW_ARGS = st.lists(st.one_of(*[_flag_value(name) for name in RunParams.model_fields],
                               st.tuples(st.sampled_from(["--json", "--nope", "-x", "--"]), VALUES)),
                     min_size=1, max_size=6)


def test_fuzzed_flow_parameters_are_refused_with_one_message_or_accepted_only_when_sane(
        capsys: pytest.CaptureFixture, reliability) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(pairs=FLOW_ARGS)
    def check(pairs: list[tuple[str, str]]) -> None:
        argv = [part for flag, value in pairs for part in ((flag,) if flag == "--json" else (flag, value))]
        try:
            args = vars(PARSER.parse_args(argv))
        except SystemExit as exc:
            assert exc.code == 2, argv
            _one_message(capsys.readouterr().err)
            seen["usage error"] += 1
            return
        args.pop("json")
        try:
            params = RunParams.parse(**args)
        except ConfigError as exc:
            assert exc.fix and "Traceback" not in str(exc)
            seen["refused"] += 1
            return
        _sane(params)
        seen["accepted, sane"] += 1

    check()
    assert sum(seen.values()) >= EXAMPLES
    reliability.record(f"fuzz: {sum(seen.values())} hypothesis command lines of `python flows/mnist.py` / "
                       "`mnist-flow tune` (flags with numbers, inf, nan, huge, junk text)",
                       "bad input: exit 2 or ConfigError, one message; accepted: finite, within the caps",
                       ", ".join(f"{n} {k}" for k, n in sorted(seen.items())) + "; 0 tracebacks", group="bad input")


# --- target 2: the settings (environment variables) ----------------------------------------------------------------

SETTING_NAMES = [name.upper() for name in Settings.model_fields]


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def _env_name(draw: st.DrawFn) -> str:
    name = draw(st.one_of(st.sampled_from(SETTING_NAMES), st.text(alphabet=string.ascii_uppercase + "_", min_size=1,
                                                                    max_size=12)))
    full = ENV_PREFIX + name
    return draw(st.sampled_from([full, full.lower(), full.title()]))


ENV = st.dictionaries(st.composite(lambda draw: _env_name(draw))(),
                      st.one_of(NUMBERS, JUNK.filter(lambda s: "\x00" not in s),
                                st.sampled_from(["auto", "cpu", "cuda", "tpu", "off", "true", "false", "sqlite://",
                                                 "/etc/passwd", "/etc/passwd/sub", "~nobody_here/x", "a" * 300])),
                      min_size=1, max_size=4)


def test_fuzzed_settings_are_refused_with_one_message_or_accepted_only_when_sane(tmp_path: Path, reliability) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(env=ENV)
    def check(env: dict[str, str]) -> None:
        env = {k: v for k, v in env.items() if k.upper() != "MNIST_FLOW_HOME"} | {"MNIST_FLOW_HOME": str(tmp_path / "h")}
        with _environment(env):
            try:
                s = load_settings()
            except ConfigError as exc:
                assert exc.fix and "Traceback" not in str(exc)
                text = str(exc)
                assert any(k in text or k.upper() in text for k in env) or "Invalid setting" in text, text
                seen["refused"] += 1
                return
        assert s.threads is None or 1 <= s.threads <= 4096
        assert 1 <= s.heartbeat_interval <= 3600 and s.heartbeat_grace >= 1
        assert 0 <= s.promotion_margin <= 1 and (s.promotion_alpha is None or 0 < s.promotion_alpha <= 1)
        assert not s.home_path.is_file() and not (s.data_dir and s.cache_dir.is_file())
        assert not any(k.upper().startswith(ENV_PREFIX) and k.upper().removeprefix(ENV_PREFIX) not in SETTING_NAMES
                       for k in env), "an unknown setting was accepted"
        seen["accepted, sane"] += 1

    check()
    assert sum(seen.values()) >= EXAMPLES
    reliability.record(f"fuzz: {sum(seen.values())} hypothesis environments of MNIST_FLOW_* variables (any case, "
                       "known and unknown names, numbers, junk, files as folders)",
                       "ConfigError naming the variable, or settings that are in range",
                       ", ".join(f"{n} {k}" for k, n in sorted(seen.items())) + "; 0 other exceptions",
                       group="bad input")


# --- target 3: the `mnist-flow` command line (Typer's parser and the commands' own checks) -------------------------

#: (command words, options that take a value, flags) of each command; values are fuzzed.
COMMANDS = {
    ("train",): (["--lr", "--momentum", "--batch-size", "--epochs", "--weight-decay", "--val-fraction", "--seed",
                  "--hidden", "--schedule", "--precision", "--dataset", "--source", "--device"], ["--json"]),
    ("tune",): ([*FLOW_FLAGS, "--run-key"], ["--json"]),
    ("registry", "show"): ([], ["--json"]),
    ("registry", "promote"): (["--reason"], []),
    ("predict",): (["--model", "--name"], ["--json"]),
    ("dashboard",): (["--port", "--host"], ["--allow-write"]),
}
#: One defect that each example carries for sure, so no example is valid input.
DEFECTS = {
    "unknown option": lambda cmd: ["--no-such-option", "1"],
    "typo of a command": lambda cmd: None,
    "out-of-range number": lambda cmd: {
        ("train",): ["--epochs", "100000000000000000000"], ("tune",): ["--seed", "4294967296"],
        ("registry", "show"): ["99999999999999999999"], ("registry", "promote"): ["0", "--reason", "x"],
        ("predict",): ["--model", "99999999999999999999", "x.png"], ("dashboard",): ["--port", "70000"]}[cmd],
    "not a number": lambda cmd: {
        ("train",): ["--lr", "fast"], ("tune",): ["--n-trials", "many"], ("registry", "show"): ["v²"],
        ("registry", "promote"): ["abc", "--reason", "x"], ("predict",): ["--model", "١", "x.png"],
        ("dashboard",): ["--port", "http"]}[cmd],
    "non-finite number": lambda cmd: {
        ("train",): ["--weight-decay", "inf"], ("tune",): ["--lr-max", "nan"], ("registry", "show"): ["-1"],
        ("registry", "promote"): ["--reason", "x"], ("predict",): [],
        ("dashboard",): ["--port", "nan"]}[cmd],
}


@st.composite
def bad_command_lines(draw: st.DrawFn) -> tuple[list[str], str]:
    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    options, flags = COMMANDS[cmd]
    defect = draw(st.sampled_from(sorted(DEFECTS)))
    extra = [part for _ in range(draw(st.integers(0, 3)))
             for part in ((draw(st.sampled_from(flags)),) if flags and draw(st.booleans())
                          else (draw(st.sampled_from(options)), draw(VALUES)) if options else ())]
    words = list(cmd)
    bad = DEFECTS[defect](cmd)
    if bad is None:  # a typo of the command word: swap two letters or drop one
        word = words[-1]
        i = draw(st.integers(0, len(word) - 2))
        words[-1] = word[:i] + word[i + 1] + word[i] + word[i + 2:] if draw(st.booleans()) else word[:i] + word[i + 1:]
        if words[-1] == word:
            words[-1] = word + "x"
        bad = []
    # the defect goes last, so a valid-looking extra value cannot hide it (argparse and click take the last)
    return [*words, *extra, *bad], defect


def test_fuzzed_bad_command_lines_exit_2_with_one_message_and_no_traceback(
        tripwire: Path, capsys: pytest.CaptureFixture, reliability) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(case=bad_command_lines())
    def check(case: tuple[list[str], str]) -> None:
        argv, defect = case
        code = cli_main(argv)
        out, err = capsys.readouterr()
        assert code == 2, (argv, code, out, err)
        _one_message(err)
        assert not tripwire.exists(), f"{argv} wrote to the home"
        seen[defect] += 1

    check()
    assert sum(seen.values()) >= EXAMPLES
    reliability.record(f"fuzz: {sum(seen.values())} hypothesis command lines of `mnist-flow` with one sure defect "
                       "(unknown option, typo of a command, out-of-range, non-numeric or non-finite value) among "
                       "fuzzed options", "exit 2, one message, no traceback, no work started, nothing written",
                       f"{sum(seen.values())}/{sum(seen.values())} exit 2 with one message ("
                       + ", ".join(f"{k} {n}" for k, n in sorted(seen.items())) + ")", group="bad input")
