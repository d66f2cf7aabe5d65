"""Run configuration: one frozen, typed dataclass loaded from `configs/*.yaml` plus `--set` overrides.

Unknown keys, wrong types, missing required keys and bad values raise a ValueError whose
message is one line naming the file/key and what to do.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from shards.layouts import SPLITS, TAR_SUFFIX
from shards.location import check_reachable, is_remote, normalise, resolve

# Keys that must be in the YAML file (the contract's keys); the rest have defaults.
REQUIRED = ("name", "storage_path", "shards_dir", "model", "epochs", "batch_size", "workers", "use_gpu")
# Keys holding locations (a path or a URI, DESIGN.md "Locations"): relative paths resolve
# against the launch cwd (Ray workers run elsewhere); URIs stay as written.
PATH_KEYS = ("storage_path", "shards_dir")

CHOICES = {
    "schedule": ("constant", "cosine", "plateau", "step"),
    "crop": ("paper", "rrc"),
    "eval_crop": ("center", "ten_crop"),
    "precision": ("fp32", "bf16"),
    "backend": ("dali", "torch"),
    "on_corrupt": ("error", "skip"),
    "grad_compression": ("none", "bf16"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; the first eight fields are the contract's keys."""

    name: str
    storage_path: str
    shards_dir: str
    model: str
    epochs: int
    batch_size: int  # per worker
    workers: int | tuple[int, int]  # fixed, or [min, max]: elastic (Ray Train resizes the group)
    use_gpu: bool

    # optimiser (SGD with momentum, as the paper)
    lr: float = 0.01
    lr_base_batch: int = 0  # >0: linear scaling, lr * global_batch / lr_base_batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # schedule: constant | cosine (per step, after warm-up) | plateau (/plateau_factor on val
    # top-1 plateau, the paper's rule) | step (x step_factor every step_epochs)
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    step_epochs: int = 30
    step_factor: float = 0.1

    # data
    backend: str = "dali"
    crop: str = "rrc"  # paper: random crop of the stored image; rrc: RandomResizedCrop
    crop_size: int = 224
    eval_crop: str = "center"  # center | ten_crop (the paper's test protocol)
    # DALI's CPU threads and the mixed decoder's hardware share: a number, or "auto" (probed by each
    # worker on its own shards at start, pipeline.tuning). dali_threads 0: 1 on CPU workers (the
    # trainer needs the other cores), "auto" on GPU workers; hw_decoder_load only acts on GPU workers
    dali_threads: int | str = 0
    hw_decoder_load: float | str = "auto"
    # node-local cache of remote shards (s3://...): "" the loader's default folder
    # (~/.cache/alexnet-dali/shards), "none" streams through DALI's S3 reader, else a folder
    cache_dir: str = ""
    cache_max_gb: float = 0.0  # the cache's size cap per node; 0: unbounded
    on_corrupt: str = "error"  # an image that does not decode: error (one line) | skip (counted)

    # compute
    precision: str = "fp32"  # bf16: autocast on GPU
    channels_last: bool = False
    grad_compression: str = "none"  # bf16: DDP all-reduces gradients in bf16 (half the bytes on the wire)
    torch_threads: int = 0  # 0: the node's cores shared evenly between its workers

    # bookkeeping
    seed: int = 0
    log_every: int = 10  # steps between logged rows
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # also every N steps inside an epoch (0: epoch ends only)
    audit_samples: bool = False  # the sample ledger <run_dir>/samples (epoch, step, rank, key)
    keep_checkpoints: int = 2  # Ray Train's CheckpointConfig(num_to_keep): the newest N stay
    max_failures: int = 1  # worker-group restarts (Ray Train's FailureConfig)
    # elastic runs (workers: [min, max]): how often Ray Train checks whether more workers fit
    elastic_resize_monitor_interval_s: float = 60.0

    def __post_init__(self) -> None:
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(choices)}")
        if isinstance(self.workers, list):
            object.__setattr__(self, "workers", tuple(self.workers))
        if isinstance(self.workers, tuple):
            lo_hi = self.workers
            if len(lo_hi) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in lo_hi) \
                    or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"workers: {list(lo_hi)!r} must be an int or [min, max] with 1 <= min <= max")
            if lo_hi[0] == lo_hi[1]:
                object.__setattr__(self, "workers", lo_hi[0])
        elif self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        positive = ("epochs", "batch_size", "crop_size", "log_every", "checkpoint_every",
                    "keep_checkpoints", "step_epochs")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.dali_threads != "auto" and (isinstance(self.dali_threads, str) or self.dali_threads < 0):
            raise ValueError(f"dali_threads: {self.dali_threads!r} must be an integer >= 0 or auto")
        if self.hw_decoder_load != "auto" and (isinstance(self.hw_decoder_load, str)
                                               or not 0 <= self.hw_decoder_load <= 1):
            raise ValueError(f"hw_decoder_load: {self.hw_decoder_load!r} must be a number in [0, 1] or auto")
        non_negative = ("lr", "lr_base_batch", "momentum", "weight_decay", "label_smoothing",
                        "warmup_epochs", "min_lr", "plateau_patience", "torch_threads",
                        "max_failures", "cache_max_gb", "elastic_resize_monitor_interval_s",
                        "checkpoint_every_steps")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name: {self.name!r} must be a plain directory name (no '/')")
        if not 0 < self.plateau_factor < 1 or not 0 < self.step_factor < 1:
            raise ValueError("plateau_factor and step_factor: must be in (0, 1)")
        if self.schedule == "plateau" and self.warmup_epochs:
            raise ValueError("warmup_epochs: not used with schedule 'plateau' (the paper's rule); set it to 0")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing: must be < 1, got {self.label_smoothing}")
        if is_remote(self.cache_dir):
            raise ValueError(f"cache_dir: {self.cache_dir!r} is a store; the shard cache is a folder on each node "
                             "(a path, '' for ~/.cache/alexnet-dali/shards, or none to stream from the store)")

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, tuple)

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
        return dataclasses.asdict(self)


def valid_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _coerce(key: str, value: Any, kind: type, origin: str) -> Any:
    """Check one value's type; ints are accepted where floats are expected."""
    if key == "workers":  # an int, or [min, max] (YAML gives a list; a config dict passed on, a tuple)
        if isinstance(value, (list, tuple)):
            return tuple(value)
        kind = int
    if key in ("dali_threads", "hw_decoder_load"):  # a number or "auto"
        if value == "auto":
            return value
        kind = int if key == "dali_threads" else float
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool):
        raise ValueError(f"{origin}: {key}: expected {kind.__name__}, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"{origin}: {key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


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


def from_dict(raw: dict[str, Any], origin: str = "config", base_dir: Path | None = None) -> TrainConfig:
    """Validate a mapping into a TrainConfig; relative path keys resolve against `base_dir` (cwd)."""
    keys = valid_keys()
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ValueError(f"{origin}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{origin}: missing key(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    hints = get_type_hints(TrainConfig)
    values = {k: _coerce(k, v, hints[k], origin) for k, v in raw.items()}
    for key in PATH_KEYS:
        values[key] = normalise(values[key], base_dir)
    try:
        return TrainConfig(**values)
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate, resolve paths against the cwd."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file (see configs/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of key: value at the top level")
    raw.update(parse_overrides(overrides or []))
    return from_dict(raw, origin=str(path))


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
