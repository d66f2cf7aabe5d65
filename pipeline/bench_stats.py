"""One measured figure: its repeats, median and spread, as every bench result carries it."""
from __future__ import annotations

import statistics


def figure(runs: list[float], unit: str = "images/s") -> dict:
    """{"median", "min", "max", "spread", "runs", "unit"}; spread is (max - min) / median."""
    if not runs:
        raise ValueError("a figure needs at least one run")
    med = statistics.median(runs)
    return {
        "median": round(med, 3),
        "min": round(min(runs), 3),
        "max": round(max(runs), 3),
        "spread": round((max(runs) - min(runs)) / med, 3) if med else 0.0,
        "runs": [round(r, 3) for r in runs],
        "unit": unit,
    }


def ratio(num: dict | None, den: dict | None) -> float | None:
    """Median over median, or None where either is missing."""
    if not num or not den or not den.get("median"):
        return None
    return round(num["median"] / den["median"], 3)
