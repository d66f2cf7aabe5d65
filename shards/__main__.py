"""`python -m shards {build,verify,check-store,demo}`: the packer's command line (DESIGN.md "Commands")."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards", description="ImageNet -> WebDataset shards for DALI")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pack an ImageNet tree into shards")
    b.add_argument("--source", required=True, help="local ImageNet root (train/, val/, labels files)")
    b.add_argument("--out", required=True,
                   help="output shard directory, or a URI (s3://bucket/prefix; AWS_* variables for S3)")
    b.add_argument("--work-dir", type=Path, default=None,
                   help="remote --out only: local directory shards are packed in before upload "
                        "(default ~/.cache/alexnet-dali/pack/<hash of --out>)")
    b.add_argument("--splits", default="train,val", help="comma-separated: train,val")
    b.add_argument("--shorter-side", type=int, default=256,
                   help="resize the shorter side to N (never up); 0 keeps sizes")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    b.add_argument("--workers", type=int, default=None, help="encoder processes (default: all cores)")
    b.add_argument("--shard-size-mb", type=float, default=256, help="target shard size in MB (floats accepted)")
    b.add_argument("--seed", type=int, default=0, help="seed of the train shuffle")
    b.add_argument("--overwrite", action="store_true", help="replace an output packed from another source/settings")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = sub.add_parser("verify", help="re-read every shard against the manifest and shards.parquet")
    v.add_argument("dir", help="shard directory or URI (s3://bucket/prefix)")
    v.add_argument("--workers", type=int, default=None, help="decoder processes (default: all cores)")
    c = sub.add_parser("check-store", help="write, read back and delete a probe object: does the store keep bytes?")
    c.add_argument("uri", help="a location to be written (s3://bucket/prefix, a path); AWS_* variables for S3")
    d = sub.add_parser("demo", help="write the demo ImageNet-layout tree")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--classes", type=int, default=10)
    d.add_argument("--train-per-class", type=int, default=260)
    d.add_argument("--val-per-class", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--min-side", type=int, default=300)
    d.add_argument("--max-side", type=int, default=600)
    d.add_argument("--workers", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            from shards.pack import build

            summary = build(args.source, args.out, splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
                            shorter_side=args.shorter_side, quality=args.quality, workers=args.workers,
                            shard_size_mb=args.shard_size_mb, seed=args.seed, overwrite=args.overwrite,
                            progress=not args.no_progress, work_dir=args.work_dir)
            print(f"{args.out}: {summary.line()}")
            return 0
        if args.command == "verify":
            from shards.verify import verify

            report = verify(args.dir, workers=args.workers)
            for problem in report.problems:
                print(problem)
            print(f"{args.dir}: {report.line()}")
            return 0 if report.ok else 1
        if args.command == "check-store":
            from shards.store_check import check_store

            found = check_store(args.uri, apply=False)
            print(found.line())
            return 0 if found.ok else 1
        from shards.demo import write_demo

        out = write_demo(args.out, classes=args.classes, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, seed=args.seed, min_side=args.min_side,
                         max_side=args.max_side, workers=args.workers)
        print(f"{out}: demo tree with {args.classes} classes, {args.train_per_class} train and "
              f"{args.val_per_class} val images per class")
        return 0
    except (ValueError, OSError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
