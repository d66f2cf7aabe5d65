"""`train_worker` without a Ray cluster: Ray Train's local mode (`ScalingConfig(num_workers=0)`)
runs it in this process. Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ... set) Ray's local
mode makes the process group itself (gloo on CPU), so

    torchrun --standalone --nproc-per-node 2 tests/helpers/local_train.py CONFIG.json

trains at world size 2 over gloo, each rank a process of its own. Local mode keeps no
checkpoint on storage (Ray holds the last reported one in memory): resuming is what the
real-cluster drills in tests/e2e/ test.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def run_local(config: dict, callbacks=()):
    """One training run of `config` (a TrainConfig mapping) in this process; Ray's Result."""
    import functools

    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestration.train import train_worker

    trainer = TorchTrainer(functools.partial(train_worker, callbacks=tuple(callbacks)), train_loop_config=config,
                           scaling_config=ray.train.ScalingConfig(num_workers=0))
    return trainer.fit()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root
    run_local(json.loads(Path(sys.argv[1]).read_text()))
