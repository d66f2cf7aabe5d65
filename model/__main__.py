"""`python -m model summary NAME [--crop 224] [--num-classes 1000]`: the layer table."""
from __future__ import annotations

import argparse

from model.alexnet import MIN_CROP
from model.registry import MODEL_NAMES, build_model
from model.summary import format_table, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description="AlexNet model family")
    sub = parser.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("summary", help="per-layer output shape, params and MACs per image")
    summary.add_argument("name", choices=MODEL_NAMES)
    summary.add_argument("--crop", type=int, default=224, help=f"input side in pixels (>= {MIN_CROP})")
    summary.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.crop < MIN_CROP:
        parser.error(f"--crop must be at least {MIN_CROP}, got {args.crop}")
    if args.num_classes < 1:
        parser.error(f"--num-classes must be at least 1, got {args.num_classes}")
    model = build_model(args.name, num_classes=args.num_classes)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.name} at {args.crop}x{args.crop}, {args.num_classes} classes")
    print(format_table(summarize(model, args.crop), total))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
