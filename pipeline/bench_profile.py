"""Where DALI CPU spends its time: the train graph cut after each stage, timed alone.

Each stage adds one step to the one before, so the drop in images/s from one line to the next
is the cost of that step: read -> decode (whole image, or only the random-crop window) ->
resize to the crop -> flip + normalise to float CHW. The loader itself (`make_loader`) adds
PCA lighting and the hand-over to torch; the bench times it beside these lines.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.bench_stats import figure

STAGES = ("read", "read+decode", "read+roi_decode", "read+roi_decode+resize",
          "read+roi_decode+resize+normalize", "read+decode+paper_crop+normalize")


def _tars(shards_dir: Path, split: str) -> tuple[list[str], list[str] | None]:
    tars = sorted(str(p) for p in (Path(shards_dir) / split).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{Path(shards_dir) / split}: no .tar shards to profile")
    idx = [t[:-4] + ".idx" for t in tars]
    return tars, idx if all(Path(i).is_file() for i in idx) else None


def build_stage(stage: str, shards_dir: Path, batch_size: int, threads: int, crop: int,
                split: str = "train"):
    """A DALI CPU pipeline (device_id None) that stops after `stage`."""
    from nvidia.dali import fn, pipeline_def, types

    if stage not in STAGES:
        raise ValueError(f"profile stage {stage!r}: choose one of {', '.join(STAGES)}")
    tars, idx = _tars(shards_dir, split)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    def graph():
        jpeg, label = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg", "cls"],
                                            dtypes=[types.UINT8, types.UINT8], random_shuffle=True,
                                            initial_fill=256, name="Reader")
        if stage == "read":
            return jpeg, label
        if "roi_decode" in stage:
            images = fn.decoders.image_random_crop(jpeg, device="cpu", output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        else:
            images = fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)
        if stage in ("read+decode", "read+roi_decode"):
            return images, label
        if "paper_crop" in stage:
            images = fn.crop(images, crop=[256, 256], out_of_bounds_policy="pad")
            return fn.crop_mirror_normalize(
                images, crop=[crop, crop], crop_pos_x=fn.random.uniform(range=[0, 1]),
                crop_pos_y=fn.random.uniform(range=[0, 1]), mirror=fn.random.coin_flip(),
                dtype=types.FLOAT, output_layout="CHW", mean=[124.0, 116.0, 104.0], std=[58.0, 57.0, 57.0]), label
        images = fn.resize(images, resize_x=crop, resize_y=crop, antialias=False)
        if stage == "read+roi_decode+resize":
            return images, label
        return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), dtype=types.FLOAT,
                                        output_layout="CHW", mean=[124.0, 116.0, 104.0],
                                        std=[58.0, 57.0, 57.0]), label

    pipe = graph()
    pipe.build()
    return pipe


def stage_rate(stage: str, shards_dir: Path, batch_size: int, threads: int, crop: int,
               warmup: int, batches: int, repeats: int) -> dict:
    """Images/s of one stage: `repeats` windows of `batches` runs after `warmup` runs."""
    pipe = build_stage(stage, shards_dir, batch_size, threads, crop)
    for _ in range(warmup):
        pipe.run()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        runs.append(batches * batch_size / (time.perf_counter() - start))
    del pipe
    return figure(runs)
