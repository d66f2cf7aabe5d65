"""The e2e tier: drills on real local Ray clusters (`make test-e2e`).

One Ray at a time on this machine (its cores are the drills' clock): `machines` keeps the
one in use and stops it before another starts. The in-process drills (`train.main` in this
process) share one embedded local Ray for the whole tier; the multi-node drills get a local
`Cluster` of their own; the job drills share one token-authenticated head. The tests run in
that order (local Ray first), so each kind starts once.

`reference` is the uninterrupted RESUMABLE run (tests/helpers/runs.py), trained once for
every drill that must end with its ledger and weights.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers.clusters import LocalRay, Machines, TokenHead
from helpers.runs import summary, write_config

from orchestration import train


@pytest.fixture(scope="session")
def machines(s3_server):
    """Started after the S3 server, so that every Ray of the tier (its workers) inherits the
    AWS variables that point at it."""
    held = Machines()
    yield held
    held.release()


@pytest.fixture()
def local_ray(machines):
    """The tier's embedded local Ray (started by the first drill that needs it)."""
    machines.use("local", LocalRay)


@pytest.fixture()
def token_head(machines, tmp_path_factory) -> TokenHead:
    """A head from local-up.sh, token auth on, shared by the job drills."""
    return machines.use("token-head", lambda: TokenHead(tmp_path_factory.mktemp("token-head")))


@pytest.fixture(scope="session")
def reference(machines, demo_shards, tmp_path_factory) -> Path:
    """The uninterrupted RESUMABLE run, on the local Ray (one torch thread per worker: a
    multi-node run computes the same weights)."""
    machines.use("local", LocalRay)
    tmp = tmp_path_factory.mktemp("reference")
    assert train.main(["--config", str(write_config(tmp, "ref", demo_shards))]) == 0
    run_dir = tmp / "runs" / "ref"
    done = summary(run_dir)
    assert done["resumed_at"] == [] and done["restarts"] == 0 and done["world_size"] == 2
    return run_dir


# the kind of Ray each fixture runs on, in the order the tier takes them: the local one,
# then the multi-node clusters, then the token head
KIND_OF = {"local_ray": 0, "reference": 0, "failed_at_step": 0, "s3_run": 0, "two_nodes": 1, "elastic_run": 2,
           "token_head": 3}


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return max((KIND_OF[f] for f in item.fixturenames if f in KIND_OF), default=len(KIND_OF))

    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in Path(item.path).parents]
    ours = sorted((items[i] for i in slots), key=rank)  # stable: files and tests keep their order in a kind
    for i, item in zip(slots, ours):
        items[i] = item
