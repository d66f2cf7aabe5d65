"""The loader benchmark (`make bench`, `python -m bench.loader`): it only measures the
product modules of `pipeline/`; the parts other benches share (corpus, decode, timing,
figures) are in `bench/`.

    __main__.py   the run: sources, interleaved rounds, ratios, end-to-end, outputs
    profile.py    the DALI CPU train graph cut after each step (`pipeline.dali`'s public steps)
    staging.py    the object-storage part: a local S3 server, staged and streamed reads
    report.py     latest.json, the table, latest.md and bench.png
    measure.py    the quick side-by-side check (`python -m bench.loader.measure`)

Importing the package runs nothing.
"""
