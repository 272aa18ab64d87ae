"""train-many against one subject at a time: seconds per step, subjects per hour, and agreement with K=1.

    python benchmarks/bench_many.py                               # mini on the CPU: K = 1, 2, 4 over 4 subjects
    python benchmarks/bench_many.py --model sd15-random --ks 1,2,4,8 --mixed-precision bf16 --dry-run   # the GPU plan

The same subjects (MiniBench subjects, seeds 0, 1, ...) train once per K in this one process, one after the other,
through `train_many(subjects_per_batch=K)`: K=1 is each subject alone (its calls unbatched), K>1 stacks K subjects'
denoiser calls into one batched call per step. Per K:
  s/step          median over the timed steps (after --warmup) of a batch step: every subject of the batch advances
  subject-steps/s K / (s/step): training throughput
  subjects/hour   3600 / (steps x s/step / K): subjects finished per hour of training steps (set-up excluded), and
                  wall: subjects per hour of the whole run (loading, class images, exports included)
  agreement       per subject against its K=1 run: the largest relative difference of a logged loss, and
                  |w_K - w_1| / |w_1| over the trained weights (float rounding: tests/test_training_many.py)
--dry-run prints what would run (settings, K values) without loading a model: sd15-random and sdxl-random are
real-size random-weight models meant for a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GPU_MODELS = {"sd15-random": 512, "sdxl-random": 1024}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini", help="preset, hub id or folder (default: mini)")
    parser.add_argument("--subjects", type=int, default=None, help="subjects trained at every K (default: the largest K)")
    parser.add_argument("--ks", default="1,2,4", help="subjects per batch to compare (1 first: the reference)")
    parser.add_argument("--method", default="dreambooth")
    parser.add_argument("--adapter", choices=("lora", "full"), default=None, help="default: full on mini, lora elsewhere")
    parser.add_argument("--steps", type=int, default=12, help="training steps per subject (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any training setting")
    parser.add_argument("--output", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; load nothing")
    return parser


def settings(args: argparse.Namespace) -> dict:
    from rewardbooth.config import parse_override

    adapter = args.adapter or ("full" if args.model == "mini" else "lora")
    overrides = {"model.name": args.model, "train.method": args.method, "adapter.kind": adapter, "adapter.train_text_encoder": False,
                 "train.steps": args.steps, "train.batch_size": 1, "train.log_every": 1, "train.checkpoint_every": 0,
                 "train.mixed_precision": args.mixed_precision, "validation.every": 0, "validation.select": False,
                 "prior.num_class_images": 2, "prior.generation_steps": 4, "data.center_crop": True,
                 "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 4,
                 "dpg.reward": "recon", "dpg.critic_input": "latent", "dpg.critic_warmup_steps": 0}
    if args.resolution or args.model in GPU_MODELS:
        overrides["data.resolution"] = args.resolution or GPU_MODELS[args.model]
    overrides.update(parse_override(text) for text in args.set)
    return overrides


def subjects(root: Path, count: int) -> list[tuple[str, Path, str]]:
    from rewardbooth.mini.world import make_subjects

    out = []
    for subject in make_subjects(count, seed=0, num_images=4, size=64):
        folder = root / "subjects" / subject.name
        if not folder.is_dir():
            subject.save(folder)
        out.append((subject.name, folder, subject.class_noun))
    return out


def run_k(k: int, args: argparse.Namespace, root: Path, people) -> dict:
    from rewardbooth.methods import load_config
    from rewardbooth.training.many import ManyEngine, SubjectRun, train_many
    from rewardbooth.training.run_dir import prepare_run_dir, read_metrics

    runs = []
    for i, (name, folder, noun) in enumerate(people):
        cfg = load_config(overrides={**settings(args), "data.instance_dir": str(folder), "data.class_noun": noun, "train.seed": i})
        run_dir = root / f"k{k}" / name
        prepare_run_dir(run_dir, resume=False, overwrite=False)
        runs.append(SubjectRun(name, cfg, run_dir))
    engine = ManyEngine(progress=False)
    started = time.perf_counter()
    outcomes = train_many(runs, progress=False, subjects_per_batch=k, engine=engine)
    wall = time.perf_counter() - started
    failed = [f"{o.name}: {o.error}" for o in outcomes if not o.ok]
    if failed:
        raise SystemExit(f"K={k}: " + "; ".join(failed))
    per_step = []
    for run in runs:
        records = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if "seconds_per_step" in r and r["step"] > args.warmup]
        per_step.append(statistics.median(r["seconds_per_step"] for r in records))
    s_step = statistics.median(per_step)
    timed = args.steps
    return {"K": k, "s_per_step": s_step, "subject_steps_per_s": k / s_step, "subjects_per_hour": 3600 * k / (timed * s_step),
            "subjects_per_hour_wall": 3600 * len(runs) / wall, "wall_s": wall, "stacked_calls": engine.stats["stacked_calls"],
            "alone_calls": engine.stats["alone_calls"], "runs": {r.name: str(r.run_dir) for r in runs}}


def agreement(reference: dict, other: dict) -> tuple[float, float]:
    """(largest relative loss difference, |w_K - w_1| / |w_1|) over the subjects."""
    from safetensors.torch import load_file

    from rewardbooth.training.run_dir import read_metrics

    worst_loss, worst_weights = 0.0, 0.0
    for name, ref_dir in reference["runs"].items():
        run_dir = Path(other["runs"][name])
        a = {r["step"]: r["loss"] for r in read_metrics(Path(ref_dir) / "metrics.jsonl") if "loss" in r}
        b = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
        worst_loss = max(worst_loss, max(abs(a[s] - b[s]) / abs(a[s]) for s in a))
        weights = json.loads((Path(ref_dir) / "result.json").read_text())["weights"]
        files = [Path(weights)] if weights.endswith(".safetensors") else sorted((Path(ref_dir) / weights).glob("*.safetensors"))
        difference = norm = 0.0
        for file in files:
            relative = Path(file).relative_to(ref_dir) if Path(file).is_absolute() else Path(file)
            wa, wb = load_file(Path(ref_dir) / relative), load_file(run_dir / relative)
            difference += sum(float((wa[k].double() - wb[k].double()).pow(2).sum()) for k in wa)
            norm += sum(float(wa[k].double().pow(2).sum()) for k in wa)
        worst_weights = max(worst_weights, math.sqrt(difference / norm))
    return worst_loss, worst_weights


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if ks[0] != 1:
        ks = [1, *[k for k in ks if k != 1]]
    args.subjects = args.subjects or max(ks)
    if args.dry_run:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu (none here: the numbers below need a GPU)"
        print(f"would train {args.subjects} MiniBench subjects x {args.steps} steps of {args.method} on {args.model} "
              f"({device}) at K = {', '.join(map(str, ks))}, each K after the other in this process, with:")
        for key, value in settings(args).items():
            print(f"  {key} = {value}")
        print("then print s/step, subject-steps/s, subjects/hour (training and wall) per K, and each K's agreement with K=1.")
        if args.model in GPU_MODELS:
            print(f"GPU: python benchmarks/bench_many.py --model {args.model} --ks {args.ks} --mixed-precision bf16 "
                  f"--subjects {max(ks)}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="bench-many-"))
    people = subjects(work, args.subjects)
    rows = [run_k(k, args, work, people) for k in ks]
    for row in rows[1:]:
        row["loss_rel_diff_vs_k1"], row["weights_rel_diff_vs_k1"] = agreement(rows[0], row)
    rows[0]["loss_rel_diff_vs_k1"] = rows[0]["weights_rel_diff_vs_k1"] = 0.0
    header = f"{'K':>3} {'s/step':>8} {'vs K=1':>7} {'subj-steps/s':>13} {'subjects/h':>11} {'wall subj/h':>12} {'loss diff':>10} {'weight diff':>12}"
    print(f"{args.model}, {args.method}, {settings(args)['adapter.kind']}, {args.subjects} subjects x {args.steps} steps:")
    print(header)
    for row in rows:
        print(f"{row['K']:>3} {row['s_per_step']:>8.3f} {row['s_per_step'] / rows[0]['s_per_step']:>6.2f}x "
              f"{row['subject_steps_per_s']:>13.2f} {row['subjects_per_hour']:>11.0f} {row['subjects_per_hour_wall']:>12.0f} "
              f"{row['loss_rel_diff_vs_k1']:>10.1e} {row['weights_rel_diff_vs_k1']:>12.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "runs"} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
