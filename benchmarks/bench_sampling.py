"""Sampling throughput: rewardbooth's `generate` (used by generate, bench and validation) against
diffusers' own pipeline call, on the same model, prompts, sampler and settings.

    python benchmarks/bench_sampling.py                          # mini, CPU
    python benchmarks/bench_sampling.py --model tiny-sdxl --steps 10
    python benchmarks/bench_sampling.py --model stabilityai/stable-diffusion-xl-base-1.0 --dtype bf16 --device cuda

Both sides get the same pipeline object, the same prompts and the same number of images per
call. The two are timed in alternation (ours, theirs, ours, ...) so a busy machine slows both
alike; the figures are medians over --repeats rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

RESULT_TAG = "BENCH_SAMPLING_RESULT "
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini", help="preset, hub id or folder (default mini)")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (both sides)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    return parser


def parse_args(argv):
    parser = build_parser()
    return parser.parse_args(argv)


def diffusers_call(pipe, prompts: list[str], images_per_prompt: int, batch_size: int, steps: int, guidance: float, seed: int):
    """What a diffusers user writes: the pipeline called on batches of prompts with a generator."""
    flat = [p for p in prompts for _ in range(images_per_prompt)]
    images = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        generator = torch.Generator("cpu").manual_seed(seed + start)
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
    return images


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rewardbooth.models.loading import load_components, make_pipeline
    from rewardbooth.sampling import SampleSettings, generate

    components = load_components(args.model, dtype=DTYPES[args.dtype])
    pipe = make_pipeline(components).to(args.device)
    prompts = [f"a photo number {i} of a thing" for i in range(args.prompts)]
    if args.model == "mini":
        from rewardbooth.mini.world import CONTEXT_PHRASES

        prompts = [f"a red ball {phrase}" for phrase in list(CONTEXT_PHRASES.values())[: args.prompts]]
    settings = SampleSettings(steps=args.steps, guidance_scale=args.guidance, seed=0, batch_size=args.batch_size)
    n = args.prompts * args.images_per_prompt

    def ours():
        generate(pipe, prompts, args.images_per_prompt, settings)

    def theirs():
        diffusers_call(pipe, prompts, args.images_per_prompt, args.batch_size, args.steps, args.guidance, 0)

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    ours(), theirs()  # warm-up: allocator, kernels, caches
    times = {"rewardbooth": [], "diffusers": []}
    for _ in range(args.repeats):
        times["rewardbooth"].append(timed(ours))
        times["diffusers"].append(timed(theirs))
    rate = {side: n / statistics.median(values) for side, values in times.items()}
    side = components.native_resolution
    print(f"{args.model} ({side} px, {args.dtype}, {args.device}), {n} images per round ({args.prompts} prompts x "
          f"{args.images_per_prompt}), {args.steps} steps, guidance {args.guidance}, {args.batch_size} per call, "
          f"median of {args.repeats} alternating rounds")
    print(f"{'side':<12} {'images/s':>9} {'s/round':>8} {'spread':>14}")
    for name, values in times.items():
        print(f"{name:<12} {rate[name]:>9.2f} {statistics.median(values):>8.2f} {min(values):>6.2f}-{max(values):.2f}")
    print(f"ratio (rewardbooth / diffusers images per second): {rate['rewardbooth'] / rate['diffusers']:.2f}")
    print(RESULT_TAG + f'{{"ours": {rate["rewardbooth"]:.4f}, "diffusers": {rate["diffusers"]:.4f}}}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
