"""The run's parameters, defined once.

:class:`RunParams` is the only definition of a run parameter: its type, default, bounds and help text.
The flow's signature (and so the deployment's parameter schema), the command lines of
``python flows/mnist.py`` and ``mnist-flow tune``, and the README's parameter table are all derived
from it. Users and Prefect see one flat namespace (``--lr-min``, ``--param n_trials=5``); inside, the
search space and the fixed training recipe are nested models:

    params = RunParams.parse(n_trials=5, lr_max=0.1)
    params.space.lr_max, params.recipe.batch_size, params.flat()["lr_max"]
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from mnist_flow.errors import ConfigError

DatasetName = Literal["mnist", "fashion-mnist"]
SourceName = Literal["auto", "download", "dir", "sample"]
Schedule = Literal["constant", "onecycle"]
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
PrecisionChoice = Literal["auto", "fp32", "bf16"]

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

# Caps: values past them are refused before any work, with the reason (CAP_REASONS).
MAX_WIDTH = 4096
MAX_TRIALS = 10_000
MAX_EPOCHS = 1_000
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 64
MAX_SEED = 2**31 - 1
MAX_FINAL_SEEDS = 16
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 1.0

#: Why a parameter has its cap (said when a value is refused for exceeding it).
CAP_REASONS = {
    "hidden": f"widths are capped at {MAX_WIDTH} to bound an epoch's time and memory; the default maximum is 1024",
    "final_seeds": f"at most {MAX_FINAL_SEEDS} final fits (they run at once, one thread each)",
    "seed": f"seeds stop at {MAX_SEED}: Optuna's sampler (NumPy) takes seeds below 2**32 and adds offsets",
    "epochs": f"epochs are capped at {MAX_EPOCHS}",
    "n_trials": f"a run is capped at {MAX_TRIALS} trials",
    "batch_size": f"batches are capped at {MAX_BATCH_SIZE} (more than the training set)",
    "workers": f"a run has at most {MAX_WORKERS} trial workers",
    "lr": f"learning rates above {MAX_LR} diverge",
    "weight_decay": f"weight decay is capped at {MAX_WEIGHT_DECAY}",
}


def _cap_reason(field: str) -> str | None:
    return next((why for key, why in CAP_REASONS.items() if key in field), None)


def default_precision() -> Precision:
    """bf16 where the hardware does bfloat16 matmuls natively (CUDA with bf16, AVX512-BF16/AMX CPUs), else fp32."""
    import torch  # here, not at the top: parameters are parsed (and --help printed) without loading torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return "fp32"
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"


def resolve_precision(precision: str) -> Precision:
    """``"auto"`` becomes :func:`default_precision`; an explicit precision is kept as it is (TrainConfig checks it)."""
    return default_precision() if precision == "auto" else typing.cast(Precision, precision)


def _refuse(problems: list[str], what: str, *, fix: str) -> None:
    """One ConfigError naming every problem (``what: first; second.``), if there is any."""
    if problems:
        raise ConfigError(f"{what}: " + "; ".join(problems) + ".", fix=fix)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved with every model as its hyperparameters."""

    hidden: tuple[int, ...] = (500, 256)
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 10
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    seed: int = 0
    #: Arithmetic of the forward and backward passes. Weights, optimizer state and loss stay float32;
    #: "bf16" runs the matmuls in bfloat16, about 1.5x faster on CPUs with AVX512-BF16 (docs/benchmarks.md).
    precision: Precision = "fp32"

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad value; return self so calls chain."""
        problems = []
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            problems.append(f"hidden sizes must be integers >= 1, got {list(self.hidden)}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _refuse(problems, "Invalid training parameters", fix="Correct the parameter and run again.")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def with_(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


class SearchSpace(BaseModel):
    """Bounds of the searched hyperparameters.

    lr: log-uniform; below 1e-3 SGD barely moves in a few epochs, above 0.3 it diverges for these
    MLPs even with the one-cycle warm-up. momentum: 0.5 to 0.98, the range where heavy-ball SGD is
    stable. Hidden sizes in steps of 64: wider than the seed (500-256) because wider MLPs keep gaining
    on Fashion-MNIST, and capped where an epoch stays within a few seconds on two cores.
    """

    model_config = _STRICT

    #: Widths are searched on this grid.
    hidden_step: ClassVar[int] = 64

    lr_min: float = Field(1e-3, gt=0.0, le=MAX_LR, description="Lower bound of the learning rate (log scale).")
    lr_max: float = Field(0.3, gt=0.0, le=MAX_LR, description="Upper bound of the learning rate.")
    momentum_min: float = Field(0.5, ge=0.0, lt=1.0, description="Lower bound of the momentum.")
    momentum_max: float = Field(0.98, ge=0.0, lt=1.0, description="Upper bound of the momentum.")
    hidden1_min: int = Field(128, ge=1, le=MAX_WIDTH, description="Lower bound of the first hidden layer's width.")
    hidden1_max: int = Field(1024, ge=1, le=MAX_WIDTH, description="Upper bound of the first hidden layer's width.")
    hidden2_min: int = Field(64, ge=1, le=MAX_WIDTH, description="Lower bound of the second hidden layer's width.")
    hidden2_max: int = Field(512, ge=1, le=MAX_WIDTH, description="Upper bound of the second hidden layer's width.")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(exc, "Invalid search space"), fix="Swap or correct the bounds and run again."
            ) from None

    @model_validator(mode="after")
    def _bounds_in_order(self) -> SearchSpace:
        """Every inverted bound is named in one ConfigError."""
        problems = []
        for name in ("lr", "momentum", "hidden1", "hidden2"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo > hi:
                problems.append(f"{name} bounds are inverted ({name}_min={lo} > {name}_max={hi})")
        _refuse(problems, "Invalid search space", fix="Swap or correct the bounds and run again.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(), "hidden_step": self.hidden_step}


class Recipe(BaseModel):
    """The fixed (not searched) part of the training: trials are comparable only within one recipe."""

    model_config = _STRICT

    batch_size: int = Field(128, ge=1, le=MAX_BATCH_SIZE, description="Mini-batch size.")
    weight_decay: float = Field(5e-4, ge=0.0, le=MAX_WEIGHT_DECAY, description="L2 weight decay of SGD.")
    schedule: Schedule = Field("onecycle", description="Learning-rate schedule: onecycle or constant.")
    #: bf16: bfloat16 matmuls, float32 weights, momentum and loss; the test set is always evaluated in fp32.
    precision: PrecisionChoice = Field(
        "auto", description="Arithmetic: bf16 (bfloat16 matmuls) where the hardware has it, else fp32; auto picks."
    )


class RunParams(BaseModel):
    """The flow's parameters: typed and checked before any work. Flat names in, nested models inside."""

    model_config = _STRICT

    dataset: DatasetName = Field("mnist", description="mnist or fashion-mnist.")
    source: SourceName = Field(
        "auto", description="auto (the cache, then download, then the bundled sample, warned), download, dir or sample."
    )
    data_dir: Path | None = Field(
        None, description="Folder with the four IDX files, or Keras' mnist.npz (for source=dir)."
    )
    n_trials: int = Field(
        20, ge=1, le=MAX_TRIALS, description="Optuna trials to finish in this run (COMPLETE or PRUNED)."
    )
    max_epochs: int = Field(
        8, ge=1, le=MAX_EPOCHS, description="Epochs per trial (the pruner may stop a trial earlier)."
    )
    final_epochs: int = Field(24, ge=1, le=MAX_EPOCHS, description="Epochs of the final fit of the best configuration.")
    final_seeds: int = Field(
        2,
        ge=1,
        le=MAX_FINAL_SEEDS,
        description="Final fits of the best configuration at once, each with its own training seed (see final_model).",
    )
    final_model: Literal["ensemble", "best"] = Field(
        "ensemble",
        description="With final_seeds > 1, what is registered: ensemble (one MLP averaging the fits' outputs, "
        "their widths side by side, where its validation accuracy is at least the best fit's) or best (the fit "
        "with the highest validation accuracy).",
    )
    final_data: Literal["train+val", "train"] = Field(
        "train+val",
        description="What the final fits learn from: train+val (the training and the validation split: once the "
        "search has chosen, the held-out images train the model too; the final model's validation figures are "
        "then on images it has seen) or train (the validation split stays held out).",
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seeds the split, the sampler, the initial weights and the batch order."
    )
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] | Literal["auto"] = Field(
        "auto",
        description="Trial processes running the study at the same time: auto (one per available CPU, "
        "no more than n_trials and than the memory holds) or a number; 1 runs the trials in the flow's process.",
    )
    trial_runner: Literal["local", "deployment"] = Field(
        "local",
        description="Where workers > 1 run: local (processes on this machine, Prefect's "
        "ProcessPoolTaskRunner) or deployment (runs of mnist-trials/worker on any Prefect worker).",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the training set held out for validation.")
    recipe: Recipe = Field(default_factory=Recipe)
    space: SearchSpace = Field(default_factory=SearchSpace)

    #: Nested models whose fields are flow parameters under their own names.
    _nested: ClassVar[dict[str, type[BaseModel]]] = {"recipe": Recipe, "space": SearchSpace}

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, values: Any) -> Any:
        """``lr_max=0.1`` goes into ``space``, ``batch_size=64`` into ``recipe``."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for key, model in cls._nested.items():
            given = values.get(key)
            nested = dict(given.model_dump() if isinstance(given, BaseModel) else given or {})
            for name in model.model_fields:
                if name in values:
                    nested[name] = values.pop(name)
            if nested or key in values:
                values[key] = nested
        return values

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        """One message for ``workers`` (the union would report both of its members)."""
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS):
            return value
        raise ValueError(f"workers must be 'auto' or a whole number from 1 to {MAX_WORKERS}")

    @model_validator(mode="after")
    def _check(self) -> RunParams:
        if self.source == "dir" and self.data_dir is None:
            raise ValueError("source 'dir' needs data_dir (the folder with the four IDX files)")
        return self

    @property
    def final_on_val(self) -> bool:
        """Whether the final fits train on the validation split too (``final_data="train+val"``)."""
        return self.final_data == "train+val"

    @classmethod
    def parse(cls, **values: Any) -> RunParams:
        """Build from user input (flat names), turning validation errors into one ConfigError."""
        from mnist_flow.data import datasets as data_lib

        try:
            params = cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc), fix="Correct the parameter(s) and run again.") from None
        try:
            data_lib.validate_source(params.dataset, params.source, params.data_dir)
        except (ValueError, OSError) as exc:  # e.g. a NUL byte or an over-long name in data_dir
            raise ConfigError(
                f"Invalid parameter(s): data_dir: {exc} (got {str(params.data_dir)[:60]!r}).",
                fix="Pass the folder holding the four IDX files.",
            ) from None
        return params

    def base_config(self) -> TrainConfig:
        """The fixed part of the training (the recipe) for ``max_epochs``; the search fills in the rest."""
        recipe = self.recipe.model_dump()
        recipe["precision"] = resolve_precision(self.recipe.precision)
        return TrainConfig(**recipe, epochs=self.max_epochs, seed=self.seed)

    def flat(self) -> dict[str, Any]:
        """The parameters under their flat (flow parameter) names, JSON-ready."""
        dumped = self.model_dump(mode="json")
        for key in self._nested:
            dumped.update(dumped.pop(key))
        return dumped


def flat_fields() -> dict[str, FieldInfo]:
    """Every flow parameter (nested models' fields under their own names), in the order users see them."""
    fields: dict[str, FieldInfo] = {}
    for name, info in RunParams.model_fields.items():
        nested = RunParams._nested.get(name)
        fields.update(nested.model_fields if nested is not None else {name: info})
    return fields


def flow_signature() -> inspect.Signature:
    """The flow function's signature: one keyword per flow parameter, with its type, bounds and default.

    Prefect builds the deployment's parameter schema from it, so bad values sent with
    ``prefect deployment run`` are refused before a run exists.
    """
    parameters = []
    for name, info in flat_fields().items():
        annotation = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]  # type: ignore[assignment]
        default = info.get_default(call_default_factory=True)
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
        )
    return inspect.Signature(parameters, return_annotation=dict[str, Any])


def with_run_parameters(fn: Any) -> Any:
    """Give ``fn(**parameters)`` the explicit signature of :func:`flow_signature` (for Prefect's schema)."""
    fn.__signature__ = flow_signature()
    fn.__doc__ = (
        (fn.__doc__ or "").rstrip()
        + "\n\nArgs:\n"
        + "".join(f"    {name}: {info.description}\n" for name, info in flat_fields().items())
    )
    return fn


def _bounds(info: FieldInfo) -> str:
    """``[0, 1)``, ``> 0``, ``>= 1`` from a field's constraints ('' when it has none)."""
    lower = upper = ""
    for item in info.metadata:
        for attr, text in (("gt", "({}"), ("ge", "[{}")):
            if getattr(item, attr, None) is not None:
                lower = text.format(_number(getattr(item, attr)))
        for attr, text in (("lt", "{})"), ("le", "{}]")):
            if getattr(item, attr, None) is not None:
                upper = text.format(_number(getattr(item, attr)))
    if lower and upper:
        return f"{lower}, {upper}"
    if lower:
        return ("> " if lower[0] == "(" else ">= ") + lower[1:]
    if upper:
        return ("< " if upper[-1] == ")" else "<= ") + upper[:-1]
    return ""


def _range(info: FieldInfo) -> str:
    """``in [0, 1)`` or ``>= 1``: a field's bounds as a phrase."""
    bounds = _bounds(info)
    return f"in {bounds}" if "," in bounds else bounds


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _field_of(loc: tuple[Any, ...]) -> FieldInfo | None:
    name = str(loc[-1]) if loc else ""
    return flat_fields().get(name)


def describe_validation_error(exc: ValidationError, prefix: str = "Invalid parameter(s)") -> str:
    """One line naming every bad parameter (by its flat name), what it must be and what was given."""
    parts = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in RunParams._nested)
        name = ".".join(str(p) for p in loc) or "parameters"
        msg = err["msg"].removeprefix("Value error, ")
        info = _field_of(loc)
        if info is not None and err["type"] in {
            "greater_than",
            "greater_than_equal",
            "less_than",
            "less_than_equal",
            "finite_number",
        }:
            msg = "must be " + ("a finite number " if err["type"] == "finite_number" else "") + _range(info)
        given = err.get("input")
        text = repr(given) if len(repr(given)) <= 60 else repr(given)[:57] + "..."
        shown = loc and not isinstance(given, dict) and err["type"] != "missing"
        reason = _cap_reason(name) if err["type"] in ("less_than_equal", "less_than") else None
        parts.append(f"{name}: {msg}" + (f" (got {text})" if shown else "") + (f" ({reason})" if reason else ""))
    return f"{prefix}: " + "; ".join(parts) + "."


def markdown_table() -> str:
    """The README's parameter table."""
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for name, info in flat_fields().items():
        default = info.get_default(call_default_factory=True)
        shown = "–" if default is None else f"`{default}`"
        bounds = _range(info)
        meaning = (info.description or "").rstrip(".") + (f"; {bounds}" if bounds else "")
        rows.append(f"| `{name}` | {shown} | {meaning} |")
    return "\n".join(rows)
