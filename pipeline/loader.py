"""`make_loader`, the one entry point of the pipeline stage, and the DALI loader behind it.

    loader = make_loader(shards_dir, split="train", batch_size=256, rank=r, world_size=w,
                         device="cuda", backend="dali", crop_size=224, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)          # optional: passes count on by themselves
        for images, labels in loader: ...

Each pass over the loader is one epoch and builds a fresh DALI pipeline for it (a few ms
after the first one in a process), seeded by (seed, epoch, rank): epochs reshuffle,
a resumed run reproduces the epochs it re-reads, and leaving a pass early (a `break`)
leaves nothing behind for the next one. Its reader gets exactly the rank's part of the
epoch (the tars it touches, the end ones' indexes cut to the part), so a remote set only
needs that part staged on the node (`pipeline.staging`).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.corrupt import CorruptSample, find_corrupt, index_samples
from pipeline.shardset import member_key, write_part_index
from pipeline.spec import EpochLoader, LoaderSpec, resolve

log = logging.getLogger(__name__)
_SOURCE_INFO = re.compile(r"^(.*?):(\d+):(.*)$", re.S)


def make_loader(
    shards_dir: str | os.PathLike,
    split: str = "train",
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cuda",
    backend: str = "dali",
    crop_size: int = 224,
    seed: int = 0,
    return_keys: bool = False,
    **extra,
):
    """Batches of `split` for rank `rank` of `world_size` (DESIGN.md "Pipeline API").

    Yields `(images, labels)` or, with `return_keys`, `(images, labels, keys)`: images
    `[B, 3, crop, crop]` (ten-crop: `[B, 10, 3, crop, crop]`, views ordered top-left,
    top-right, bottom-left, bottom-right, centre, then the same five mirrored) in `dtype`,
    normalised with the shard set's stats.json, on `device`; labels int64 `[B]`; keys the
    WebDataset sample keys (list of str). Extras, with defaults: see `spec.EXTRA_DEFAULTS`.

    The loader has `len()` (batches this rank yields per epoch), `num_samples` (samples this
    rank yields per epoch), `set_epoch(e)` (the next pass reads epoch e) and `epoch` (the
    epoch the next pass reads). In train every rank yields the same number of full batches;
    in val every sample once across all ranks (the last batch may be short, a rank whose
    part is empty yields nothing). Bad arguments and bad shards raise one-line
    ValueError/FileNotFoundError here, before any batch is read.
    """
    spec = resolve(shards_dir, split, batch_size, rank, world_size, device, backend, crop_size,
                   seed, return_keys, extra)
    if backend == "torch":
        from pipeline.torch_baseline import TorchLoader

        return TorchLoader(spec)
    return DaliLoader(spec)


class DaliLoader(EpochLoader):
    """One rank's DALI loader; see `make_loader`."""

    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__(spec)
        self._parts = tempfile.TemporaryDirectory(prefix="alexnet-part-")  # this rank's part indexes
        self._live = None  # the iterator of the pass under way
        self._handed: set[str] = set()  # keys handed out in the pass under way
        self._excluded: set[str] = set()  # corrupt keys skipped in the pass under way
        self._failed: list = []  # pipelines a decode error broke
        self._prior: list[int] = []  # positions handed out before the restart this pass resumed from
        self._sources: list[tuple[str, str]] = []  # (tar, key) of each sample handed out since
        self._where: dict[tuple[str, str], int] | None = None  # (tar, key) -> position, once per pass
        if spec.auto:  # num_threads / hw_decoder_load "auto": probed on this rank's part, before any pass
            from pipeline.tuning import tune

            self.spec, self._tuning = tune(spec, Path(self._parts.name))
            self._base = self.spec

    def __iter__(self) -> Iterator[tuple]:
        epoch = self._next_epoch()
        resume = self._take_resume(epoch)
        self._pass = (epoch, 0)
        if len(self) == 0:
            return
        self.spec.stage(epoch)
        k = resume["batch"] if resume else (self.spec.remainder.steps_done if self.spec.resharded(epoch) else 0)
        self._handed = set((resume or {}).get("handed") or ())
        self._prior = np.frombuffer(resume["positions"], np.int64).tolist() if resume and "positions" in resume else []
        self._sources, self._where = [], None
        self._excluded = set((resume or {}).get("excluded") or ())
        if k >= len(self):  # a resharded epoch with nothing left for a full step
            return
        self._check_part(epoch)
        it = self._open(epoch, resume["backend_state"] if resume and not self._excluded else None)
        device = _torch_device(self.spec)
        left = self.num_samples - k * self.spec.batch_size
        try:
            while k < len(self):
                try:
                    out = next(it)[0]
                except RuntimeError as err:  # a sample DALI cannot decode (or read)
                    self._failed.append(it)  # never torn down: DALI 2.4 may crash destroying it
                    self._skip_corrupt(epoch, err)  # raises with on_corrupt="error"
                    it = self._open(epoch, None)
                    continue
                except StopIteration:
                    if not self.spec.train:  # val: skipped samples only shorten the pass
                        break
                    raise CorruptSample(f"{self.spec.data.uri}: rank {self.spec.rank} skipped {len(self._excluded)} "
                                        f"corrupt samples in epoch {epoch}, more than its part can spare; re-pack "
                                        "the shards (python -m shards verify names them)") from None
                n = min(left, self.spec.batch_size, int(out["images"].shape[0]))
                left -= n
                images = out["images"][:n]
                if self.spec.dtype == "bfloat16":
                    images = images.to(torch.bfloat16)
                labels = parse_labels(out["labels"][:n])
                if device.type == "cuda":  # from pinned memory: a copy that does not block the host
                    labels = labels.pin_memory().to(device, non_blocking=True)
                sources = parse_sources(out["keys"][:n])
                keys = [key for _, key in sources]
                self._handed.update(keys)
                self._sources += sources
                k += 1
                self._pass = (epoch, k)
                yield (images, labels, keys) if self.spec.return_keys else (images, labels)
        finally:
            self._live = None
            if self._pass[1] < len(self):  # left early: the next pass is the next epoch, from its start
                self._pass = None

    def _open(self, epoch: int, checkpoint: str | None):
        """An iterator over a new pipeline for `epoch`: the rank's whole part (restored to
        `checkpoint` when given), or, once corrupt samples were skipped, what is left of it."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from pipeline.dali import READER

        self._live = None
        if self._excluded:
            pipe = build_pipeline(self.spec, epoch, Path(self._parts.name), skip=self._handed | self._excluded)
            policy = LastBatchPolicy.PARTIAL  # the skipped samples shorten the last batch
        else:
            pipe = build_pipeline(self.spec, epoch, Path(self._parts.name), checkpoint=checkpoint)
            policy = LastBatchPolicy.DROP if self.spec.train else LastBatchPolicy.PARTIAL
        self._live = DALIGenericIterator(pipe, ["images", "labels", "keys"], reader_name=READER,
                                         last_batch_policy=policy, auto_reset=False)
        return self._live

    def _check_part(self, epoch: int) -> None:
        """Before DALI reads a tar of this pass: one whose bytes differ from shards.parquet has
        its images decode-checked, and a corrupt one stops the pass here (on_corrupt="error")
        or is left out ("skip"). DALI 2.4's CPU pipeline can crash the process on an image it
        cannot decode, so corrupt samples must not reach it."""
        spec = self.spec
        parts = {i: (first, end) for i, first, end in spec.part_files(epoch)}
        for i in spec.data.unverified(list(parts)):
            tar = str(spec.data.tars[i])
            bad = find_corrupt(index_samples(spec.data.indexes[i], tar))  # the whole tar: ranks agree
            if not bad and spec.on_corrupt == "error":
                raise CorruptSample(f"{tar}: its bytes differ from shards.parquet (sha256) though its images "
                                    f"decode; run `python -m shards verify {spec.data.uri}` and re-pack it")
            if not bad:
                log.warning("%s: bytes differ from shards.parquet (sha256), every image decodes; reading it", tar)
            mine = {r.key for r in index_samples(spec.data.indexes[i], tar, *parts[i])}
            self._exclude([r for r in bad if r.key in mine and r.key not in self._excluded], epoch)

    def _exclude(self, bad: list, epoch: int) -> None:
        spec = self.spec
        if bad and spec.on_corrupt == "error":
            raise CorruptSample(f"{bad[0].tar}: sample {bad[0].key!r} does not decode (a corrupt image); check "
                                f"the set with `python -m shards verify {spec.data.uri}` and re-pack that shard, "
                                "or pass on_corrupt='skip' to leave such samples out")
        for ref in bad:
            log.warning("%s: skipping sample %r: it does not decode (a corrupt image)", ref.tar, ref.key)
            self.skipped.append({"shard": ref.tar, "key": ref.key, "epoch": epoch})
        self._excluded.update(r.key for r in bad)

    def _skip_corrupt(self, epoch: int, err: RuntimeError) -> None:
        """Name the sample(s) that broke the pipeline; raise (on_corrupt="error") or record
        them to be left out of the rest of the pass ("skip")."""
        spec = self.spec
        refs = [r for i, first, end in spec.part_files(epoch)
                for r in index_samples(spec.data.indexes[i], str(spec.data.tars[i]), first, end)]
        todo = [r for r in refs if r.key not in self._handed and r.key not in self._excluded]
        reach = spec.shuffle_buffer + (spec.prefetch + 3) * spec.batch_size  # what the reader may have read
        bad = find_corrupt(todo[:reach]) or find_corrupt(todo[reach:])
        if not bad:
            first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise RuntimeError(f"{spec.data.uri}: the DALI pipeline failed reading rank {spec.rank}'s part of "
                               f"epoch {epoch} ({first.strip()[:200]}); run `python -m shards verify "
                               f"{spec.data.uri}`") from err
        self._exclude(bad, epoch)

    def _backend_state(self) -> dict | str | None:
        """DALI's checkpoint of the pipeline after the last batch handed out (reader position
        and every random operator's state; train pipelines are built with checkpointing on).
        A pass that skipped corrupt samples is resumed from its keys instead."""
        if self._excluded:
            return None
        return self._live.checkpoints()[0] if self._live is not None and self.spec.train else None

    def _handed_positions(self) -> list[int]:
        """From (tar, key) to the position in the epoch's read order, through the part's indexes
        (read once per pass, at its first checkpoint)."""
        if not self._sources:
            return list(self._prior)
        if self._where is None:
            epoch, spec = self._pass[0], self.spec
            offsets, self._where = spec.tar_offsets(epoch), {}
            for i, first, end in spec.part_files(epoch):
                tar = str(spec.data.tars[i])
                lines = spec.data.indexes[i].read_text().splitlines()[1 + first: 1 + end]
                for j, line in enumerate(lines, start=first):
                    self._where[(tar, member_key(line.split(" ")[3]))] = offsets[i] + j
        return self._prior + [self._where[src] for src in self._sources]

    def state_dict(self) -> dict:
        state = super().state_dict()
        if state["batch"] and self._excluded:
            state.update(handed=sorted(self._handed), excluded=sorted(self._excluded))
        return state


def build_pipeline(spec: LoaderSpec, epoch: int, part_dir: Path | None = None,
                   checkpoint: str | None = None, skip: set[str] | None = None) -> "nvidia.dali.Pipeline":  # noqa: F821
    """The built DALI pipeline that reads `epoch` of `spec` (exposed for benchmarks).

    The reader is handed exactly this rank's part: the tars it touches, in the epoch's
    order, with the first and last one's index cut to the part's samples (written into
    `part_dir`), as one DALI shard. The tars outside the part need not be on this node.
    `skip`: keys left out (the rest of a pass after corrupt samples; reseeded)."""
    from pipeline import dali

    tars, indexes = [], []
    for i, first, end in spec.part_files(epoch):
        idx = spec.data.indexes[i]
        done = spec.done_rows(epoch, i)  # a resharded epoch: what the steps before the resize took
        if skip or done or (first, end) != (0, spec.data.counts[i]):
            part_dir = part_dir or Path(tempfile.mkdtemp(prefix="alexnet-part-"))
            tag = (f"-skip{len(skip)}" if skip else "") + (f"-w{spec.world_size}-s{spec.remainder.steps_done}"
                                                          if spec.resharded(epoch) else "")
            idx = write_part_index(idx, first, end, part_dir / f"e{epoch}-r{spec.rank}-t{i}{tag}.idx", skip, done)
            if idx is None:
                continue
        tars.append(str(spec.data.tars[i]))
        indexes.append(str(idx))
    common = dict(
        tars=tars, indexes=indexes, shard_id=0, num_shards=1,
        device="gpu" if spec.device == "cuda" else "cpu", crop_size=spec.crop_size,
        resize_to=spec.resize_to, mean=[255 * m for m in spec.stats.mean],
        std=[255 * s for s in spec.stats.std], dtype=spec.dtype,
        batch_size=spec.batch_size, num_threads=spec.num_threads,
        device_id=_device_id(spec), seed=spec.epoch_seed(epoch) + (len(skip) if skip else 0),
        prefetch_queue_depth=spec.prefetch, hw_decoder_load=spec.hw_decoder_load,
    )
    if spec.train:
        pipe = dali.train_pipeline(
            **common, crop=spec.crop, rrc_scale=spec.rrc_scale,
            lighting_matrix=spec.stats.lighting_matrix() if spec.lighting else None,
            initial_fill=spec.shuffle_buffer, enable_checkpointing=True, checkpoint=checkpoint,
        )
    elif spec.ten_crop:
        pipe = dali.ten_crop_pipeline(**common)
    else:
        pipe = dali.val_pipeline(**common)
    pipe.build()
    return pipe


def parse_labels(raw: torch.Tensor) -> torch.Tensor:
    """int64 [B] from the zero-padded ASCII decimal `.cls` bytes [B, L] of one batch."""
    codes = raw.to(torch.int64)
    digit = (codes >= 48) & (codes <= 57)
    other = ~digit & (codes != 0) & (codes != 32) & ((codes < 9) | (codes > 13))
    if other.any() or not digit.any(dim=1).all():
        bad = bytes(raw[(other.any(dim=1) | ~digit.any(dim=1)).nonzero()[0, 0]].tolist())
        raise ValueError(f"a .cls member is not an ASCII decimal label: {bad!r}; re-pack the shards")
    labels = torch.zeros(codes.shape[0], dtype=torch.int64)
    for j in range(codes.shape[1]):
        labels = torch.where(digit[:, j], labels * 10 + codes[:, j] - 48, labels)
    return labels


def parse_keys(raw: torch.Tensor) -> list[str]:
    """WebDataset keys from the zero-padded `source_info` bytes ("tar:offset:member") [B, L]."""
    return [key for _, key in parse_sources(raw)]


def parse_sources(raw: torch.Tensor) -> list[tuple[str, str]]:
    """(tar, key) of each sample from the zero-padded `source_info` bytes [B, L]."""
    out = []
    for row in raw.numpy():
        info = row.tobytes().rstrip(b"\0").decode()
        m = _SOURCE_INFO.match(info)
        out.append((m.group(1), member_key(m.group(3))) if m else ("", member_key(info)))
    return out


def _device_id(spec: LoaderSpec) -> int | None:
    if spec.device != "cuda":
        return None
    if spec.device_id is not None:
        return int(spec.device_id)
    return torch.cuda.current_device()  # a logical index: what Ray's CUDA_VISIBLE_DEVICES needs


def _torch_device(spec: LoaderSpec) -> torch.device:
    return torch.device("cuda", _device_id(spec)) if spec.device == "cuda" else torch.device("cpu")
