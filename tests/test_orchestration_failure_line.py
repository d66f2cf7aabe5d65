"""The driver's one line for a run Ray Train gave up on (`checkpoint.failure_line`), on the
errors `trainer.fit()` raises, built as Ray builds them; no Ray cluster. (A real full disk
at a checkpoint: tests/e2e/test_full_disk.py.)"""
from __future__ import annotations

from orchestration.checkpoint import StorageFull, failure_line
from shards.location import ChangedUpload, resolve


def test_failure_line_names_a_full_disk_anywhere_else_the_first_failing_rank(tmp_path):
    """Without Ray: the WorkerGroupError that trainer.fit() raises, as Ray builds it."""
    from ray.train import ControllerError, WorkerGroupError

    run = resolve(str(tmp_path / "runs" / "demo"))
    injected = "injected worker failure after the checkpoint at epoch 1 (tests only)"
    crash = RuntimeError(f"{injected}\nmore lines")
    line = failure_line(WorkerGroupError("Rank 1 ...", {1: crash, 0: crash}), run)
    assert line == (f"training failed (rank 0: RuntimeError: {injected}); "
                    f"re-run the same command to resume from the newest checkpoint Ray registered in {run}")
    line = failure_line(ControllerError(TimeoutError("no worker group in 30 s")), run)
    assert line.startswith("training failed (TimeoutError: no worker group in 30 s); re-run the same command")
    # a full disk outside a checkpoint (state.json, the ledger), on one rank among others' collateral errors
    full = OSError(28, "No space left on device")
    line = failure_line(WorkerGroupError("...", {0: full, 1: ConnectionResetError("peer gone")}), run)
    assert line.startswith(f"storage full: {run}: [Errno 28] No space left on device. No checkpoint was registered yet")
    assert line.endswith("then re-run the same command: it starts from the beginning")
    full = StorageFull(f"{run}: No space left on device (ENOSPC) for x")
    line = failure_line(WorkerGroupError("...", {1: full}), run)
    assert line.startswith(f"checkpoint storage full: {run}: No space left on device (ENOSPC) for x. ")
    # a setting or a store to fix is never "re-run the same command" alone
    for cause in (ValueError("model: 'resnet50' is not one of alexnet"),
                  ChangedUpload(f"{run}/epoch-0001/checkpoint.pt: the store holds 10 bytes where 9 were written")):
        line = failure_line(WorkerGroupError("...", {0: cause}), run)
        assert "fix what it names first: then the same command resumes" in line, line
        assert "re-run the same command to resume" not in line
