"""The input pipeline: WebDataset shards -> NVIDIA DALI (GPU, or CPU where none) -> torch batches.

`make_loader` is the stage's API (DESIGN.md "Pipeline API"); `backend="torch"` gives the
webdataset + PIL baseline that benchmarks compare against.
"""
from pipeline.factory import make_loader

__all__ = ["make_loader"]
