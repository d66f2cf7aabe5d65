"""Where DALI CPU spends its time: the loader's own train graph cut after each step, timed alone.

Each stage adds one step to the one before, so the drop from one line to the next is that
step's cost: read -> keys and labels -> decode (the whole image, or only the random-crop
window) -> resize to the crop -> flip + normalise to float CHW -> PCA lighting. The pieces are
`pipeline.dali`'s public steps (`read_samples`, `decode_rrc_window`, `decode_rrc`,
`decode_paper`) and the last line of each policy is the loader's graph itself
(`pipeline.builder.build_pipeline`), so the profile follows the pipeline as it changes; the gap
between that line and the `make_loader` figure is the hand-over to torch (batch copy, label
and key parsing). Only `read` (the bare reader) and `+decode` (the whole image, which the
loader's train graph never decodes) are the bench's own cuts.
"""
from __future__ import annotations

from pathlib import Path

PROFILE_STAGES = (
    "read",  # readers.webdataset alone: image and .cls bytes
    "read+keys",  # the loader's reader: + sample keys (source_info) and labels padded per batch
    "+decode",  # + the whole image decoded
    "+roi_decode",  # + only the RandomResizedCrop window decoded
    "rrc: +roi_decode+resize",  # + the window resized to the crop (the loader's rrc decode)
    "rrc: +flip+normalize",  # + crop_mirror_normalize to float CHW (the loader's graph, no lighting)
    "rrc: +lighting (loader graph)",  # the loader's rrc graph as make_loader builds it
    "paper: +decode+crop",  # the loader's paper decode (ROI decode of the patch where it can)
    "paper: loader graph",  # the loader's paper graph as make_loader builds it
)


def build_stage(stage: str, shards_dir: Path, batch_size: int, threads: int, crop: int,
                split: str = "train"):
    """A built DALI CPU pipeline (device_id None) that stops after `stage`."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline import dali, make_loader
    from pipeline.builder import build_pipeline

    if stage not in PROFILE_STAGES:
        raise ValueError(f"profile stage {stage!r}: choose one of {', '.join(PROFILE_STAGES)}")
    if "loader graph" in stage or stage == "rrc: +flip+normalize":
        spec = make_loader(str(shards_dir), split=split, batch_size=batch_size, device="cpu",
                           crop_size=crop, num_threads=threads, crop="paper" if "paper" in stage else "rrc",
                           lighting="lighting" in stage or "paper" in stage).spec
        return build_pipeline(spec, 0)
    spec = make_loader(str(shards_dir), split=split, batch_size=batch_size, device="cpu", crop_size=crop,
                       num_threads=threads).spec
    tars, idx = [str(t) for t in spec.data.tars], [str(i) for i in spec.data.indexes]

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=spec.prefetch,
                  enable_conditionals=True)
    def graph():
        if stage == "read":
            return tuple(fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg;jpeg;png", "cls"],
                                               random_shuffle=True, initial_fill=spec.shuffle_buffer))
        jpegs, labels, keys = dali.read_samples(tars, idx, 0, 1, shuffle=True, initial_fill=spec.shuffle_buffer)
        if stage == "read+keys":
            return jpegs, labels, keys
        if stage == "+decode":
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        elif stage == "+roi_decode":
            images = dali.decode_rrc_window(jpegs, "cpu", spec.rrc_scale)
        elif stage.startswith("rrc"):
            images = dali.decode_rrc(jpegs, "cpu", crop, spec.rrc_scale)
        else:
            images = dali.decode_paper(jpegs, "cpu", crop, spec.resize_to)
        return images, labels, keys

    pipe = graph()
    pipe.build()
    return pipe
