"""`orchestration/train.py` as a script, with callbacks of tests/helpers/hooks.py passed in:

    python tests/helpers/driver.py hold-while-shrunk -- --config RUN.yaml

for drills whose driver runs in a process of its own (on a multi-node cluster)."""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
    from helpers.hooks import HoldWhileShrunk
    from orchestration.train import main

    hooks = {"hold-while-shrunk": HoldWhileShrunk}
    cut = sys.argv.index("--")
    sys.exit(main(sys.argv[cut + 1:], callbacks=[hooks[name]() for name in sys.argv[1:cut]]))
