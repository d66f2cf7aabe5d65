"""The GPU peers beside DALI `mixed` (`make gpu-check`'s `peers` step): nvImageCodec's batch
decode (`nvidia-nvimgcodec-cu12`) and SPDL's nvJPEG decode (`spdl.io.decode_image_nvjpeg`),
each followed by the same train work in torch on the GPU (RandomResizedCrop window of the
baseline's sampler, bilinear antialiased resize to the crop, flip p=0.5, normalise to float32
NCHW), against the product's DALI `mixed` train loader (rrc, no lighting) at the same batch and
crop, in interleaved rounds. The peers decode JPEG bytes held in memory (the same bytes the
loader reads from the tars). A peer whose wheel does not import is left out with its reason;
the step records which ran.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

RRC_SCALE = (0.08, 1.0)


def gpu_rrc(images: list, crop: int, rng: np.random.Generator, mean, std):
    """uint8 CHW CUDA tensors -> float32 [B, 3, crop, crop]: each image's RandomResizedCrop
    window resized (bilinear, antialiased), flipped with p=0.5, then the batch normalised."""
    import torch
    import torch.nn.functional as F

    from pipeline.torch_transforms import rrc_box

    out = []
    for img in images:
        _, h, w = img.shape
        left, top, right, bottom = rrc_box(w, h, RRC_SCALE, rng)
        x = img[:, top:bottom, left:right].unsqueeze(0).float()
        x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.flip(-1) if rng.random() < 0.5 else x)
    return (torch.cat(out) - mean) / std


def _cycle(blobs: list[bytes], batch: int) -> Iterator[list[bytes]]:
    i = 0
    while True:
        yield [blobs[(i + k) % len(blobs)] for k in range(batch)]
        i = (i + batch) % len(blobs)


def nvimgcodec_decode() -> Callable[[list[bytes]], list]:
    """Batch decode with nvImageCodec: a list of uint8 CHW CUDA tensors."""
    import torch
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder()

    def decode(chunk: list[bytes]) -> list:
        return [torch.as_tensor(img, device="cuda").permute(2, 0, 1) for img in decoder.decode(chunk)]

    return decode


def spdl_decode() -> Callable[[list[bytes]], list]:
    """SPDL's nvJPEG decode, one image at a time (its API): uint8 CHW CUDA tensors."""
    import spdl.io
    import torch

    config = spdl.io.cuda_config(device_index=torch.cuda.current_device())

    def decode(chunk: list[bytes]) -> list:
        return [spdl.io.to_torch(spdl.io.decode_image_nvjpeg(b, device_config=config)) for b in chunk]

    return decode


PEERS: dict[str, Callable[[], Callable[[list[bytes]], list]]] = {
    "nvimgcodec + torch rrc": nvimgcodec_decode,
    "spdl nvjpeg + torch rrc": spdl_decode,
}


def peer_source(name: str, decode: Callable[[list[bytes]], list], blobs: list[bytes], batch: int, crop: int,
                stats):
    """A `bench.timing.Source`: decode a batch, run the train work, synchronise."""
    import torch

    from bench.timing import Source

    mean = torch.tensor(stats.mean, device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor(stats.std, device="cuda").view(1, 3, 1, 1) * 255

    def run() -> Iterator[tuple[int, bool]]:
        rng = np.random.default_rng(0)
        for chunk in _cycle(blobs, batch):
            out = gpu_rrc(decode(chunk), crop, rng, mean, std)
            torch.cuda.synchronize()
            yield out.shape[0], True

    return Source(name, run, 0, {"kind": "gpu peer"})


def measure(shards_dir: Path, batch: int, crop: int, threads: int, images: int, warmup: int, window: int,
            repeats: int, progress=print) -> dict:
    """{"loaders": timed figures by name, "skipped": {peer: why}, "dali_over": ratios}."""
    from bench.decode import load_jpegs
    from bench.figures import ratio
    from bench.timing import loader_source, measure_interleaved
    from pipeline import make_loader
    from pipeline.stats import read_stats

    stats = read_stats(shards_dir)
    blobs = load_jpegs(Path(shards_dir), limit=images)
    sources, skipped = [], {}
    for name, make in PEERS.items():
        try:
            sources.append(peer_source(name, make(), blobs, batch, crop, stats))
        except Exception as err:  # noqa: BLE001  a peer that does not import or start is left out, with why
            skipped[name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if not sources:
        return {"loaders": {}, "skipped": skipped, "dali_over": {}}
    dali = make_loader(str(shards_dir), "train", batch_size=batch, device="cuda", crop_size=crop, crop="rrc",
                       lighting=False, num_threads=threads, seed=0)
    sources.insert(0, loader_source("dali mixed rrc", dali, 0, {"kind": "loader"}))
    timed = measure_interleaved(sources, warmup, window, repeats, progress=progress)
    over = {n: ratio(timed["dali mixed rrc"]["images_per_s"], t["images_per_s"])
            for n, t in timed.items() if n != "dali mixed rrc"}
    return {"loaders": timed, "skipped": skipped, "dali_over": over, "batch": batch, "crop": crop,
            "threads": threads}
