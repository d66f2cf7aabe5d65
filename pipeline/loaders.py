"""The loader classes: `EpochLoader`, what both backends share (length, epochs, documented
properties, resumable state), and `DaliLoader`, the product's; the baseline's `TorchLoader`
is in `pipeline.torch_baseline`. `make_loader` (`pipeline.factory`) builds them.

    loader = make_loader(shards_dir, split="train", batch_size=256, rank=r, world_size=w,
                         device="cuda", backend="dali", crop_size=224, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)          # optional: passes count on by themselves
        for images, labels in loader: ...

Each pass over a DALI loader is one epoch and builds a fresh DALI pipeline for it (a few ms
after the first one in a process), seeded by (seed, epoch, rank): epochs reshuffle,
a resumed run reproduces the epochs it re-reads, and leaving a pass early (a `break`)
leaves nothing behind for the next one. Its reader gets exactly the rank's part of the
epoch (the tars it touches, the end ones' indexes cut to the part), so a remote set only
needs that part staged on the node (`pipeline.staging`).
"""
from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.builder import build_pipeline, device_id
from pipeline.corrupt import CorruptSample, find_corrupt, index_samples
from pipeline.remainder import Remainder, positions_bytes
from pipeline.spec import LoaderSpec
from shards.index import member_key

log = logging.getLogger(__name__)
_SOURCE_INFO = re.compile(r"^(.*?):(\d+):(.*)$", re.S)


class EpochLoader:
    """What both backends' loaders share: `len()`, `num_samples`, the epoch counter (each
    pass over the loader reads `epoch`, then counts it on; `set_epoch` sets it), and where
    the loader stands (`state_dict` / `load_state_dict`): the pass, the batches it has handed
    out, and the backend's own state to continue exactly there (DALI: the pipeline's
    checkpoint; the baseline: its deterministic position), so a resumed run reads the same
    samples with the same augmentation as an uninterrupted one."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = self._base = spec
        self.epoch = spec.epoch
        self._pass: tuple[int, int] | None = None  # (epoch, batches handed out) while a pass runs
        self._resume: dict | None = None
        self._skipped: list[dict] = []
        self._tuning: dict | None = None

    def __len__(self) -> int:
        return self.spec.num_batches

    @property
    def dataset_size(self) -> int:
        """Samples in the whole split, all ranks together."""
        return self.spec.data.num_samples

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (train: its full batches; val: its whole part)."""
        return self.spec.num_samples

    @property
    def skipped(self) -> list[dict]:
        """Corrupt samples left out so far (on_corrupt="skip"), one dict each: `shard`, `key`,
        `epoch`; it only grows, so a caller counts a pass's skips as the difference."""
        return self._skipped

    @property
    def settings(self) -> dict[str, Any]:
        """The decoding settings in effect, after any "auto" tuning: `num_threads` (DALI threads,
        or the baseline's DataLoader workers) and `hw_decoder_load` (None: DALI's default)."""
        return {"num_threads": self.spec.num_threads, "hw_decoder_load": self.spec.hw_decoder_load}

    @property
    def tuning(self) -> dict | None:
        """What the "auto" settings chose and measured (`pipeline.tuning.tune`'s report: tuned,
        chosen, probes, seconds, budget_s), or None where nothing was tuned."""
        return self._tuning

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _next_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.spec.remainder is not None and self.spec.remainder.epoch != epoch:
            self.spec = self._base  # a resharded epoch is over: the next ones read whole parts
        return epoch

    def reshard(self, remainder: Remainder) -> None:
        """The next pass reads what is left of epoch `remainder.epoch` after a resize, this
        rank's run of it (`pipeline.remainder`); `len()` counts the steps taken before it."""
        self.spec = replace(self._base, remainder=remainder)
        self.epoch, self._resume = remainder.epoch, None

    def _shape(self) -> dict:
        s = self.spec
        return {"rank": s.rank, "world_size": s.world_size, "batch_size": s.batch_size, "seed": s.seed,
                "samples": s.data.num_samples, "backend": type(self).__name__}

    def state_dict(self) -> dict:
        """Where the loader stands: `epoch` (the pass to read next, or the one under way) and
        `batch` (the batches of it already handed out), with the backend's state."""
        if self._pass is None or self._pass[1] >= len(self):
            epoch = self._pass[0] + 1 if self._pass is not None else self.epoch
            return {**self._shape(), "epoch": epoch, "batch": 0, "backend_state": None}
        epoch, batch = self._pass
        state = {**self._shape(), "epoch": epoch, "batch": batch, "backend_state": self._backend_state(),
                 "positions": positions_bytes(self._handed_positions())}  # what a resize needs
        if self.spec.resharded(epoch):
            state["remainder"] = self.spec.remainder.to_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (of a loader of the same shape: rank, world size, batch size,
        seed, sample count); the next pass resumes that epoch at that batch."""
        mine = self._shape()
        differ = [k for k in mine if state.get(k) != mine[k]]
        if differ:
            raise ValueError(f"loader state is for {', '.join(f'{k}={state.get(k)!r}' for k in differ)}, this loader "
                             f"has {', '.join(f'{k}={mine[k]!r}' for k in differ)}: a saved reader position is only "
                             "valid for the same sharding")
        self.epoch = int(state["epoch"])
        self._resume = state if state["batch"] else None
        remainder = Remainder.from_dict(state.get("remainder"))
        self.spec = replace(self._base, remainder=remainder) if remainder is not None else self._base

    def _take_resume(self, epoch: int) -> dict | None:
        resume, self._resume = self._resume, None
        return resume if resume is not None and resume["epoch"] == epoch else None

    def _backend_state(self):
        return None

    def _handed_positions(self) -> list[int]:
        """Positions (in the epoch's read order) of the samples handed out in the pass under way."""
        raise NotImplementedError


class DaliLoader(EpochLoader):
    """One rank's DALI loader; see `make_loader`."""

    def __init__(self, spec: LoaderSpec, tuning: dict | None = None) -> None:
        super().__init__(spec)
        self._tuning = tuning  # what `make_loader` probed for the "auto" settings of `spec`
        self._parts = tempfile.TemporaryDirectory(prefix="alexnet-part-")  # this rank's part indexes
        self._live = None  # the iterator of the pass under way
        self._handed: set[str] = set()  # keys handed out in the pass under way
        self._excluded: set[str] = set()  # corrupt keys skipped in the pass under way
        self._failed: list = []  # pipelines a decode error broke
        self._prior: list[int] = []  # positions handed out before the restart this pass resumed from
        self._sources: list[tuple[str, str]] = []  # (tar, key) of each sample handed out since
        self._where: dict[tuple[str, str], int] | None = None  # (tar, key) -> position, once per pass
        self._tars_checked: set[int] = set()  # tars of the pass under way whose images were decode-checked
        self._part_tars: list[int] = []  # the tars of the pass under way

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
        device = torch_device(self.spec)
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
                if self._check_hashes(epoch):  # raises with on_corrupt="error"
                    self._failed.append(it)
                    it = self._open(epoch, None)  # the rest of the pass without the samples found
                    continue
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

        from pipeline.dali import READER  # DALI itself is imported where a pipeline is built

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
        """Before DALI reads a tar of this pass: one known to differ from shards.parquet (its
        size, or a sha256 the background hasher found wrong) has its images decode-checked,
        and a corrupt one stops the pass here (on_corrupt="error") or is left out ("skip").
        The other tars are hashed in the background while the pass reads them
        (`pipeline.integrity`); `_check_hashes` acts on what that finds between batches."""
        self._tars_checked, self._part_tars = set(), [i for i, _, _ in self.spec.part_files(epoch)]
        self.spec.data.check(self._part_tars)  # each tar's header and index, once per process
        self._check_tars(epoch, self.spec.data.unverified(self._part_tars))

    def _check_hashes(self, epoch: int) -> bool:
        """Between batches: tars of this pass whose background sha256 came out wrong are
        checked as `_check_part` checks them; True when that left samples out (the pipeline
        must be rebuilt without them)."""
        found = [i for i in self.spec.data.hash_failures(self._part_tars) if i not in self._tars_checked]
        before = len(self._excluded)
        self._check_tars(epoch, found)
        return len(self._excluded) > before

    def _check_tars(self, epoch: int, tar_ids: list[int]) -> None:
        spec = self.spec
        parts = {i: (first, end) for i, first, end in spec.part_files(epoch)}
        for i in tar_ids:
            self._tars_checked.add(i)
            tar = str(spec.data.tars[i])
            bad = find_corrupt(index_samples(spec.data.indexes[i], tar))  # the whole tar: ranks agree
            if not bad and spec.on_corrupt == "error":
                raise CorruptSample(f"{tar}: its bytes differ from shards.parquet (size or sha256) though its images "
                                    f"decode; run `python -m shards verify {spec.data.uri}` and re-pack it")
            if not bad:
                log.warning("%s: bytes differ from shards.parquet (size or sha256), every image decodes; reading it",
                            tar)
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
                for j, entry in enumerate(spec.data.entries(i, first, end), start=first):
                    self._where[(tar, entry.key)] = offsets[i] + j
        return self._prior + [self._where[src] for src in self._sources]

    def state_dict(self) -> dict:
        state = super().state_dict()
        if state["batch"] and self._excluded:
            state.update(handed=sorted(self._handed), excluded=sorted(self._excluded))
        return state


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


def parse_sources(raw: torch.Tensor) -> list[tuple[str, str]]:
    """(tar, key) of each sample from the zero-padded `source_info` bytes [B, L]."""
    out = []
    for row in raw.numpy():
        info = row.tobytes().rstrip(b"\0").decode()
        m = _SOURCE_INFO.match(info)
        out.append((m.group(1), member_key(m.group(3))) if m else ("", member_key(info)))
    return out


def torch_device(spec: LoaderSpec) -> torch.device:
    return torch.device("cuda", device_id(spec)) if spec.device == "cuda" else torch.device("cpu")
