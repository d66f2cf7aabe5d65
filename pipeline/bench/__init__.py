"""The loader benchmark (`make bench`, `python -m pipeline.bench`): kept apart from the product
modules of `pipeline/`, which it only measures.

    __main__.py   the run: sources, interleaved rounds, ratios, end-to-end, outputs
    corpus.py     the cached ImageNet-like corpus, packed by our packer
    decode.py     the decode bound: PIL and DALI's decoder alone
    timing.py     batch sources timed side by side, interleaved, with CPU time per image;
                  whole passes back to back (the cost of starting each epoch's pipeline)
    profile.py    the DALI CPU train graph cut after each step (`pipeline.dali`'s public steps)
    staging.py    the object-storage part: a local S3 server, staged and streamed reads
    figures.py    one measured figure (median, spread) and ratios between figures
    report.py     latest.json, the table, latest.md and bench.png
    measure.py    the quick side-by-side check (`python -m pipeline.bench.measure`)

Nothing here is imported by the product; importing the package runs nothing.
"""
