"""Paired comparisons of methods over the same subjects: mean difference, a bootstrap 95%
interval over subjects, subjects won / lost, and the verdict the interval supports.

Subjects are the sample (images of one subject are not independent), so the interval resamples
subjects, not images. Every bench number is "higher is better".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same results give the same interval


def bootstrap_interval(differences: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `differences` (resampling subjects)."""
    values = np.asarray(differences, dtype=float)
    if values.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


NO_DIFFERENCE = "no detectable difference"  # the verdict when the interval spans zero


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return NO_DIFFERENCE


def compare(differences: list[float]) -> dict[str, Any]:
    n = len(differences)
    low, high = bootstrap_interval(differences)
    return {
        "mean": sum(differences) / n if n else math.nan,
        "ci95_low": low, "ci95_high": high,
        "stderr": float(np.std(differences, ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "won": sum(d > 0 for d in differences), "lost": sum(d < 0 for d in differences), "subjects": n,
        "verdict": verdict(low, high) if n > 1 else "too few subjects",
    }


def paired_differences(per_subject: dict[str, list[dict]], metrics: tuple[str, ...], baseline: str | None = None) -> dict[str, Any]:
    """Each method minus `baseline` (default: the first), subject by subject, on every metric.
    `per_subject`: method -> rows with "subject" and the metrics (a results.json's per_subject)."""
    per = {method: {row["subject"]: row for row in rows} for method, rows in per_subject.items()}
    baseline = baseline or next(iter(per))
    base_rows = per[baseline]
    differences: dict[str, dict[str, dict[str, Any]]] = {}
    for method, rows in per.items():
        if method == baseline:
            continue
        differences[method] = {}
        for metric in metrics:
            diffs = [rows[s][metric] - base[metric] for s, base in base_rows.items()
                     if s in rows and metric in rows[s] and metric in base
                     and not math.isnan(rows[s][metric]) and not math.isnan(base[metric])]
            differences[method][metric] = compare(diffs)
    return {"baseline": baseline, "interval": f"95% percentile bootstrap over subjects ({BOOTSTRAP_RESAMPLES} resamples)",
            "differences": differences}


def interpolate_at(curve: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear curve through (x, y) points at x; NaN outside their range (never extrapolated)."""
    points = sorted((a, b) for a, b in curve if not (math.isnan(a) or math.isnan(b)))
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else math.nan


def combined_clock(rows) -> str | None:
    """The clock of results rows' seconds (their "seconds_clock": "cpu" or "wall"; rows from before clocks were recorded:
    wall), "mixed" where they differ, None where no row's seconds were recorded."""
    found = {row.get("seconds_clock", "wall") for row in rows} - {None}
    return None if not found else found.pop() if len(found) == 1 else "mixed"


def seconds_words(clock: str | None) -> str:
    """How seconds on `clock` read in tables and plots."""
    return {"cpu": "CPU seconds", "mixed": "seconds (CPU and wall clocks mixed)"}.get(clock, "wall seconds")


def paired_at_equal_seconds(method_rows: list[dict], baseline_budgets: list[list[dict]], metrics: tuple[str, ...],
                            method: str, baseline: str) -> dict[str, Any]:
    """`method` (rows with "subject", "seconds" and the metrics) minus the baseline at the same seconds, subject by
    subject: the baseline's metric interpolated linearly in seconds between its budgets (each of `baseline_budgets`
    one budget's rows). A subject whose seconds fall outside the baseline's measured range is left out and counted
    ("outside"), never extrapolated. The rows' "seconds_clock" (absent: wall) names the table's clock."""
    curves = {}
    for rows in baseline_budgets:
        for row in rows:
            curves.setdefault(row["subject"], []).append(row)
    matched, outside = [], 0
    for row in method_rows:
        at = {m: interpolate_at([(r["seconds"], r[m]) for r in curves.get(row["subject"], []) if m in r], row["seconds"])
              for m in metrics}
        if all(math.isnan(v) for v in at.values()):
            outside += 1
            continue
        matched.append({"subject": row["subject"], **at})
    table = paired_differences({baseline: matched, method: method_rows}, metrics, baseline=baseline)
    clock = combined_clock([*method_rows, *sum(baseline_budgets, [])])
    return {**table, "outside": outside, "clock": clock,
            "how": f"{baseline} interpolated linearly in {seconds_words(clock)} between its budgets"}


def paired_rows(paired: dict[str, Any]) -> list[dict[str, str]]:
    """One table row per (method, metric): the printed and reported form."""
    return [{"method": f"{method} - {paired['baseline']}", "metric": metric, **difference_cells(d)}
            for method, metrics in paired["differences"].items() for metric, d in metrics.items()]


def difference_cells(d: dict[str, Any]) -> dict[str, str]:
    """One paired difference as every table prints it: mean, interval, subjects won/lost, verdict."""
    return {"mean diff": f"{d['mean']:+.3f}", "95% CI": f"[{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]",
            "won/lost": f"{d['won']}/{d['lost']}", "subjects": str(d["subjects"]), "verdict": d["verdict"]}
