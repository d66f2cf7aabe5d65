"""Run configuration: one frozen, typed pydantic model loaded from `configs/*.yaml` plus
`--set` overrides.

Unknown keys (with a "did you mean"), wrong types, missing required keys and bad values raise
a ValueError whose message is one line naming the file (and the key's line), the key and what
to do. Numbers are read as numbers however YAML 1.1 typed them: `1e-3` is a float.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from model.registry import MODEL_NAMES
from shards.layouts import SPLITS, TAR_SUFFIX
from shards.location import check_reachable, is_remote, normalise, resolve

# Keys that must be in the YAML file (the contract's keys); the rest have defaults.
REQUIRED = ("name", "storage_path", "shards_dir", "model", "epochs", "batch_size", "workers", "use_gpu")
# Keys holding locations (a path or a URI, DESIGN.md "Locations"): relative paths resolve
# against the launch cwd (Ray workers run elsewhere); URIs stay as written.
PATH_KEYS = ("storage_path", "shards_dir", "init_from")



class TrainConfig(BaseModel):
    """Everything a run needs; the first eight fields are the contract's keys. Each field's
    description is its line in `orchestration/train.py --help`."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str = Field(description="the run: its folder <storage_path>/<name>; a re-run of the same name resumes it")
    storage_path: str = Field(description="where runs go: a path (shared on a cluster) or a URI (s3://bucket/runs)")
    shards_dir: str = Field(description="the shard set: a path or a URI (python -m shards build)")
    model: str = Field(description=f"the network: {', '.join(MODEL_NAMES)}")
    epochs: int = Field(ge=1, description="epochs to train; raising it on a finished run continues the run")
    batch_size: int = Field(ge=1, description="samples per step per worker (global batch: batch_size x workers)")
    workers: int | tuple[int, int] = Field(
        description="training processes (one per GPU with use_gpu), or [min, max]: elastic")
    use_gpu: bool = Field(description="one GPU per worker; DALI decodes on it")

    # optimiser (SGD with momentum, as the paper)
    lr: float = Field(0.01, ge=0, description="peak learning rate (after warm-up)")
    lr_base_batch: int = Field(0, ge=0, description=">0: lr scales linearly, lr x global_batch / lr_base_batch")
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 on weights (never on norms and biases of BN networks)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    schedule: Literal["constant", "cosine", "plateau", "step"] = Field(
        "cosine", description="cosine: per step after warm-up; plateau: /plateau_factor when val top-1 stalls "
                              "(the paper's rule); step: x step_factor every step_epochs")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up, in epochs (fractions allowed)")
    min_lr: float = Field(0.0, ge=0, description="the cosine schedule's floor")
    plateau_factor: float = Field(0.1, gt=0, lt=1, description="plateau: lr factor on a plateau")
    plateau_patience: int = Field(2, ge=0, description="plateau: epochs without gain before the lr drops")
    step_epochs: int = Field(30, ge=1, description="step: epochs between drops")
    step_factor: float = Field(0.1, gt=0, lt=1, description="step: lr factor per drop")

    # data
    backend: Literal["dali", "torch"] = Field("dali", description="the input pipeline: dali, or the torch baseline")
    crop: Literal["paper", "rrc"] = Field(
        "rrc", description="train crop: paper (random crop of the stored image) or rrc (RandomResizedCrop)")
    crop_size: int = Field(224, ge=1, description="train and val crop side, px")
    eval_crop: Literal["center", "ten_crop"] = Field("center", description="val: centre crop or the paper's ten crops")
    dali_threads: int | Literal["auto"] = Field(
        0, description="DALI CPU threads: a number, auto (probed at start), 0: 1 on CPU workers, auto on GPU")
    hw_decoder_load: float | Literal["auto"] = Field(
        "auto", description="GPU workers: the hardware JPEG decoder's share, 0..1 or auto")
    cache_dir: str = Field("", description="remote shards: the node-local cache folder; '' ~/.cache/alexnet-dali/"
                                           "shards; none streams through DALI's S3 reader")
    cache_max_gb: float = Field(0.0, ge=0, description="the cache's size cap per node, GB; 0: unbounded")
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="an image that does not decode: error (one line) or skip (counted)")

    # compute
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16: autocast (GPU and CPU); fp16: autocast with a GradScaler (GPU only)")
    channels_last: bool = Field(False, description="NHWC memory format for the convolutions")
    grad_compression: Literal["none", "bf16"] = Field(
        "none", description="bf16: DDP all-reduces gradients in bf16 (half the bytes on the wire)")
    torch_threads: int = Field(0, ge=0, description="torch threads per worker; 0: the node's cores shared evenly")
    init_from: str = Field("", description="a checkpoint (path or URI, or a run directory) whose weights start "
                                           "this run: fine-tuning; ignored once the run has its own checkpoint")

    # bookkeeping
    seed: int = Field(0, description="seed of the model's initialisation and the data order")
    log_every: int = Field(10, ge=1, description="steps between logged rows and console lines")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    checkpoint_every_steps: int = Field(0, ge=0, description="also every N steps inside an epoch; 0: epoch ends")
    audit_samples: bool = Field(False, description="the sample ledger <run_dir>/samples (epoch, step, rank, key)")
    keep_checkpoints: int = Field(2, ge=1, description="Ray Train keeps the newest N checkpoints")
    max_failures: int = Field(1, ge=0, description="worker-group restarts before the run fails")
    elastic_resize_monitor_interval_s: float = Field(
        60.0, ge=0, description="elastic runs: seconds between Ray Train's checks for more workers")
    mlflow_tracking_uri: str = Field("", description="log params and metrics to this MLflow server "
                                                     "(needs `pip install mlflow`); '' off")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        kind = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and kind is not bool:
            raise PydanticCustomError("bool_as_number", "expected {kind}", {"kind": _kind(kind)})
        if kind is bool and not isinstance(value, bool):
            raise PydanticCustomError("not_bool", "expected bool (true or false)")
        if isinstance(value, list) and info.field_name == "workers":
            return tuple(value)
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, tuple):
            if not 1 <= value[0] <= value[1]:
                raise PydanticCustomError("workers", "must be an int or [min, max] with 1 <= min <= max")
            return value[0] if value[0] == value[1] else value
        if value < 1:
            raise PydanticCustomError("workers", "must be >= 1")
        return value

    @model_validator(mode="after")
    def _together(self) -> TrainConfig:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model: {self.model!r} is not one of {', '.join(MODEL_NAMES)}")
        if self.dali_threads != "auto" and self.dali_threads < 0:
            raise ValueError(f"dali_threads: {self.dali_threads!r} must be an integer >= 0 or auto")
        if self.hw_decoder_load != "auto" and not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load: {self.hw_decoder_load!r} must be a number in [0, 1] or auto")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name: {self.name!r} must be a plain directory name (no '/')")
        if self.schedule == "plateau" and self.warmup_epochs:
            raise ValueError("warmup_epochs: not used with schedule 'plateau' (the paper's rule); set it to 0")
        if is_remote(self.cache_dir):
            raise ValueError(f"cache_dir: {self.cache_dir!r} is a store; the shard cache is a folder on each node "
                             "(a path, '' for ~/.cache/alexnet-dali/shards, or none to stream from the store)")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 (with a GradScaler) is for GPU workers; on CPU use bf16 or fp32")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    @property
    def global_batch(self) -> int:
        """The global batch at full size (an elastic run's changes with its world size)."""
        return self.batch_size * self.max_workers

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up, linearly scaled when lr_base_batch is set."""
        return self.lr * self.global_batch / self.lr_base_batch if self.lr_base_batch else self.lr

    @property
    def run_dir(self) -> str:
        """`<storage_path>/<name>`: a path or a URI (`s3://bucket/runs/demo`), joined with '/'."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _kind(annotation: Any) -> str:
    """A type as a user reads it: `int`, `cosine|plateau`, `int|[min, max]`."""
    if get_origin(annotation) is Literal:
        return "|".join(map(str, get_args(annotation)))
    if get_origin(annotation) is tuple:
        return "[min, max]"
    if get_args(annotation):  # a union
        return "|".join(_kind(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def valid_keys() -> list[str]:
    return list(TrainConfig.model_fields)


def describe_keys() -> str:
    """Every key with its type, default and one line of doc: the epilog of `train.py --help`."""
    lines = []
    for key, field in TrainConfig.model_fields.items():
        kind = _kind(field.annotation)
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"  {key:<34} {kind} ({default})\n      {field.description}")
    return "config keys (YAML, or --set key=value):\n" + "\n".join(lines)


def _message(error: dict[str, Any]) -> str:
    """One pydantic error as `key: what is wrong, got value`."""
    key = str(error["loc"][0]) if error["loc"] else ""
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    shown = list(got) if isinstance(got, tuple) else got
    if kind == "value_error":  # raised by _together: already `key: ...`
        return str(ctx.get("error", error["msg"]))
    if key == "workers" and kind != "workers":
        kind, error = "workers", {**error, "msg": "must be an int or [min, max] with 1 <= min <= max"}
    if key in ("dali_threads", "hw_decoder_load"):
        return f"{key}: {shown!r} must be a number or auto"
    if kind in ("int_parsing", "int_type", "int_from_float", "float_parsing", "float_type", "string_type"):
        return f"{key}: expected {kind.split('_')[0].replace('string', 'str')}, got {shown!r}"
    if kind == "literal_error":
        return f"{key}: {shown!r} is not one of {ctx['expected'].replace(' or ', ', ').replace(chr(39), '')}"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"{key}: must be {word} {ctx[bound]:g}, got {shown}"
    return f"{key}: {error['msg']}, got {shown!r}"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict; values are YAML scalars (`true`, `3`, `0.1`, `abc`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _did_you_mean(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def from_dict(raw: dict[str, Any], origin: str = "config", base_dir: Path | None = None,
              lines: dict[str, int] | None = None) -> TrainConfig:
    """Validate a mapping into a TrainConfig; relative path keys resolve against `base_dir`
    (cwd). `lines` (key -> line in `origin`) puts the line of a bad key in the message."""
    keys = valid_keys()
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        hints = "".join(f"{k}{_did_you_mean(k, keys)}, " for k in unknown).rstrip(", ")
        raise ValueError(f"{origin}: unknown key(s) {hints}; valid keys: {', '.join(keys)} "
                         "(orchestration/train.py --help lists them)")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{origin}: missing key(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    values = dict(raw)
    for key in PATH_KEYS:
        if isinstance(values.get(key), str) and values[key]:
            values[key] = normalise(values[key], base_dir)
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        where = f"{origin}:{lines[key]}" if lines and key in lines else origin
        raise ValueError(f"{where}: {_message(first)}") from None


def _key_lines(text: str) -> dict[str, int]:
    """The line (1-based) of each top-level key of a YAML mapping."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate, resolve paths against the cwd."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file (see configs/*.yaml)")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of key: value at the top level")
    overrides_raw = parse_overrides(overrides or [])
    lines = {k: v for k, v in _key_lines(text).items() if k not in overrides_raw}
    raw.update(overrides_raw)
    return from_dict(raw, origin=str(path), lines=lines)


def check_shards(config: TrainConfig) -> None:
    """Fail early, in one line, when the shards are not there: a path or a URI (listed through
    pyarrow.fs) whose train/ or val/ holds no .tar; a bucket that cannot be used (StorageError)."""
    shards = resolve(config.shards_dir)
    check_reachable(shards)
    for split in SPLITS:
        if not any(f.base_name.endswith(TAR_SUFFIX) for f in (shards / split).list()):
            raise FileNotFoundError(
                f"shards_dir: {shards} has no {split}/*{TAR_SUFFIX} shards; run `make shards` "
                f"(or `python -m shards build ...`) or pass --set shards_dir=/abs/path or s3://bucket/prefix"
            )
