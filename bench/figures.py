"""One measured figure: its repeats, median and spread, as every bench result carries it; ratios
between figures, and the graph (policy) a loader runs, which both sides of a ratio share."""
from __future__ import annotations

import statistics


def figure(runs: list[float], unit: str = "images/s") -> dict:
    """{"median", "min", "max", "spread", "runs", "unit"}; spread is (max - min) / median.
    Values keep 4 significant digits (enough for noisy timings, exact for small ones)."""
    if not runs:
        raise ValueError("a figure needs at least one run")
    med, lo, hi = (_sig(v) for v in (statistics.median(runs), min(runs), max(runs)))
    return {
        "median": med,
        "min": lo,
        "max": hi,
        "spread": _sig((hi - lo) / med) if med else 0.0,
        "runs": [_sig(r) for r in runs],
        "unit": unit,
    }


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def ratio(num: dict | None, den: dict | None) -> float | None:
    """Median over median, or None where either is missing."""
    if not num or not den or not den.get("median"):
        return None
    return round(num["median"] / den["median"], 3)


POLICIES = ("rrc", "paper", "val")  # the train crop policies (rrc: the default), then the val graph


def policy(kwargs: dict) -> str:
    """The graph a loader with these make_loader arguments runs: its train crop policy, or "val"."""
    return "val" if kwargs.get("split") == "val" else kwargs.get("crop", "rrc")
