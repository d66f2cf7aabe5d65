"""`python -m model summary NAME [--crop 224] [--num-classes 1000]`: the layer table.
`python -m model export RUN_DIR|CHECKPOINT --out FILE [--format weights|torchscript|onnx]
[--crop N]`: a trained network for use outside this project (formats: model/export.py)."""
from __future__ import annotations

import argparse
import os
import sys

from model.alexnet import MIN_CROP
from model.export import FORMATS, export, num_classes_of, read_checkpoint, rebuild
from model.registry import MODEL_NAMES, build_model
from model.summary import format_table, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description="AlexNet model family")
    sub = parser.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("summary", help="per-layer output shape, params and MACs per image")
    summary.add_argument("name", choices=MODEL_NAMES)
    summary.add_argument("--crop", type=int, default=224, help=f"input side in pixels (>= {MIN_CROP})")
    summary.add_argument("--num-classes", type=int, default=1000)
    exp = sub.add_parser("export", help="a trained checkpoint as a weights file, TorchScript or ONNX")
    exp.add_argument("target", help="a run directory (its newest checkpoint), a checkpoint.pt or its folder")
    exp.add_argument("--out", required=True, help="the file to write")
    exp.add_argument("--format", default="weights", choices=FORMATS,
                     help="weights: state_dict + model name, classes, crop (torch.load weights_only=True); "
                          "torchscript: torch.jit.load-able; onnx: needs the export extra (default: weights)")
    exp.add_argument("--crop", type=int, default=None,
                     help=f"onnx: the input side the graph is fixed to (>= {MIN_CROP}; default: the run's crop_size)")
    args = parser.parse_args(argv)
    if args.command == "export":
        return export_command(parser, args)
    if args.crop < MIN_CROP:
        parser.error(f"--crop must be at least {MIN_CROP}, got {args.crop}")
    if args.num_classes < 1:
        parser.error(f"--num-classes must be at least 1, got {args.num_classes}")
    model = build_model(args.name, num_classes=args.num_classes)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.name} at {args.crop}x{args.crop}, {args.num_classes} classes")
    print(format_table(summarize(model, args.crop), total))
    return 0


def export_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.crop is not None and args.format != "onnx":
        parser.error("--crop applies to --format onnx only (the other formats take any crop)")
    if args.crop is not None and args.crop < MIN_CROP:
        parser.error(f"--crop must be at least {MIN_CROP}, got {args.crop}")
    try:
        path, state = read_checkpoint(args.target)
        name, config = state["config"]["model"], state["config"]
        crop = args.crop or int(config.get("crop_size", 224))
        model = rebuild(name, state["model"])
        export(model, name, args.out, args.format, crop_size=crop, epoch=state.get("epoch"), source=str(path))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = os.path.getsize(args.out)
    fixed = f", input fixed to {crop}x{crop}" if args.format == "onnx" else f", trained at crop {crop}"
    print(f"wrote {args.out} ({args.format}, {size / 2**20:.1f} MB) from {path}: {name}, "
          f"{num_classes_of(state['model'])} classes{fixed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
