"""The peers side by side (`python -m bench.loader --peers`, `make bench PEERS=1`): DALI CPU
against the torch baseline, SPDL, LitData and the baseline on pillow-simd, the same work on the
same JPEG bytes, in one run. Bench-only: none of them is a dependency of the product.

    install.py      the side environments (pinned, `--no-deps`, beside .venv's torch) and one line each
    tars.py         the shard set's samples (key, JPEG bytes, label), read with the standard library
    transforms.py   the shared chain pieces: FFmpeg filters for SPDL, batch normalisation, the PIL chains
    spdl_loader.py  SPDL: its pipeline (source -> decode in its thread pool -> batch -> collate)
    litdata_loader.py  LitData: `optimize()` once (a packing cost), then StreamingDataset + StreamingDataLoader
    loaders.py      one name -> one loader, built the same way for every peer
    child.py        the process a loader runs in: serves batches on request, or checks one epoch
    source.py       a `bench.timing.Source` over such a process (CPU time and peak RSS of its tree)
    check.py        samples per epoch and the mean absolute difference against the PIL reference
    run.py          the run: install, pack, time in interleaved rounds, check, the `peers` JSON
    report.py       the table, Markdown and plot panel of the peers

Importing the package runs nothing.
"""
