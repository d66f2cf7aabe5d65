"""`python -m orchestration.audit RUN_DIR [--epoch N] [--shards DIR]`: the sample ledger
(`audit_samples: true`, `orchestration.ledger`) checked epoch by epoch against the manifest.

Per epoch it prints the samples trained, the duplicates (a key trained twice in the epoch),
the samples missing (train keys of the manifest not trained, beyond what the loader drops
by design: each rank trains full batches of its part, so fewer than world size x batch
samples are left out of an epoch) and the extra keys (trained but not in the manifest), and
exits 1 on any of them. The ledger is read with a pyarrow dataset scan filtered to one
epoch at a time, so memory stays bounded by one epoch (plus the manifest's train keys),
not by the run (issue 23: `read_table` of 90 epochs of ImageNet needs ~4.9 GB).

The manifest comes from `--shards` (a path or URI), else from the run's newest checkpoint's
config (`shards_dir`).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from orchestration.ledger import LEDGER_DIR
from orchestration.run_dir import read_summary
from shards.layouts import MANIFEST_FILE, REPACK
from shards.location import Location, resolve


@dataclass(frozen=True)
class EpochAudit:
    epoch: int
    trained: int  # ledger rows of the epoch
    world_size: int  # ranks that wrote rows in it (the most at any step)
    batch: int  # samples per rank per step
    duplicates: int  # rows beyond the first of each key
    missing: int  # manifest keys not trained
    allowed_missing: int  # what the loader drops by design (full batches per rank)
    extra: int  # keys not in the manifest
    complete: bool  # False: the last epoch of a run still under way (missing not judged)

    @property
    def faults(self) -> list[str]:
        out = []
        if self.duplicates:
            out.append(f"{self.duplicates} duplicates")
        if self.extra:
            out.append(f"{self.extra} keys not in the manifest")
        if self.complete and self.missing > self.allowed_missing:
            out.append(f"{self.missing} missing (at most {self.allowed_missing} expected)")
        return out

    def line(self) -> str:
        state = "" if self.complete else " (in progress)"
        verdict = "OK" if not self.faults else "FAULT: " + ", ".join(self.faults)
        return (f"epoch {self.epoch}{state}: {self.trained} samples trained ({self.world_size} ranks x {self.batch}), "
                f"{self.duplicates} duplicates, {self.missing} missing, {self.extra} extra: {verdict}")


def ledger_dataset(run: Location) -> ds.Dataset:
    loc = run / LEDGER_DIR
    if not loc.is_dir():
        raise FileNotFoundError(f"{loc}: no sample ledger; train with audit_samples: true")
    return ds.dataset(loc.path, filesystem=loc.fs, format="parquet")


def ledger_epochs(data: ds.Dataset) -> list[int]:
    """The epochs in the ledger, read one batch of the `epoch` column at a time."""
    seen: set[int] = set()
    for batch in data.to_batches(columns=["epoch"]):
        seen.update(pc.unique(batch.column(0)).to_pylist())
    return sorted(seen)


def manifest_keys(shards: Location, split: str = "train") -> pa.Array:
    table = (shards / MANIFEST_FILE).read_parquet(["split", "key"], REPACK)
    return table.filter(pc.equal(table["split"], split))["key"].combine_chunks()


def audit_epoch(data: ds.Dataset, epoch: int, keys: pa.Array, complete: bool = True) -> EpochAudit:
    """One epoch's figures; holds that epoch's rows only."""
    rows = data.to_table(columns=["step", "rank", "key"], filter=ds.field("epoch") == epoch)
    counts = pc.value_counts(rows["key"])
    unique = counts.field("values")
    duplicates = len(rows) - len(unique)
    known = pc.sum(pc.is_in(unique, value_set=keys)).as_py() or 0
    per_step = rows.group_by("step").aggregate([("rank", "count_distinct"), ("key", "count")])
    world = max(per_step["rank_count_distinct"].to_pylist(), default=0)
    batch = max((k // max(r, 1) for k, r in zip(per_step["key_count"].to_pylist(),
                                                per_step["rank_count_distinct"].to_pylist(), strict=True)), default=0)
    n = len(keys)
    allowed = n - world * ((n // max(world, 1)) // max(batch, 1)) * batch if world and batch else n
    return EpochAudit(epoch=epoch, trained=len(rows), world_size=world, batch=batch, duplicates=duplicates,
                      missing=n - known, allowed_missing=allowed, extra=len(unique) - known, complete=complete)


def audit(run_dir: str, epoch: int | None = None, shards: str | None = None, out=print) -> list[EpochAudit]:
    """Audit the run's ledger (every epoch, or only `epoch`), printing a line per epoch."""
    run = resolve(run_dir)
    data = ledger_dataset(run)
    keys = manifest_keys(resolve(shards) if shards else resolve(_run_shards(run_dir)))
    epochs = ledger_epochs(data)
    if epoch is not None:
        if epoch not in epochs:
            raise ValueError(f"{run / LEDGER_DIR}: no rows of epoch {epoch} (the ledger holds epochs "
                             f"{', '.join(map(str, epochs)) or 'none'})")
    finished = read_summary(run) is not None
    results = []
    for e in epochs if epoch is None else [epoch]:
        result = audit_epoch(data, e, keys, complete=finished or e != epochs[-1])
        out(result.line())
        results.append(result)
    return results


def _run_shards(run_dir: str) -> str:
    from orchestration.artifacts import load_trained  # torch: only when the config must come from a checkpoint

    _, state = load_trained(run_dir)
    return state["config"]["shards_dir"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="<storage_path>/<name> of a run (a path or URI)")
    parser.add_argument("--epoch", type=int, default=None, help="audit only this epoch")
    parser.add_argument("--shards", default=None, help="the shard set (default: the run's shards_dir)")
    args = parser.parse_args(argv)
    try:
        results = audit(args.run_dir, args.epoch, args.shards)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    bad = [r for r in results if r.faults]
    print(f"{len(results)} epoch(s) audited: " + ("OK" if not bad else f"{len(bad)} with faults"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
