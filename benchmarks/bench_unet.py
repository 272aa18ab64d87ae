"""One U-Net training pass (forward + backward) under each speed-up on offer, against plain fp32.

    python benchmarks/bench_unet.py                                   # tiny at 128 px, CPU
    python benchmarks/bench_unet.py --model sd15-random --resolution 256
    python benchmarks/bench_unet.py --model sd15-random --resolution 512 --device cuda

More than 95% of a training step is this pass, so it is where a cheaper step has to come from.
Variants: fp32 (eager, the reference), bf16 autocast (what `--mixed-precision bf16` does),
channels-last memory format (alone and with bf16), torch.compile (inductor) in fp32 and with bf16 autocast. Rounds
alternate between the variants, so a busy machine slows all alike; s/pass is the median. Each
variant also says how far its loss and its gradient are from fp32's on the same inputs
(relative error), so a faster pass comes with how much the result moved. torch.compile's first
pass (the compilation) is printed on its own.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("fp32", "bf16-autocast", "channels-last", "channels-last+bf16", "compile", "compile+bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="SD-shaped preset, hub id or folder (default tiny)")
    parser.add_argument("--resolution", type=int, default=128, help="pixels (default 128)")
    parser.add_argument("--batch-size", type=int, default=2, help="latents per pass (an instance and a class image: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per variant first")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}")
    return args


def inputs(unet, batch_size: int, side: int, device: str):
    generator = torch.Generator().manual_seed(0)
    cfg = unet.config
    latents = torch.randn(batch_size, cfg.in_channels, side, side, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    text = torch.randn(batch_size, 77, cfg.cross_attention_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    return [t.to(device) for t in (latents, noise, text, timesteps)]


def make_pass(unet, variant: str, device: str, batch):
    latents, noise, text, timesteps = batch
    if "channels-last" in variant:
        unet = unet.to(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)
    model = torch.compile(unet) if variant.startswith("compile") else unet
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled="bf16" in variant)

    def one_pass():
        unet.zero_grad(set_to_none=True)
        with autocast:
            prediction = model(latents, timesteps, text).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.detach()

    return unet, one_pass


def gradient(unet) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in unet.parameters() if p.grad is not None])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rewardbooth.models.loading import Components, load_components
    from rewardbooth.models.tiny import TINY_PRESETS

    # Presets are built on the device (sd15-random is 4 GB: no cache write and read back).
    components = Components.random_on(args.model, args.device) if args.model in TINY_PRESETS else load_components(args.model)
    if components.is_sdxl:
        raise SystemExit("bench_unet: SD-shaped models only (SDXL's U-Net needs its added conditioning)")
    side = args.resolution // components.vae_scale_factor
    base = components.unet.to(args.device).train()
    batch = inputs(base, args.batch_size, side, args.device)
    runs, first, errors, failed = {}, {}, {}, {}
    for variant in args.variants:
        unet, one_pass = make_pass(copy.deepcopy(base), variant, args.device, batch)
        try:
            start = time.perf_counter()
            loss = one_pass()
            first[variant] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler for inductor: report, go on
            failed[variant] = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            continue
        runs[variant] = (unet, one_pass)
        errors[variant] = (loss, gradient(unet))
        for _ in range(args.warmup - 1):
            one_pass()
    times: dict[str, list[float]] = {v: [] for v in runs}
    for _ in range(args.repeats):
        for variant, (_, one_pass) in runs.items():
            start = time.perf_counter()
            one_pass()
            times[variant].append(time.perf_counter() - start)

    reference = errors.get("fp32")
    threads = torch.get_num_threads()
    print(f"{args.model} U-Net, {args.resolution} px ({side}x{side} latents), batch {args.batch_size}, {args.device}"
          f"{f', {threads} threads' if args.device == 'cpu' else ''}, median of {args.repeats} alternating rounds")
    print("| variant | s/pass | vs fp32 | first pass s | loss rel. error | gradient rel. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    floor = statistics.median(times["fp32"]) if "fp32" in times else None
    for variant in args.variants:
        if variant in failed:
            print(f"| {variant} | failed: {failed[variant]} | | | | |")
            continue
        seconds = statistics.median(times[variant])
        loss, grad = errors[variant]
        loss_err = grad_err = "-"
        if reference is not None and variant != "fp32":
            loss_err = f"{abs(loss.item() - reference[0].item()) / abs(reference[0].item()):.1e}"
            grad_err = f"{(grad - reference[1]).norm().item() / reference[1].norm().item():.1e}"
        ratio = f"{seconds / floor:.2f}" if floor else "-"
        print(f"| {variant} | {seconds:.3f} | {ratio} | {first[variant]:.1f} | {loss_err} | {grad_err} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
