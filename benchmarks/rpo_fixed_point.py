"""Where RPO's preference term pushes the margin, read from runs' logged metrics (no training).

    python benchmarks/rpo_fixed_point.py runs/bracket2/lr-1e-4/runs/rpo runs/bracket-flow/lr-2e-4/runs/rpo --max-step 400

With labels l drawn at P(reference preferred) = p, the expected preference loss -[l log s(b d) + (1 - l) log s(-b d)]
has its gradient b (s(b d) - p) in the margin d = (e_ref(ref) - e_model(ref)) - (e_ref(neg) - e_model(neg)), so it is
smallest at d* = logit(p) / b: below d* the term pushes d up (towards the references, the subject), above it down
(towards the negatives). RPO's labels are nearly coin flips (p about 0.52 on MiniBench), so d* is small. Per folder of
RPO runs (one run folder per subject, each with metrics.jsonl): the runs' mean label, d* (from each run's mean label
and its rpo.beta), the mean logged margin and the share of logged steps whose margin is past d*.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml


def run_rows(metrics: Path, max_step: int | None) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"label_mean"' in line]
    return [r for r in rows if max_step is None or r["step"] <= max_step]


def run_beta(run_dir: Path) -> float:
    config = run_dir / "config.yaml"
    return float(yaml.safe_load(config.read_text())["rpo"]["beta"]) if config.is_file() else 1.0


def fixed_point(label_mean: float, beta: float) -> float:
    """d* = logit(p) / beta: where the expected preference loss is smallest (inf where beta is 0: no pull at all)."""
    p = min(max(label_mean, 1e-6), 1 - 1e-6)
    return math.inf if beta == 0 else math.log(p / (1 - p)) / beta


def summarize_runs(folder: Path, max_step: int | None) -> dict | None:
    labels, stars, margins, past = [], [], [], 0
    for metrics in sorted(folder.glob("*/metrics.jsonl")):
        rows = run_rows(metrics, max_step)
        if not rows:
            continue
        p = statistics.mean(r["label_mean"] for r in rows)
        star = fixed_point(p, run_beta(metrics.parent))
        labels.append(p)
        stars.append(star)
        margins += [r["margin"] for r in rows]
        past += sum(r["margin"] > star for r in rows)
    if not labels:
        return None
    return {"runs": len(labels), "label_mean": statistics.mean(labels), "fixed_point": statistics.mean(stars),
            "margin": statistics.mean(margins), "past_fixed_point": past / len(margins), "steps": len(margins)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders of RPO runs (e.g. a bench's runs/rpo)")
    parser.add_argument("--max-step", type=int, default=None, help="read logged steps up to this one (default: all)")
    args = parser.parse_args(argv)
    print("| runs | n | mean label | d* | mean margin | steps past d* |")
    print("| --- | --- | --- | --- | --- | --- |")
    for folder in args.folders:
        row = summarize_runs(folder, args.max_step)
        if row is None:
            print(f"rpo_fixed_point: no RPO metrics under {folder}", file=sys.stderr)
            return 2
        print(f"| {folder} | {row['runs']} | {row['label_mean']:.3f} | {row['fixed_point']:+.3f} | {row['margin']:+.3f} | "
              f"{row['past_fixed_point']:.2f} ({row['steps']} steps) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
