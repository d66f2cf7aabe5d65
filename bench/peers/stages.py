"""Where the decoding peers spend their CPU, stage by stage, on one thread: the same JPEGs
decoded by PIL (libjpeg-turbo, as the torch baseline, LitData and, with SIMD resizes,
pillow-simd) and by SPDL (FFmpeg's mjpeg decoder), each stage adding one step to the last:
decode alone, + the RGB conversion (SPDL: FFmpeg's `format=rgb24` filter; PIL's decoder
converts while decoding), + the rrc window cropped and resized to the crop, + the float
normalisation. CPU seconds of the process per image (`time.process_time`: FFmpeg and torch
may use threads of their own), median of 3 passes, the stages called one image at a time.

    python -m bench.peers.stages SHARDS_DIR [IMAGES] [CROP]   # prints JSON; run with SPDL's environment
"""
from __future__ import annotations

import io
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from bench.peers.transforms import RRC_SCALE, rrc_filter
from pipeline.torch_transforms import Normalise, rrc_box


def per_image_ms(work: Callable[[bytes, np.random.Generator], object], blobs: list[bytes], passes: int = 3) -> float:
    runs = []
    for _ in range(passes):
        rng = np.random.default_rng(0)
        start = time.process_time()
        for b in blobs:
            work(b, rng)
        runs.append((time.process_time() - start) * 1000 / len(blobs))
    return round(statistics.median(runs), 3)


def pil_stages(crop: int, normalise: Normalise) -> dict[str, Callable]:
    from PIL import Image

    def decode(b, rng):
        return Image.open(io.BytesIO(b)).convert("RGB")

    def window(b, rng):
        img = decode(b, rng)
        return img.resize((crop, crop), Image.BILINEAR, box=rrc_box(img.width, img.height, RRC_SCALE, rng))

    return {"pil: decode (RGB)": decode, "pil: + rrc crop+resize": window,
            "pil: + normalise (float CHW)": lambda b, rng: normalise(np.asarray(window(b, rng)), rng)}


def spdl_stages(crop: int, normalise: Normalise) -> dict[str, Callable]:
    import spdl.io

    def decode(b, rng):
        return spdl.io.decode_packets(spdl.io.demux_image(b), filter_desc=None)

    def rgb(b, rng):
        return spdl.io.decode_packets(spdl.io.demux_image(b), filter_desc="format=pix_fmts=rgb24")

    def window(b, rng):
        packets = spdl.io.demux_image(b)
        return spdl.io.decode_packets(packets, filter_desc=rrc_filter(packets.width, packets.height, crop,
                                                                       RRC_SCALE, rng))

    def full(b, rng):
        pixels = spdl.io.to_numpy(spdl.io.convert_frames(window(b, rng)))
        return normalise(pixels, rng)

    return {"spdl: decode (YUV, no filter)": decode, "spdl: + rgb24 filter": rgb,
            "spdl: + rrc crop+scale+flip filter": window, "spdl: + normalise (float CHW)": full}


def main(argv: list[str] | None = None) -> int:
    from bench.decode import load_jpegs
    from pipeline.stats import read_stats

    argv = sys.argv[1:] if argv is None else argv
    shards, images = argv[0], int(argv[1]) if len(argv) > 1 else 128
    crop = int(argv[2]) if len(argv) > 2 else 224
    blobs = load_jpegs(shards, limit=images)
    normalise = Normalise(read_stats(shards), lighting=False)
    out = {"images": len(blobs), "crop": crop, "unit": "CPU ms per image, called from 1 thread", "stages": {}}
    for name, work in pil_stages(crop, normalise).items():
        out["stages"][name] = per_image_ms(work, blobs)
    try:
        for name, work in spdl_stages(crop, normalise).items():
            out["stages"][name] = per_image_ms(work, blobs)
    except (ImportError, RuntimeError) as err:  # not installed, or FFmpeg's libraries missing
        out["spdl"] = f"not measured: {str(err).splitlines()[0][:300]}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
