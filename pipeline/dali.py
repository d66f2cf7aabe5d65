"""The DALI graphs: one `@pipeline_def` per split, each stating its whole chain.

One graph, two devices: `device="gpu"` decodes with the `mixed` decoder (nvJPEG, the
hardware decoder where there is one) and augments on the GPU; `device="cpu"` is the same
graph with CPU operators (build it with `device_id=None`). Every pipeline returns
`(images, raw_labels, raw_keys)`: images float CHW normalised; the `.cls` bytes and the
reader's `source_info` bytes, zero-padded per batch, parsed in one vectorised step per
batch by `pipeline.loader` (no python_function on the hot path).

Normalisation and lighting run in pixel units (0..255): `mean`/`std` are the stats' [0, 1]
values times 255. PCA lighting needs no custom operator: the per-image RGB offset
`M @ alpha` (M = 255 * eigvec * eigval, alpha ~ N(0, 0.1) per image) is folded into a
per-sample `mean` of `crop_mirror_normalize`, since (x + offset - mean) = (x - (mean - offset)).
"""
from __future__ import annotations

from collections.abc import Sequence

from nvidia.dali import fn, pipeline_def, types

READER = "Reader"  # the iterator finds the epoch size through this name
RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
LIGHTING_STD = 0.1
# Ten-crop views of the centre square: four corners and the centre (crop_pos_x, crop_pos_y).
FIVE_CROPS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT16}


def _read(tars, indexes, shard_id, num_shards, shuffle, initial_fill=1024):
    """Images and labels of this rank's part; val pads its part with stick_to_shard so every
    epoch restarts at the part's first sample (the loader trims the padding)."""
    jpegs, cls = fn.readers.webdataset(
        paths=list(tars), index_paths=list(indexes), ext=["jpg", "cls"], name=READER,
        shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle,
        initial_fill=initial_fill, pad_last_batch=not shuffle, stick_to_shard=not shuffle,
        missing_component_behavior="error",
    )
    keys = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
    return jpegs, fn.pad(cls, fill_value=0), keys


def _lit_mean(mean: Sequence[float], lighting_matrix: Sequence[float]):
    """Per-image `mean - M @ alpha`: PCA lighting as a per-sample normalisation mean."""
    alpha = fn.random.normal(shape=[1, 3], stddev=LIGHTING_STD)
    shifted = fn.coord_transform(alpha, M=[-m for m in lighting_matrix], T=list(mean))
    return fn.reshape(shifted, shape=[3])


@pipeline_def
def train_pipeline(tars, indexes, shard_id, num_shards, *, device, crop, crop_size, resize_to,
                   rrc_scale, mean, std, lighting_matrix, dtype, initial_fill=1024):
    """read (shuffled) -> decode + crop (`rrc` or `paper`) -> flip p=0.5 -> PCA lighting -> normalise."""
    jpegs, labels, keys = _read(tars, indexes, shard_id, num_shards, True, initial_fill)
    decoder = "mixed" if device == "gpu" else "cpu"
    window = {}
    if crop == "rrc":  # ROI decoding: only the random window is decoded
        images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                               random_area=list(rrc_scale),
                                               random_aspect_ratio=list(RRC_RATIO))
        images = fn.resize(images, size=[crop_size, crop_size])
    else:  # paper: the central resize_to square, then a random crop_size patch of it
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        images = fn.crop(fn.resize(images, resize_shorter=resize_to), crop=(resize_to, resize_to))
        window = dict(crop=(crop_size, crop_size), crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                      crop_pos_y=fn.random.uniform(range=[0.0, 1.0]))
    images = fn.crop_mirror_normalize(
        images, **window, mirror=fn.random.coin_flip(probability=0.5),
        mean=_lit_mean(mean, lighting_matrix) if lighting_matrix else list(mean), std=list(std),
        dtype=DTYPES[dtype], output_layout="CHW")
    return images, labels, keys


@pipeline_def
def val_pipeline(tars, indexes, shard_id, num_shards, *, device, crop_size, resize_to, mean, std,
                 dtype):
    """read (in order) -> decode -> resize shorter side to `resize_to` -> centre crop -> normalise."""
    jpegs, labels, keys = _read(tars, indexes, shard_id, num_shards, False)
    images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu",
                               output_type=types.RGB)
    images = fn.resize(images, resize_shorter=resize_to)
    images = fn.crop_mirror_normalize(images, crop=(crop_size, crop_size), mean=list(mean),
                                      std=list(std), dtype=DTYPES[dtype], output_layout="CHW")
    return images, labels, keys


@pipeline_def
def ten_crop_pipeline(tars, indexes, shard_id, num_shards, *, device, crop_size, resize_to, mean,
                      std, dtype):
    """The paper's test protocol: the four corners and the centre of the central `resize_to`
    square, then the same five mirrored: images [10, 3, crop, crop] per sample."""
    jpegs, labels, keys = _read(tars, indexes, shard_id, num_shards, False)
    images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu",
                               output_type=types.RGB)
    images = fn.crop(fn.resize(images, resize_shorter=resize_to), crop=(resize_to, resize_to))
    views = [
        fn.crop_mirror_normalize(images, crop=(crop_size, crop_size), crop_pos_x=x, crop_pos_y=y,
                                 mirror=flip, mean=list(mean), std=list(std),
                                 dtype=DTYPES[dtype], output_layout="CHW")
        for flip in (0, 1) for x, y in FIVE_CROPS
    ]
    return fn.stack(*views), labels, keys
