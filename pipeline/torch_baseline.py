"""The baseline: webdataset + PIL in a PyTorch DataLoader (`make_loader(..., backend="torch")`).

What a user would otherwise pick, kept as the yardstick of every speed claim and as a
fallback where DALI cannot be installed. Same chains as the DALI graphs
(`pipeline.torch_transforms`), same rank split, batch counts and exact-once val
(`pipeline.spec`, `pipeline.loaders.EpochLoader`): each rank's batches are dealt to the DataLoader workers in contiguous
runs, every worker reads only the tars its run touches and builds whole batches itself
(`batch_size=None` in the DataLoader), so the counts are exact whatever the worker count.
"""
from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import torch_transforms as T
from pipeline.corrupt import CorruptSample
from pipeline.loaders import EpochLoader
from pipeline.shardset import IMAGE_EXTS, LABEL_EXT
from pipeline.spec import LoaderSpec

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchLoader(EpochLoader):
    """One rank's baseline loader; see `pipeline.make_loader`. `num_threads` DataLoader
    worker processes (0: read in the calling process)."""

    def __iter__(self) -> Iterator[tuple]:
        spec = self.spec
        epoch = self._next_epoch()
        resume = self._take_resume(epoch)
        self._pass = (epoch, 0)
        if not len(self):
            return
        spec.stage(epoch)
        spec.data.check([i for i, _, _ in spec.part_files(epoch)])  # each tar's header and index, once per process
        workers = spec.num_threads
        before = spec.remainder.steps_done if spec.resharded(epoch) else 0  # steps of a resharded epoch
        start = resume["batch"] if resume else before
        self._positions = np.frombuffer(resume["positions"], np.int64).tolist() if resume else []
        data = RankBatches(spec, epoch, *resume_point(spec.num_batches - before, max(1, workers), start - before))
        loader = DataLoader(
            data, batch_size=None, num_workers=workers, pin_memory=spec.device == "cuda",
            prefetch_factor=spec.prefetch if workers else None,
        )
        device = torch.device(spec.device, spec.device_id) if spec.device == "cuda" else torch.device("cpu")
        done = start
        try:
            for images, labels, keys, bad, positions in loader:
                self._report(bad, epoch)
                self._positions += positions
                images = images.to(device, _DTYPES[spec.dtype], non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                done += 1
                self._pass = (epoch, done)
                yield (images, labels, keys) if spec.return_keys else (images, labels)
        finally:
            if self._pass[1] < len(self):
                self._pass = None

    def _handed_positions(self) -> list[int]:
        return list(self._positions)

    def _report(self, bad: list[tuple[str, str]], epoch: int) -> None:
        """Samples a worker could not decode: one line and stop (on_corrupt="error"), or a
        warning each and count them ("skip")."""
        if bad and self.spec.on_corrupt == "error":
            raise CorruptSample(f"{bad[0][0]}: sample {bad[0][1]!r} does not decode (a corrupt image); check the "
                                f"set with `python -m shards verify {self.spec.data.uri}` and re-pack that shard, "
                                "or pass on_corrupt='skip' to leave such samples out")
        for tar, key in bad:
            log.warning("%s: skipping sample %r: it does not decode (a corrupt image)", tar, key)
            self.skipped.append({"shard": tar, "key": key, "epoch": epoch})


def worker_runs(num_batches: int, workers: int) -> list[tuple[int, int]]:
    """[first, last) of the batches each DataLoader worker builds: contiguous runs."""
    return [(w * num_batches // workers, (w + 1) * num_batches // workers) for w in range(workers)]


def resume_point(num_batches: int, workers: int, done: int) -> tuple[list[int], int]:
    """After `done` batches of a pass: how many of its run each worker had handed out, and
    which worker hands out the next one. A DataLoader deals an IterableDataset's items round
    robin over its workers, skipping exhausted ones; a fresh one starts at worker 0, so the
    resumed pass rotates the workers' roles to continue the same sequence."""
    runs = [last - first for first, last in worker_runs(num_batches, workers)]
    consumed = [0] * workers
    order = [w for t in range(max(runs, default=0)) for w in range(workers) if runs[w] > t]
    for w in order[:done]:
        consumed[w] += 1
    return consumed, order[done] if done < len(order) else 0


class RankBatches(IterableDataset):
    """The batches of one rank in one epoch; inside a DataLoader worker, that worker's run.

    Each batch's augmentation draws from its own generator, seeded by (seed, epoch, rank,
    batch), and the shuffle buffer from the run's, so a resumed pass can skip the batches
    already trained (read, not decoded) and build the rest exactly as before."""

    def __init__(self, spec: LoaderSpec, epoch: int, consumed: list[int] | None = None, first_role: int = 0) -> None:
        self.spec, self.epoch = spec, epoch
        self.consumed, self.first_role = consumed, first_role

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        spec, info = self.spec, get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.first_role) % workers  # rotated on resume: see resume_point
        bounds = batch_bounds(spec, self.epoch)
        first, last = worker_runs(len(bounds), workers)[role]
        skip = self.consumed[role] if self.consumed else 0
        if first + skip >= last:
            return
        samples = self._read(bounds[first][0], bounds[last - 1][1],
                             np.random.default_rng([spec.seed, self.epoch, spec.rank, first]))
        chain = _chain(spec)
        for b in range(first, last):
            lo, hi, count = bounds[b]
            batch = list(itertools.islice(samples, count))
            if b < first + skip:
                continue
            rng = np.random.default_rng([spec.seed, self.epoch, spec.rank, b, 0xA06])
            good, bad = [], []
            for data, label, key, url, pos in batch:
                try:
                    good.append((_decode(data), label, key, pos))
                except Exception:  # PIL's many decode errors: the sample is corrupt
                    bad.append((url, key))
            images = np.stack([chain(img, rng) for img, *_ in good]) if good else \
                np.zeros((0, 3, spec.crop_size, spec.crop_size), np.float32)
            labels = torch.tensor([label for _, label, _, _ in good], dtype=torch.int64)
            yield (torch.from_numpy(images), labels, [key for _, _, key, _ in good], bad,
                   [pos for *_, pos in good])

    def _read(self, lo: int, hi: int, rng: np.random.Generator):
        """Samples [lo, hi) of this epoch's tar order as (image bytes, label, key, tar, position),
        less those a resharded epoch had already trained on, shuffled in a buffer in train
        (decoding is left to the batch that uses them)."""
        order = self.spec.tar_order(self.epoch)
        counts = [self.spec.data.counts[i] for i in order]
        starts = np.concatenate([[0], np.cumsum(counts)])
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left"))
        urls = [str(self.spec.data.tars[i]) for i in order[first:last]]
        stream = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
        stream = zip(itertools.islice(iter(stream), lo - int(starts[first]), hi - int(starts[first])),
                     itertools.count(lo))
        if self.spec.resharded(self.epoch):
            done = self.spec.remainder.done_mask(self.spec.data.num_samples)
            stream = ((sample, pos) for sample, pos in stream if not done[pos])
        if self.spec.train:
            stream = _buffer_shuffle(stream, self.spec.shuffle_buffer, rng)
        for sample, pos in stream:
            data = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
            yield data, int(sample[LABEL_EXT]), sample["__key__"], sample.get("__url__", ""), pos


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def batch_bounds(spec: LoaderSpec, epoch: int) -> list[tuple[int, int, int]]:
    """(lo, hi, count) of this rank's batches in `epoch`: the span [lo, hi) of the epoch's
    read order each one draws from and its sample count (a resharded epoch's spans hold
    samples trained before the resize, left out)."""
    pos, size = spec.positions(epoch), spec.batch_size
    n = spec.num_batches - (spec.remainder.steps_done if spec.resharded(epoch) else 0)
    out = []
    for b in range(n):
        run = pos[b * size: (b + 1) * size]
        out.append((int(run[0]), int(run[-1]) + 1, len(run)))
    return out


def _chain(spec: LoaderSpec):
    if not spec.train:
        cls = T.TenCrop if spec.ten_crop else T.Val
        return cls(spec.crop_size, spec.resize_to, spec.stats)
    if spec.crop == "rrc":
        return T.TrainRRC(spec.crop_size, spec.rrc_scale, spec.stats, spec.lighting)
    return T.TrainPaper(spec.crop_size, spec.resize_to, spec.stats, spec.lighting)


def _buffer_shuffle(items, size: int, rng: np.random.Generator):
    """Shuffle within a buffer of `size` items, as DALI's reader does with `initial_fill`."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
