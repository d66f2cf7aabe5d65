"""The DALI graphs: one `@pipeline_def` per split, each stating its whole chain.

One graph, two devices: `device="gpu"` decodes with the `mixed` decoder (nvJPEG, the
hardware decoder where there is one) and augments on the GPU; `device="cpu"` is the same
graph with CPU operators (build it with `device_id=None`). Every pipeline returns
`(images, raw_labels, raw_keys)`: images float CHW normalised; the `.cls` bytes and the
reader's `source_info` bytes, zero-padded per batch, parsed in one vectorised step per
batch by `pipeline.loaders` (no python_function on the hot path).

On the GPU the `mixed` decoder splits each batch's JPEGs between the hardware JPEG decoder
and nvJPEG's CUDA path (Huffman decoding on DALI's CPU threads): `hw_decoder_load` is the
hardware's share (None: DALI's default, 0.65; `pipeline.tuning` probes it for "auto").

On the CPU, resizing is the costliest step (measured: decoding plus a shorter-side resize
that changes nothing runs at a third of the rate of decoding alone), and shards from our
packer are already stored at the side the crops are cut from. So the CPU graphs check each
image's stored size in its JPEG header (`peek_image_shape`, no decoding) and, per sample
(DALI conditionals), decode only the crop window (ROI decoding) where no resize is needed;
other images take the resize path. On the GPU, resizing is cheap and the graphs resize
every image as DALI's own examples do.

Normalisation and lighting run in pixel units (0..255): `mean`/`std` are the stats' [0, 1]
values times 255. PCA lighting needs no custom operator: the per-image RGB offset
`M @ alpha` (M = 255 * eigvec * eigval, alpha ~ N(0, 0.1) per image) is folded into a
per-sample `mean` of `crop_mirror_normalize`, since (x + offset - mean) = (x - (mean - offset)).

The graphs are chains of public steps, called inside a `@pipeline_def` on DALI nodes:
`read_samples` -> `decode_rrc` (= `decode_rrc_window` + resize) or `decode_paper` (train),
`decode_centre` (val, ten-crop) -> `crop_mirror_normalize`. The per-stage profile
(`bench.loader.profile`) cuts the train graph after each of these same steps, so it times
what the loader runs.
"""
from __future__ import annotations

from collections.abc import Sequence

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.pipeline import DataNode
except ImportError as err:  # DALI is an extra: one build per CUDA major
    raise ImportError(f"NVIDIA DALI does not import ({err}): install the project with its DALI build, "
                      "`pip install -e '.[cuda12]'` (CUDA 13 hosts: '.[cuda13]'); `make setup` does") from err

from pipeline.shardset import IMAGE_EXTS, LABEL_EXT

READER = "Reader"  # the iterator finds the epoch size through this name
RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
LIGHTING_STD = 0.1
# Ten-crop views of the centre square: four corners and the centre (crop_pos_x, crop_pos_y).
FIVE_CROPS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT16}


def read_samples(tars: Sequence[str], indexes: Sequence[str], shard_id: int, num_shards: int, *,
                 shuffle: bool, initial_fill: int = 1024) -> tuple[DataNode, DataNode, DataNode]:
    """Step 1, read: (JPEG bytes, raw labels, raw keys) of this rank's part of `tars`. Val
    (`shuffle=False`) reads in order and pads its part's last batch with repeats (the loader
    trims them by count), so no batch holds samples of another part; train shuffles within
    a buffer of `initial_fill` samples. Labels are the `.cls` bytes and keys the reader's
    `source_info`, each zero-padded per batch."""
    jpegs, cls = fn.readers.webdataset(
        paths=list(tars), index_paths=list(indexes), ext=[";".join(IMAGE_EXTS), LABEL_EXT],
        name=READER,
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


def _stored_at(jpegs, side: int):
    """Per sample: the stored image's shorter side is already `side` (from its header)."""
    return fn.reductions.min(fn.peek_image_shape(jpegs)[0:2]) == side


def decode_centre(jpegs: DataNode, device: str, side: int, base: int,
                  hw_decoder_load: float | None = None) -> DataNode:
    """Step 2 of val and ten-crop: the centre side x side of the image with its shorter side
    resized to `base` (uint8 HWC; on the CPU, images stored at `base` are ROI-decoded)."""
    if device == "cpu" and _stored_at(jpegs, base):
        return fn.decoders.image_crop(jpegs, crop=(side, side), output_type=types.RGB)
    return fn.crop(_decode_resized(jpegs, device, base, hw_decoder_load), crop=(side, side))


def decode_paper(jpegs: DataNode, device: str, crop_size: int, base: int,
                 hw_decoder_load: float | None = None) -> DataNode:
    """Step 2 of train, `crop="paper"`: a random crop_size patch of the central base x base
    square, shorter side to `base` (uint8 HWC; on the CPU, images stored at `base` decode
    only the patch)."""
    u, v = fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0])
    if device == "cpu" and _stored_at(jpegs, base):
        shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.FLOAT)
        h, w = shape[0], shape[1]  # image_crop's positions are relative to (side - crop)
        x = ((w - base) * 0.5 + u * (base - crop_size)) / (w - crop_size)
        y = ((h - base) * 0.5 + v * (base - crop_size)) / (h - crop_size)
        return fn.decoders.image_crop(jpegs, crop=(crop_size, crop_size), crop_pos_x=x,
                                      crop_pos_y=y, output_type=types.RGB)
    square = fn.crop(_decode_resized(jpegs, device, base, hw_decoder_load), crop=(base, base))
    return fn.crop(square, crop=(crop_size, crop_size), crop_pos_x=u, crop_pos_y=v)


def _decode_resized(jpegs, device: str, base: int, hw_decoder_load: float | None):
    images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder(device, hw_decoder_load))
    return fn.resize(images, resize_shorter=base)


def decode_rrc_window(jpegs: DataNode, device: str, rrc_scale: Sequence[float],
                      hw_decoder_load: float | None = None) -> DataNode:
    """RandomResizedCrop's first half: ROI-decode a random window (area fraction in
    `rrc_scale`, aspect ratio in RRC_RATIO), at its stored size (uint8 HWC)."""
    return fn.decoders.image_random_crop(jpegs, output_type=types.RGB, **_decoder(device, hw_decoder_load),
                                         random_area=list(rrc_scale),
                                         random_aspect_ratio=list(RRC_RATIO))


def decode_rrc(jpegs: DataNode, device: str, crop_size: int, rrc_scale: Sequence[float],
               hw_decoder_load: float | None = None) -> DataNode:
    """Step 2 of train, `crop="rrc"`: RandomResizedCrop, the random window
    (`decode_rrc_window`) resized to crop_size x crop_size (uint8 HWC)."""
    return fn.resize(decode_rrc_window(jpegs, device, rrc_scale, hw_decoder_load), size=[crop_size, crop_size])


def _decoder(device: str, hw_decoder_load: float | None) -> dict:
    """The decoder's device ("mixed" on the GPU: nvJPEG and the hardware decoder) and, there,
    the share of images sent to the hardware decoder (None: DALI's default).

    On the GPU, `jpeg_fancy_upsampling=True`: DALI hands it to both nvImageCodec nvJPEG
    decoders (the CUDA and the hardware one, as NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION,
    nvJPEG 12.1+), so chroma is upsampled by interpolation as libjpeg-turbo does on the CPU
    (its default); DALI's own default (False) duplicates chroma samples, which shifts colour
    edges by up to a few levels against the CPU graph. The CPU decoder always upsamples so."""
    if device != "gpu":
        return {"device": "cpu"}
    out = {"device": "mixed", "jpeg_fancy_upsampling": True}
    return out if hw_decoder_load is None else {**out, "hw_decoder_load": hw_decoder_load}


@pipeline_def(enable_conditionals=True)
def train_pipeline(tars, indexes, shard_id, num_shards, *, device, crop, crop_size, resize_to,
                   rrc_scale, mean, std, lighting_matrix, dtype, initial_fill=1024, hw_decoder_load=None):
    """read (shuffled) -> decode + crop (`rrc`, or `paper`: a random patch of the central
    resize_to square) -> flip p=0.5 -> PCA lighting -> normalise."""
    jpegs, labels, keys = read_samples(tars, indexes, shard_id, num_shards, shuffle=True,
                                       initial_fill=initial_fill)
    if crop == "rrc":
        images = decode_rrc(jpegs, device, crop_size, rrc_scale, hw_decoder_load)
    else:
        images = decode_paper(jpegs, device, crop_size, resize_to, hw_decoder_load)
    images = fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(probability=0.5),
        mean=_lit_mean(mean, lighting_matrix) if lighting_matrix else list(mean), std=list(std),
        dtype=DTYPES[dtype], output_layout="CHW")
    return images, labels, keys


@pipeline_def(enable_conditionals=True)
def val_pipeline(tars, indexes, shard_id, num_shards, *, device, crop_size, resize_to, mean, std,
                 dtype, hw_decoder_load=None):
    """read (in order) -> decode -> shorter side to resize_to -> centre crop -> normalise."""
    jpegs, labels, keys = read_samples(tars, indexes, shard_id, num_shards, shuffle=False)
    images = decode_centre(jpegs, device, crop_size, resize_to, hw_decoder_load)
    images = fn.crop_mirror_normalize(images, mean=list(mean), std=list(std), dtype=DTYPES[dtype],
                                      output_layout="CHW")
    return images, labels, keys


@pipeline_def(enable_conditionals=True)
def ten_crop_pipeline(tars, indexes, shard_id, num_shards, *, device, crop_size, resize_to, mean,
                      std, dtype, hw_decoder_load=None):
    """The paper's test protocol: the four corners and the centre of the central resize_to
    square, then the same five mirrored: images [10, 3, crop, crop] per sample."""
    jpegs, labels, keys = read_samples(tars, indexes, shard_id, num_shards, shuffle=False)
    square = decode_centre(jpegs, device, resize_to, resize_to, hw_decoder_load)
    views = [
        fn.crop_mirror_normalize(square, crop=(crop_size, crop_size), crop_pos_x=x, crop_pos_y=y,
                                 mirror=flip, mean=list(mean), std=list(std),
                                 dtype=DTYPES[dtype], output_layout="CHW")
        for flip in (0, 1) for x, y in FIVE_CROPS
    ]
    return fn.stack(*views), labels, keys


@pipeline_def(enable_conditionals=True)
def files_pipeline(source, *, device, crop_size, resize_to, mean, std, dtype, hw_decoder_load=None):
    """`python -m orchestration.predict`: encoded images handed in by `source` (a callable
    returning a batch: a list of uint8 arrays) -> the val graph's `decode_centre` ->
    normalise: what the network saw in val, for files outside any shard set."""
    jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    images = decode_centre(jpegs, device, crop_size, resize_to, hw_decoder_load)
    return fn.crop_mirror_normalize(images, mean=list(mean), std=list(std), dtype=DTYPES[dtype],
                                    output_layout="CHW")
