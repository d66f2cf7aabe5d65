"""Where DALI CPU spends its time: the train graph cut after each stage, timed alone.

Each stage adds one step to the one before, so the drop in images/s from one line to the next
is the cost of that step: read -> keys -> decode (whole image, or only the random-crop
window) -> resize to the crop -> flip + normalise to float CHW -> PCA lighting. The graphs
copy the operators of `pipeline.dali.train_pipeline`; the last `rrc` line is that graph,
so the gap between it and the `make_loader` figure is the hand-over to torch (batch copy,
label and key parsing). The bench times these beside the loaders, in the same rounds.
"""
from __future__ import annotations

from pathlib import Path

PROFILE_STAGES = (
    "read",  # readers.webdataset alone: .jpg and .cls bytes
    "read+keys",  # + the sample keys (source_info) and labels padded per batch, as the loader reads them
    "read+decode",  # + the whole image decoded (what `paper` and val decode)
    "read+roi_decode",  # + only the RandomResizedCrop window decoded
    "rrc: roi_decode+resize",  # + the window resized to the crop (antialiased, DALI's default)
    "rrc: +flip+normalize",  # + crop_mirror_normalize to float CHW
    "rrc: +lighting+keys (loader graph)",  # + PCA lighting as a per-sample mean, and the keys
    "paper: decode+resize+crop+flip+normalize",  # the `paper` policy, without lighting
)
# Values do not change the cost; ImageNet's, in pixel units.
_MEAN = [123.675, 116.28, 103.53]
_STD = [58.395, 57.12, 57.375]
_LIGHTING = [-0.5675 * 0.2175 * 255, 0.7192 * 0.0188 * 255, 0.4009 * 0.0045 * 255,
             -0.5808 * 0.2175 * 255, -0.0045 * 0.0188 * 255, -0.8140 * 0.0045 * 255,
             -0.5836 * 0.2175 * 255, -0.6948 * 0.0188 * 255, 0.4203 * 0.0045 * 255]


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

    if stage not in PROFILE_STAGES:
        raise ValueError(f"profile stage {stage!r}: choose one of {', '.join(PROFILE_STAGES)}")
    tars, idx = _tars(shards_dir, split)
    base = round(crop * 256 / 224)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    def graph():
        jpeg, label = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg", "cls"],
                                            random_shuffle=True, initial_fill=1024, name="Reader")
        if stage == "read":
            return jpeg, label
        keys = fn.pad(fn.get_property(jpeg, key="source_info"), fill_value=0)
        label = fn.pad(label, fill_value=0)
        if stage == "read+keys":
            return jpeg, label, keys
        if stage == "read+decode":
            return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB), label
        if stage.startswith("paper"):
            images = fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)
            images = fn.crop(fn.resize(images, resize_shorter=base), crop=(base, base))
            return fn.crop_mirror_normalize(
                images, crop=(crop, crop), crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                crop_pos_y=fn.random.uniform(range=[0.0, 1.0]), mirror=fn.random.coin_flip(probability=0.5),
                mean=_MEAN, std=_STD, dtype=types.FLOAT, output_layout="CHW"), label
        images = fn.decoders.image_random_crop(jpeg, device="cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        if stage == "read+roi_decode":
            return images, label
        images = fn.resize(images, size=[crop, crop])
        if stage == "rrc: roi_decode+resize":
            return images, label
        mean = _MEAN
        if "lighting" in stage:
            alpha = fn.random.normal(shape=[1, 3], stddev=0.1)
            mean = fn.reshape(fn.coord_transform(alpha, M=[-m for m in _LIGHTING], T=_MEAN), shape=[3])
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5), mean=mean,
                                          std=_STD, dtype=types.FLOAT, output_layout="CHW")
        return (images, label, keys) if "keys" in stage else (images, label)

    pipe = graph()
    pipe.build()
    return pipe


