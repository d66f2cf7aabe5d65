"""SPDL's recommended CPU pipeline on the shard set: a source of samples read with SPDL's tar
parser (`spdl.io.iter_tarfile`), per-image decode + crop/resize/flip in FFmpeg
(`spdl.io.demux_image` + `decode_packets` with a filter) on SPDL's thread pool at
`concurrency=threads`, `aggregate(batch_size)`, one collate stage (`spdl.io.convert_frames`
into one uint8 batch, then normalised in torch), and a sink `prefetch` batches deep; the
pipeline is built with `num_threads=threads`. Train: tar order permuted per epoch and samples
shuffled in a 1024-sample buffer (as the product's loaders), full batches only; val: every
sample once, in order.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bench.peers.tars import group_samples
from bench.peers.transforms import RRC_SCALE, BatchNormalise, rrc_filter, val_filter
from pipeline.stats import Stats


class SpdlLoader:
    """One rank's batches `(images, labels)` (or with keys) per `iter()`, as `make_loader`'s."""

    def __init__(self, tars: list[Path], counts: list[int], split: str, batch_size: int, crop_size: int,
                 threads: int, stats: Stats, base: int, seed: int = 0, return_keys: bool = False,
                 prefetch: int = 2, shuffle_buffer: int = 1024) -> None:
        self.tars, self.split, self.batch_size, self.crop = list(tars), split, batch_size, crop_size
        self.threads, self.base, self.seed, self.return_keys = threads, base, seed, return_keys
        self.prefetch, self.shuffle_buffer = prefetch, shuffle_buffer
        self.normalise = BatchNormalise(stats)
        total = sum(counts)
        self.num_samples = total // batch_size * batch_size if split == "train" else total
        self.epoch = 0
        self.settings = {"threads": threads, "decode_concurrency": threads, "collate_concurrency": 1,
                         "sink_buffer": prefetch, "output_order": "completion", "shuffle_buffer": shuffle_buffer,
                         "decoder": "FFmpeg mjpeg via spdl.io (1 thread per image)", "resize": "swscale bilinear",
                         "normalise": "torch, whole batch"}

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _samples(self, epoch: int) -> Iterator[tuple[str, bytes, int, tuple[int, int]]]:
        """(key, JPEG bytes, label, (epoch, read position): the sample's seed) in this epoch's order."""
        import spdl.io

        rng = np.random.default_rng([self.seed, epoch])
        train = self.split == "train"
        order = rng.permutation(len(self.tars)) if train else range(len(self.tars))
        buffer: list = []
        n = 0
        for t in order:
            with open(self.tars[t], "rb") as f:
                for key, data, label in group_samples(spdl.io.iter_tarfile(f)):
                    item = (key, data, label, (epoch, n))
                    n += 1
                    if not train:
                        yield item
                        continue
                    buffer.append(item)
                    if len(buffer) >= self.shuffle_buffer:
                        i = int(rng.integers(len(buffer)))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, item: tuple[str, bytes, int, tuple[int, int]]):
        import spdl.io

        key, data, label, (epoch, n) = item
        packets = spdl.io.demux_image(data)
        if self.split == "train":
            rng = np.random.default_rng([self.seed, epoch, n])
            desc = rrc_filter(packets.width, packets.height, self.crop, RRC_SCALE, rng)
        else:
            desc = val_filter(packets.width, packets.height, self.crop, self.base)
        return spdl.io.decode_packets(packets, filter_desc=desc), label, key

    def _collate(self, items: list) -> tuple:
        import spdl.io

        pixels = torch.from_numpy(spdl.io.to_numpy(spdl.io.convert_frames([f for f, _, _ in items])))
        images = self.normalise(pixels)
        labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
        return (images, labels, [k for *_, k in items]) if self.return_keys else (images, labels)

    def __iter__(self) -> Iterator[tuple]:
        from spdl.pipeline import PipelineBuilder

        epoch, self.epoch = self.epoch, self.epoch + 1
        pipeline = (PipelineBuilder()
                    .add_source(self._samples(epoch))
                    .pipe(self._decode, concurrency=self.threads)
                    .aggregate(self.batch_size, drop_last=self.split == "train")
                    .pipe(self._collate)
                    .add_sink(self.prefetch)
                    .build(num_threads=self.threads))
        with pipeline.auto_stop():
            yield from pipeline.get_iterator()
