"""Seconds per training step and peak memory of every method, against a plain U-Net step.

    python benchmarks/bench_steps.py                      # tiny preset, CPU, all registered methods
    python benchmarks/bench_steps.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --mixed-precision fp16

Each method (and the "floor") trains through the real loop (`train`, log_every=1) in its own
subprocess, so peak memory belongs to that method alone. The figure per method is the median
`seconds_per_step` of the steps after the warm-up. One-off work (class images, negatives,
reward scores) is kept tiny and is outside the timed steps; validation and checkpoints are off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = "floor"
RESULT_TAG = "BENCH_STEPS_RESULT "  # marks the child's result line among any library output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="hub id, diffusers folder or preset (default: tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, autotuning, caches)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--adapter", choices=("lora", "full"), default="lora")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, repeatable (e.g. evaluation.align_model=... for RPO off the tiny preset)")
    # Internal: the parent re-invokes the script with these for one method.
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be positive and --warmup non-negative")
    return args


# --- one method, inside its own process ------------------------------------------------------


def floor_method():
    import torch

    from rewardbooth import diffusion
    from rewardbooth.methods.base import Method

    class Floor(Method):
        """One U-Net forward+backward, MSE to the model's target, on 2*batch_size fixed latents."""

        name = FLOOR

        def prepare(self, ctx):
            b = ctx.cfg.train.batch_size
            side = ctx.resolution // ctx.components.vae_scale_factor
            shape = (2 * b, ctx.components.unet.config.in_channels, side, side)
            self.x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(ctx.device, ctx.weight_dtype)
            self.text = ctx.encode_prompts([ctx.cfg.instance_prompt] * b + [ctx.cfg.class_prompt] * b)

        def loss(self, ctx, generator):
            noised = diffusion.add_noise(ctx.noise_scheduler, self.x0, generator)  # fresh t and eps, as the methods draw
            return diffusion.denoising_error(ctx.unet, ctx.noise_scheduler, noised, self.text).mean(), {}

    return Floor


def measured(cls):
    """`cls` whose first loss call starts the CUDA peak-memory window (setup is not counted)."""
    import torch

    class Measured(cls):
        started = False

        def loss(self, ctx, generator):
            if not self.started:
                self.started, self.resolution, self.device = True, ctx.resolution, ctx.device
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                    torch.cuda.reset_peak_memory_stats(ctx.device)
            return super().loss(ctx, generator)

    return Measured


def run_one(args: argparse.Namespace, work: Path) -> dict:
    import resource

    import torch

    from rewardbooth.config import parse_override
    from rewardbooth.methods import load_config, method_registry
    from rewardbooth.models.tiny import TINY_PRESETS
    from rewardbooth.training.loop import train
    from rewardbooth.training.run_dir import prepare_run_dir

    cls = floor_method() if args.one == FLOOR else method_registry()[args.one]
    overrides = {
        # The floor borrows DreamBooth's config; its own prepare/loss ignore the method settings.
        "train.method": "dreambooth" if args.one == FLOOR else args.one,
        "model.name": args.model, "data.resolution": args.resolution, "adapter.kind": args.adapter,
        "data.instance_dir": str(work / "subject"), "data.class_noun": "toy", "data.min_image_size": 0,
        "train.steps": args.warmup + args.steps, "train.batch_size": args.batch_size, "train.learning_rate": 1e-5,
        "train.mixed_precision": args.mixed_precision, "train.log_every": 1, "train.checkpoint_every": 0,
        "validation.every": 0,
        # One-off work: as little as the methods accept; it runs before the timed steps.
        "prior.num_class_images": 2, "prior.generation_steps": 2, "prior.generation_batch_size": 2,
        "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2,
    }
    if args.model in TINY_PRESETS:  # offline reward encoders to match the offline model
        overrides.update({f"evaluation.{k}_model": "tiny" for k in ("align", "clip", "dino")})
    overrides.update(parse_override(text) for text in args.set)
    cfg = load_config(overrides=overrides)
    cfg.data.resolution = args.resolution  # None must stay None (native size), whatever a method's defaults say

    run_dir = work / args.one
    prepare_run_dir(run_dir, resume=False, overwrite=False)
    method = measured(cls)()
    train(cfg, run_dir, progress=False, method=method)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["seconds_per_step"] for r in records if "seconds_per_step" in r and r["step"] > args.warmup]
    cuda = method.device.type == "cuda"
    if cuda:
        peak_mb, memory = torch.cuda.max_memory_allocated(method.device) / 2**20, "torch.cuda.max_memory_allocated over the training steps"
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak_mb, memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "whole-process peak RSS (includes setup)"
    return {
        "method": args.one, "seconds_per_step": statistics.median(times), "times": times, "peak_mb": peak_mb,
        "memory": memory, "device": torch.cuda.get_device_name(method.device) if cuda else "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": args.model, "resolution": method.resolution,
        "batch_size": args.batch_size, "adapter": args.adapter, "mixed_precision": args.mixed_precision,
    }


# --- the parent: one subprocess per method, then the table -----------------------------------


def spread(times: list[float]) -> str:
    """Interquartile range relative to the median: how much to trust a ratio."""
    if len(times) < 4:
        return "-"
    q = statistics.quantiles(times, n=4)
    return f"{(q[2] - q[0]) / statistics.median(times):.0%}"


def print_table(results: dict[str, dict]) -> None:
    first = next(iter(results.values()))
    floor, base = results.get(FLOOR), results.get("dreambooth")
    print(f"torch {first['torch']} | device {first['device']} | {first['threads']} thread(s) | model {first['model']} | "
          f"{first['resolution']} px | batch {first['batch_size']} | adapter {first['adapter']} | "
          f"mixed precision {first['mixed_precision']} | {len(first['times'])} timed steps each")
    print("floor: one U-Net forward+backward (MSE to the model's target) on 2 x batch latents with fixed text\n"
          "       embeddings, through the same loop (optimizer, clipping, logging) -- the least any method can cost.")
    print("s/step: median seconds_per_step after the warm-up (ratios use it); min: fastest step; iqr: interquartile\n"
          "        range / median. Shared or busy machines drift: trust a ratio only well beyond the iqr.")
    print(f"memory: {first['memory']}.")

    def ratio(value, ref, key):
        return f"{value / ref[key]:.2f}" if ref else "-"

    header = (f"{'method':<12} {'s/step':>9} {'min':>9} {'iqr':>5} {'x floor':>8} {'x dreambooth':>13}   "
              f"{'peak MB':>9} {'x floor':>8} {'x dreambooth':>13}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        s, m = r["seconds_per_step"], r["peak_mb"]
        print(f"{name:<12} {s:>9.4f} {min(r['times']):>9.4f} {spread(r['times']):>5} {ratio(s, floor, 'seconds_per_step'):>8} "
              f"{ratio(s, base, 'seconds_per_step'):>13}   {m:>9.1f} {ratio(m, floor, 'peak_mb'):>8} {ratio(m, base, 'peak_mb'):>13}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for key, value in {"TOKENIZERS_PARALLELISM": "false", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}.items():
        os.environ.setdefault(key, value)
    from rewardbooth.methods import method_registry
    from rewardbooth.mini.world import make_subject

    start, results, failed = time.perf_counter(), {}, []
    with tempfile.TemporaryDirectory(prefix="bench_steps-") as tmp:
        work = Path(args.work or tmp)  # the parent's folder, shared by its children
        if not (work / "subject").is_dir():
            make_subject(seed=3, num_images=3).resized(64).save(work / "subject")
        if args.one is not None:
            result = run_one(args, work)
            if args.json:
                print(RESULT_TAG + json.dumps(result))
            else:
                print_table({args.one: result})
            return 0
        names = args.methods.split(",") if args.methods else list(method_registry())
        unknown = sorted(set(names) - set(method_registry()))
        if unknown:
            print(f"error: unknown method(s) {', '.join(unknown)} (registered: {', '.join(method_registry())})", file=sys.stderr)
            return 2
        for name in [FLOOR, *names]:
            child = subprocess.run([sys.executable, __file__, *argv, "--one", name, "--json", "--work", str(work)],
                                   check=False, capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_TAG)]
            if child.returncode != 0 or not lines:
                failed.append(name)
                print(f"{name}: failed (exit {child.returncode})\n" + "\n".join(child.stderr.strip().splitlines()[-15:]), file=sys.stderr)
                if name == FLOOR:
                    break  # the same settings would fail every method, and there is nothing to compare against
                continue
            results[name] = json.loads(lines[-1][len(RESULT_TAG):])
    if results:
        print_table(results)
    print(f"total {time.perf_counter() - start:.0f} s (setup, one-off work and {args.warmup}+{args.steps} steps per method)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
