"""All measurement, outside the product (DESIGN.md "Top-level layout"): last in the flow, so
it may import every stage in-process; not installed with the package (pyproject lists only
the product packages). Importing it runs nothing.

    loader/       `make bench` (`python -m bench.loader`): the loader against the torch
                  baseline and the decode bound; `python -m bench.loader.measure`, the quick check
    pack.py       `python -m bench.pack`: the packer against the PIL bound
    model.py      `python -m bench.model`: forward+backward images/s of the model family
    e2e.py        the data-wait share of training steps on a loader (the one data-wait loop)
    scaling.py    `python -m bench.scaling`: measured CPU figures + the multi-GPU scaling model
    workers.py    `python -m bench.workers`: the demo trained with 1-3 workers on local Ray clusters
    gpu_check.py  `make gpu-check`: the GPU tests and the GPU benchmark on a lent GPU machine

Shared by several of them:

    corpus.py     the synthetic-photo generator and the cached ImageNet-like corpus
    decode.py     the decode bound: PIL and DALI's decoder alone
    timing.py     batch sources timed side by side, interleaved; whole passes back to back
    figures.py    one measured figure (median, spread) and ratios between figures
"""
