"""GPU check: s/step, peak memory beside the estimate, and achieved TFLOP/s of every method, and
sampling images/s, on random-weight models at real sizes: SD 1.5 and SDXL at native size, FLUX.1-dev
and SD3.5 Large at 1024 px (on a bf16 and on an int8 base), FLUX.2 [klein] base 4B, Z-Image (6B) and Qwen-Image (20B) at 1024 px, all in
bf16 with LoRA.

    bash benchmarks/gpu_check.sh                        # on one GPU (U-Nets under 8 minutes; the flow models not timed yet)
    bash benchmarks/gpu_check.sh --models flux,flux-int8 --methods dreambooth   # a part of it
    bash benchmarks/gpu_check.sh --dry-run              # on a CPU: every path once, on tiny, tiny-sdxl and the tiny flow presets

The models are built with random weights directly on the device (the real layer sizes of
`sd15-random`, `sdxl-random`, `flux-random`, `sd35-random`, `flux2-klein-random`, `zimage-random` and `qwenimage-random`: nothing to download, nothing written
to disk) and handed to the real trainer, which trains each method a few steps through the same loop
users run (and quantizes the frozen base for `*-int8`). Judges are the offline `tiny` encoders (only
RPO scores anything, once, before training). The flow models train with gradient checkpointing
(FLUX.1-dev's bf16 LoRA without it is estimated at 73 GiB at 1024 px) and are not sampled.

TFLOP/s counts the denoiser's own work, measured with torch's FlopCounterMode on one forward at the
method's batch: x2 per step for LoRA (forward, backward to the input), x3 for full fine-tuning,
+1 forward for RPO's frozen reference; checkpointing's recompute is not counted. The card's peak is
its dense bf16 tensor rate.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

# Dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0,
                    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
FULL = {"sd15": "sd15-random", "sdxl": "sdxl-random", "flux": "flux-random", "sd35": "sd35-random", "klein": "flux2-klein-random",
        "zimage": "zimage-random", "qwenimage": "qwenimage-random"}
DRY = {"sd15": "tiny", "sdxl": "tiny-sdxl", "flux": "tiny-flux", "sd35": "tiny-sd3", "klein": "tiny-flux2", "zimage": "tiny-zimage",
       "qwenimage": "tiny-qwenimage"}
FLOW = {"flux", "sd35", "klein", "zimage", "qwenimage"}  # trained at FLOW_PX with gradient checkpointing; "<key>-int8" on an int8 base
FLOW_PX, DRY_FLOW_PX = 1024, 64
MODELS = "sd15,sdxl,flux,flux-int8,sd35,sd35-int8,klein,zimage,qwenimage"
METHODS = ("dreambooth", "rpo", "dpg")
INT8 = "-int8"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, one timed step: checks every path")
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", default=None, help="also write the rows here")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup = 1, 1
    return args


def card_peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def unet_forward_flops(trainer, components, batch: int, resolution: int, vae_factor: int, dtype, device: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from rewardbooth.training import memory

    probe = components.family().probe(components.unet, batch, resolution // vae_factor, dtype, device)
    with torch.no_grad(), memory.autocast_for(device, trainer.cfg.train.mixed_precision), FlopCounterMode(display=False) as counter:
        probe()
    return counter.get_total_flops()


def precision_name(device: str) -> str:
    return "bf16" if device.startswith("cuda") else "fp32"


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: whole-process peak RSS


def random_components(preset: str, device: str):
    """The preset with random weights built on the device; flow models in bf16 from the start on a GPU."""
    from rewardbooth.models.loading import Components
    from rewardbooth.models.tiny_flow import FLOW_PRESETS
    from rewardbooth.training.setup import offloadable_text_encoders

    components = Components.random_on(preset, device, torch.bfloat16 if device.startswith("cuda") and preset in FLOW_PRESETS else None)
    if preset not in FLOW_PRESETS:
        return components
    for encoder in offloadable_text_encoders(components):  # T5 in CPU memory, where the trainer keeps it on a GPU,
        encoder.to("cpu")  # so the set-up peak does not count it
    return components


def train_method(model_key: str, preset: str, method: str, args, device: str, subject_dir: Path, work: Path) -> dict:
    from rewardbooth.methods import load_config
    from rewardbooth.training import loop, memory, setup
    from rewardbooth.training.run_dir import prepare_run_dir

    take_device_peak = memory.take_device_peak

    components = random_components(preset, device)
    flow = model_key.removesuffix(INT8) in FLOW
    resolution = (DRY_FLOW_PX if args.dry_run else FLOW_PX) if flow else components.native_resolution
    cfg = load_config(overrides={
        "model.name": preset, "train.method": method, "data.instance_dir": str(subject_dir), "data.class_noun": "toy",
        "data.resolution": resolution, "adapter.kind": "lora", "adapter.train_text_encoder": False,
        "model.quantize": "int8" if model_key.endswith(INT8) else None, "train.gradient_checkpointing": flow,
        "train.mixed_precision": "bf16" if device.startswith("cuda") else "no", "train.steps": args.warmup + args.steps,
        "train.log_every": 1, "train.checkpoint_every": 0, "validation.every": 0, "prior.enabled": method != "rpo",
        "prior.num_class_images": 2, "prior.generation_steps": 4, "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 4,
        "evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny",
    })
    run_dir = work / f"{model_key}-{method}"
    prepare_run_dir(run_dir, resume=False, overwrite=False)
    take_device_peak(device)  # forget the earlier runs' peaks
    trainer = loop.Trainer(cfg, run_dir, progress=False)
    peaks = []  # the loop's readings: set-up's peak first, then one per logged step

    def recording_peak(dev):
        peaks.append(take_device_peak(dev))
        return peaks[-1]

    with mock.patch.object(loop, "load_components", lambda *a, **k: components), \
            mock.patch.object(memory, "take_device_peak", recording_peak):
        trainer.run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r["seconds_per_step"] for r in records if "seconds_per_step" in r and r["step"] > args.warmup]
    seconds = statistics.median(timed)
    on_gpu = device.startswith("cuda")
    # GPU: the training steps' own peak (what the estimate is of) apart from set-up's; CPU: whole-process RSS.
    setup_gib = peaks[0] if on_gpu else None
    peak_gib = max(r["peak_memory_gib"] for r in records if "peak_memory_gib" in r) if on_gpu else peak_bytes(device) / 1024**3
    n = trainer.method.unet_batch(type("Ctx", (), {"cfg": cfg})())
    forward = unet_forward_flops(trainer, components, n, resolution, components.vae_scale_factor,
                                 setup.DTYPES[cfg.train.mixed_precision], device)
    step_flops = forward * (3 if cfg.adapter.kind == "full" else 2) + (forward if method == "rpo" else 0)
    estimate = trainer.memory_estimate.total if trainer.memory_estimate else None
    del trainer, components
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"model": preset, "base": cfg.model.quantize or precision_name(device), "method": method, "resolution": resolution,
            "checkpointing": cfg.train.gradient_checkpointing, "s_per_step": seconds, "peak_gib": peak_gib, "setup_peak_gib": setup_gib,
            "estimate_gib": estimate / 1024**3 if estimate else None, "tflop_per_step": step_flops / 1e12,
            "tflops": step_flops / 1e12 / seconds}


def sampling_rate(preset: str, device: str, dry: bool) -> dict:
    from rewardbooth.models.loading import Components, make_pipeline
    from rewardbooth.sampling import SampleSettings, generate

    components = Components.random_on(preset, device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for part in (components.unet, components.vae, *components.text_encoders):
        part.to(dtype=dtype)
    pipe = make_pipeline(components)
    settings = SampleSettings(steps=2 if dry else 30, guidance_scale=7.5, batch_size=4)
    prompts, k = (["a toy"], 1) if dry else (["a toy on the beach", "a toy in the snow"], 2)
    generate(pipe, prompts, k, settings)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(pipe, prompts, k, settings)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"model": preset, "images": len(prompts) * k, "steps": settings.steps, "images_per_s": len(prompts) * k / elapsed}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    from rewardbooth.mini.world import make_subject

    presets = DRY if args.dry_run else FULL
    peak = card_peak(device)
    name = torch.cuda.get_device_name(device) if device == "cuda" else "CPU (dry run)"
    started = time.perf_counter()
    rows, samples = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subject_dir = work / "toy"
        make_subject(seed=3, num_images=4).resized(1024 if not args.dry_run else 64).save(subject_dir)
        for model_key in args.models.split(","):
            preset = presets[model_key.removesuffix(INT8)]
            for method in args.methods.split(","):
                rows.append(train_method(model_key, preset, method, args, device, subject_dir, work))
                print(f"  {model_key} {method}: {rows[-1]['s_per_step']:.3f} s/step", flush=True)
            if model_key not in FLOW and not model_key.endswith(INT8):  # flow models: training only (time)
                samples.append(sampling_rate(preset, device, args.dry_run))
    print(f"\n{time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, {precision_name(device)}, LoRA rank 4, batch 1 (+ class image / negative), "
          f"median of {args.steps} steps after {args.warmup}; flow models with gradient checkpointing; {time.perf_counter() - started:.0f} s in all")
    print("| model | base | px | method | s/step | training peak GiB (estimate) | set-up peak GiB | denoiser TFLOP/step | TFLOP/s | % of card peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        share = f"{100 * r['tflops'] / peak:.1f}" if peak else "n/a"
        estimate = f" ({r['estimate_gib']:.2f})" if r["estimate_gib"] else ""
        setup = f"{r['setup_peak_gib']:.2f}" if r["setup_peak_gib"] is not None else "n/a (CPU: RSS is whole-process)"
        print(f"| {r['model']} | {r['base']} | {r['resolution']} | {r['method']} | {r['s_per_step']:.3f} | {r['peak_gib']:.2f}{estimate} | "
              f"{setup} | {r['tflop_per_step']:.4g} | {r['tflops']:.4g} | {share} |")
    if samples:
        print("\n| model | sampling images/s | images | steps |")
        print("| --- | --- | --- | --- |")
    for s in samples:
        print(f"| {s['model']} | {s['images_per_s']:.3f} | {s['images']} | {s['steps']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "training": rows, "sampling": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
