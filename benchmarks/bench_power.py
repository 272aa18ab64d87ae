"""More subjects or more images per prompt? Variance components of a paired MiniBench comparison.

    python benchmarks/bench_power.py BENCH_DIR --a dpg@400 --b dreambooth@400 --metric identity_kept

Reads the two methods' per-image results.csv (same subjects, prompts and seeds), splits the
variance of the paired difference into a between-subject part (sigma_b^2: subjects really differ
in how much a method helps) and a within-subject image part (sigma_w^2), and predicts the 95%
interval half-width of the mean difference, 1.96 * sqrt(sigma_b^2 / S + sigma_w^2 / (S * P * K)),
for designs of equal CPU time: a subject costs its training (--train-seconds) plus P * K images
(--image-seconds each). Prints the designs side by side, best first.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path


def read_images(folder: Path, metric: str) -> dict[tuple[str, str, str], float]:
    """(subject, prompt, seed) -> the metric, from a bench folder's finished subjects."""
    from rewardbooth.evaluation.bench import load_scores

    rows = {}
    for score in load_scores(folder):
        value = float(getattr(score, metric, score.extra.get(metric, math.nan)))
        if not math.isnan(value):
            seed = score.file.rsplit("_s", 1)[-1]  # image k of a prompt carries seed + k in its name
            rows[(score.subject, score.prompt, seed)] = value
    return rows


def variance_components(a: dict, b: dict) -> tuple[float, float, int, float]:
    """(sigma_b^2, sigma_w^2, subjects, images per subject) of the per-image paired difference."""
    per_subject: dict[str, list[float]] = defaultdict(list)
    for key in a.keys() & b.keys():
        per_subject[key[0]].append(a[key] - b[key])
    subjects = list(per_subject.values())
    n = sum(len(d) for d in subjects) / len(subjects)
    within = sum(sum((x - sum(d) / len(d)) ** 2 for x in d) for d in subjects) / sum(len(d) - 1 for d in subjects)
    means = [sum(d) / len(d) for d in subjects]
    grand = sum(means) / len(means)
    between_of_means = sum((m - grand) ** 2 for m in means) / (len(means) - 1)
    return max(between_of_means - within / n, 0.0), within, len(subjects), n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("--a", required=True, help="method folder, e.g. dpg@400")
    ap.add_argument("--b", default="dreambooth", help="baseline method folder")
    ap.add_argument("--metric", default="identity_kept")
    ap.add_argument("--prompts", type=int, default=13, help="prompts per subject")
    ap.add_argument("--train-seconds", type=float, default=80.0, help="CPU seconds to train one subject (one method)")
    ap.add_argument("--image-seconds", type=float, default=0.3, help="CPU seconds per generated and judged image")
    ap.add_argument("--budget-subjects", type=int, default=24, help="the reference design: this many subjects at K=2")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    sb, sw, s, n = variance_components(read_images(args.bench / args.a, args.metric), read_images(args.bench / args.b, args.metric))
    print(f"{args.a} - {args.b} on {args.metric}: {s} subjects, {n:.0f} images each")
    print(f"between-subject variance {sb:.4f}, within-subject image variance {sw:.4f} (per image)")
    cost = lambda k: args.train_seconds + args.prompts * k * args.image_seconds  # noqa: E731
    budget = args.budget_subjects * cost(2)
    rows = []
    for k in (1, 2, 4, 8):
        subjects = budget / cost(k)
        half = 1.96 * math.sqrt(sb / subjects + sw / (subjects * args.prompts * k))
        rows.append((half, k, subjects))
    print(f"designs of equal CPU time ({budget / 3600:.1f} core-hours per method): 95% half-width of the mean difference")
    for half, k, subjects in sorted(rows):
        print(f"  K={k} images per prompt, {subjects:5.1f} subjects: +-{half:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
