"""Training memory: the estimate `rewardbooth train` prints, as a table and against measurement.

    python benchmarks/bench_memory.py table                  # SD 1.5 / SDXL at native size against 12 / 24 GB, then
                                                             # the flow models (FLUX.1, SD3.5, FLUX.2) at 1024 px against 16 / 24 / 48 GB
    python benchmarks/bench_memory.py table --flow           # the flow models only
    python benchmarks/bench_memory.py table --sharded        # full fine-tuning sharded over 2, 4, 8 GPUs (--fsdp), per GPU
    python benchmarks/bench_memory.py measure --model tiny   # estimate vs measured peak of a short real run

`table` builds the models (the real layer sizes, random weights) on the meta device and traces
them on fake tensors, so it needs no download, no GPU and almost no memory, and runs the estimate
the trainer runs: frozen parts placed (and quantized) as the trainer does it, adapters attached by
the trainer's own code, each method's forward passes traced. Figures are allocated tensor memory;
the CUDA context and the allocator's cache add roughly 0.5-1.5 GB to what nvidia-smi shows.

`measure` trains a few steps in a fresh process and compares the printed estimate with
torch.cuda.max_memory_allocated (GPU) or the growth of peak RSS over the process before the
model was loaded (CPU: includes allocator slack and the sampling of class images).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

GIB = 1024**3
SETUPS = {  # name -> config overrides
    "LoRA fp32": {},
    "LoRA bf16": {"train.mixed_precision": "bf16"},
    "LoRA bf16 + checkpointing": {"train.mixed_precision": "bf16", "train.gradient_checkpointing": True},
    "full bf16 + checkpointing": {"adapter.kind": "full", "train.mixed_precision": "bf16", "train.gradient_checkpointing": True},
    "full bf16 + checkpointing + 8-bit AdamW": {"adapter.kind": "full", "train.mixed_precision": "bf16",
                                                "train.gradient_checkpointing": True, "train.optimizer": "adamw8bit"},
}
METHODS = {  # row label -> (method, overrides)
    "dreambooth": ("dreambooth", {}),
    "rpo": ("rpo", {}),
    "dpg (recon critic)": ("dpg", {"dpg.reward": "recon", "dpg.critic_input": "latent"}),  # the released critic (dpg-recon)
    "dpg (direct / feature critic)": ("dpg", {"dpg.actor": "direct", "dpg.reward": "dino"}),
}
MODELS = {"SD 1.5 (512 px)": "sd15-random", "SDXL (1024 px)": "sdxl-random"}

# Flow-matching models: every real-size entry of FLOW_PRESETS, at 1024 px, against these cards (GB).
FLOW_SETUPS = {
    "LoRA bf16": {"train.mixed_precision": "bf16"},
    "LoRA bf16 + ckpt": {"train.mixed_precision": "bf16", "train.gradient_checkpointing": True},
    "int8 base + LoRA + ckpt": {"train.mixed_precision": "bf16", "train.gradient_checkpointing": True, "model.quantize": "int8"},
    "full bf16 + ckpt": {"adapter.kind": "full", "train.mixed_precision": "bf16", "train.gradient_checkpointing": True},
}
# DPG's default (the feature critic: the look-forward image decoded at full size with gradients) and DPG as released.
FLOW_METHODS = {"dreambooth": ("dreambooth", {}), "dpg": ("dpg", {}),
                "dpg-recon": ("dpg", {"dpg.reward": "recon", "dpg.critic_input": "latent"}), "rpo": ("rpo", {})}
FLOW_RESOLUTION = 1024
FLOW_CARDS = (16, 24, 48)
# Full fine-tuning sharded over N GPUs (train.fsdp): the estimate per GPU, against these cards (GB).
SHARDED_MODELS = {"SDXL": ("sdxl-random", 1024), "FLUX.1-dev": ("flux-random", 1024), "SD3.5 Large": ("sd35-random", 1024)}
SHARDED_METHODS = {"dreambooth": ("dreambooth", {}), "dpg": ("dpg", {}), "rpo": ("rpo", {})}
SHARDED_SETUP = {"adapter.kind": "full", "train.mixed_precision": "bf16", "train.gradient_checkpointing": True}
SHARDED_PROCESSES = (1, 2, 4, 8)  # 1: one card, unsharded, for comparison
SHARDED_CARDS = (24, 48, 80)
FLOW_LABELS = {"flux-random": "FLUX.1-dev", "sd35-random": "SD3.5 Large", "sd35-medium-random": "SD3.5 Medium",
               "flux2-klein-random": "FLUX.2 [klein] 4B", "flux2-klein-9b-random": "FLUX.2 [klein] 9B", "zimage-random": "Z-Image 6B",
               "qwenimage-random": "Qwen-Image 20B"}


def common_settings(method: str) -> dict:
    """Every row's base: LoRA, frozen text encoders, prior preservation for DreamBooth and DPG
    (the methods' paper defaults, full fine-tuning and DPG's text encoder, would hide the set-up)."""
    return {"adapter.kind": "lora", "adapter.train_text_encoder": False, "prior.enabled": method != "rpo"}


def flow_models() -> list[str]:
    """The real-size flow presets whose pipeline the trainer knows."""
    from rewardbooth.models.loading import FLOW_FAMILIES
    from rewardbooth.models.tiny_flow import FAMILIES, FLOW_PRESETS

    return [name for name, preset in FLOW_PRESETS.items() if not preset.tiny and FAMILIES[preset.family]["pipeline"] in FLOW_FAMILIES]


def components_on_meta(preset_name: str):
    """The preset's components with parameters on the meta device: shapes and dtypes, no storage."""
    from accelerate import init_empty_weights

    from rewardbooth.models.loading import Components
    from rewardbooth.models.tiny import TINY_PRESETS, build_tiny_pipeline
    from rewardbooth.models.tiny_flow import FLOW_PRESETS

    if preset_name in FLOW_PRESETS:
        return Components.random_on(preset_name, "meta")
    with init_empty_weights():  # parameters on meta; buffers and schedulers as usual
        pipe = build_tiny_pipeline(TINY_PRESETS[preset_name])
    return Components.from_pipeline(preset_name, pipe)


def table_estimate(preset_name: str, method_name: str, overrides: dict, resolution: int | None = None, processes: int = 1):
    """The trainer's estimate for a set-up, on meta weights placed, quantized and adapted by the
    trainer's own code (at `resolution`, else the model's native size); per process of `processes`
    (train.fsdp: what the trainer shards, split over them)."""
    from rewardbooth.methods import get_method, load_config
    from rewardbooth.methods.context import TrainContext
    from rewardbooth.methods.dpg import decode_latents
    from rewardbooth.models.quantize import quantize_frozen
    from rewardbooth.training import memory, sharding
    from rewardbooth.training.setup import attach_trainable, offloadable_text_encoders, place_frozen

    components = components_on_meta(preset_name)
    resolution = resolution or components.native_resolution
    cfg = load_config(overrides={"train.method": method_name, "data.class_noun": "dog", **common_settings(method_name),
                                 "data.resolution": resolution, **overrides})
    weight_dtype = place_frozen(components, "meta", cfg.train.mixed_precision)
    if cfg.model.quantize:  # as the trainer does it: after placing, before the adapters
        quantize_frozen(components.unet, cfg.model.quantize)
    method = get_method(method_name)()
    # What prepare() would have set, without images: prior preservation on, the trained
    # U-Net's frozen copy for RPO's reference under full fine-tuning (made, as there, before the
    # trained weights turn float32), DPG's actor settings.
    method.prior = cfg.prior.enabled
    method.frozen_copy = copy.deepcopy(components.unet).requires_grad_(False) if cfg.adapter.kind == "full" and method_name == "rpo" else None
    groups = attach_trainable(components, cfg)
    # The forward passes are traced on CPU stand-ins of the meta weights.
    ctx = TrainContext(cfg, Path("."), SimpleNamespace(device=torch.device("cpu")), components, resolution, weight_dtype)
    ctx.unet = components.unet
    if method_name == "dpg":  # the released critic judges latents; the direct actor and the feature critic decode (no encoder on fake tensors)
        method.actor = SimpleNamespace(decodes=cfg.dpg.actor == "direct" or cfg.dpg.critic_input == "features",
                                       judge=SimpleNamespace(decode=lambda latents: decode_latents(ctx, latents), encoder=None))
    trained = [p for group in groups for p in group["params"]]
    # On a GPU the trainer keeps T5 / Qwen3 in CPU memory (unless model.offload_text_encoders=false);
    # cpu_offload cannot take meta weights, so they are left out of the resident modules here.
    offloaded = offloadable_text_encoders(components) if cfg.model.offload_text_encoders is not False else []
    resident = [m for m in memory.resident_modules([components, method]) if not any(m is e for e in offloaded)]
    sharded = sharding.sharded_modules(components, method, cfg.adapter.train_text_encoder) if cfg.train.fsdp else []
    return memory.estimate(resident=resident, trained=trained,
                           probes=method.memory_probes(ctx), optimizer=cfg.train.optimizer,
                           mixed_precision=cfg.train.mixed_precision, device="cpu", processes=processes, sharded=sharded)


def fits(total_gib: float, cards: tuple[int, ...]) -> str:
    """The smallest card (GB) holding the estimate plus 1 GiB of CUDA context and allocator slack."""
    card = next((c for c in cards if total_gib + 1 <= c), None)
    return f"fits {card}" if card else f"over {cards[-1]}"


def offloaded_gib(name: str) -> float:
    """The bf16 weights of the text encoders a GPU run keeps in CPU memory (T5, Qwen3): not in the estimate."""
    from rewardbooth.training import memory
    from rewardbooth.training.setup import offloadable_text_encoders, place_frozen

    components = components_on_meta(name)
    place_frozen(components, "meta", "bf16")
    return memory.weight_bytes(offloadable_text_encoders(components)) / GIB


def quiet_libraries() -> None:
    """Keep the libraries' per-model notes (dtype casts, peft on torchao weights) out of the table."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)


def table_row(labels: list[str], totals: list[float], cards: tuple[int, ...], extra: list[str] = ()) -> str:
    return "| " + " | ".join([*labels, *(f"{total:.1f} ({fits(total, cards)})" for total in totals), *extra]) + " |"


def cmd_sharded_table() -> None:
    started = time.perf_counter()
    print("Full fine-tuning (bf16, gradient checkpointing, AdamW) sharded over N GPUs with --fsdp, GiB per GPU, at 1024 px")
    print("(batch 1 per GPU, DreamBooth and DPG with prior preservation, text encoders frozen; T5 in CPU memory on a GPU;")
    print(f"N = 1: one card, unsharded); 'fits N' = the smallest of {' / '.join(map(str, SHARDED_CARDS))} GB holding the estimate + 1 GiB).")
    print("| model | method | " + " | ".join("1 GPU" if n == 1 else f"{n} GPUs" for n in SHARDED_PROCESSES) + " |")
    print("|" + " --- |" * (2 + len(SHARDED_PROCESSES)))
    for label, (preset, resolution) in SHARDED_MODELS.items():
        for method_label, (method, overrides) in SHARDED_METHODS.items():
            totals = [table_estimate(preset, method, {**overrides, **SHARDED_SETUP, "train.fsdp": n > 1}, resolution, processes=n).total / GIB
                      for n in SHARDED_PROCESSES]
            print(table_row([label, method_label], totals, SHARDED_CARDS), flush=True)
    print(f"({time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s)")


def cmd_table(args) -> None:
    quiet_libraries()
    if args.sharded:
        cmd_sharded_table()
        return
    started = time.perf_counter()
    if not args.flow:
        print("Estimated peak training memory, GiB (batch 1, native size, DreamBooth and DPG with prior preservation,")
        print("rank-4 LoRA on attention, text encoders frozen;")
        print("'fits' counts the estimate plus 1 GiB of CUDA context and allocator slack).")
        print("| model | method | " + " | ".join(SETUPS) + " |")
        print("|" + " --- |" * (2 + len(SETUPS)))
        for label, preset in MODELS.items():
            for method_label, (method, overrides) in METHODS.items():
                totals = [table_estimate(preset, method, {**overrides, **setup}).total / GIB for setup in SETUPS.values()]
                print(table_row([label, method_label], totals, (12, 24)), flush=True)
        print(f"({time.perf_counter() - started:.0f} s)")
    started = time.perf_counter()
    print(f"\nFlow-matching models at {FLOW_RESOLUTION} px, GiB (batch 1, DreamBooth and DPG with prior preservation, rank-4 LoRA")
    print("on attention, text encoders frozen; T5 / Qwen3 in CPU memory, as the trainer keeps them on a GPU: last column,")
    print(f"not in the cells); 'fits N' = the smallest of {' / '.join(map(str, FLOW_CARDS))} GB holding the estimate + 1 GiB).")
    print("| model | method | " + " | ".join(FLOW_SETUPS) + " | in CPU memory |")
    print("|" + " --- |" * (3 + len(FLOW_SETUPS)))
    for name in flow_models():
        encoders = f"{offloaded_gib(name):.1f}"
        for label, (method, overrides) in FLOW_METHODS.items():
            totals = [table_estimate(name, method, {**overrides, **setup}, FLOW_RESOLUTION).total / GIB for setup in FLOW_SETUPS.values()]
            print(table_row([FLOW_LABELS.get(name, name), label], totals, FLOW_CARDS, [encoders]), flush=True)
    print(f"({time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s)")


MEASURE_CHILD = r"""
import json, os, resource, sys, psutil, torch
from pathlib import Path
from rewardbooth.methods import load_config
from rewardbooth.training.loop import Trainer
from rewardbooth.training.run_dir import prepare_run_dir
overrides, run_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(overrides=overrides)
prepare_run_dir(run_dir, resume=False, overwrite=False)
before = psutil.Process().memory_info().rss
trainer = Trainer(cfg, run_dir, progress=False)
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
trainer.run()
if torch.cuda.is_available():
    measured, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
else:
    measured, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "peak RSS growth"
e = trainer.memory_estimate
print("RESULT " + json.dumps({"estimate": e.total, "activations": e.activations, "weights": e.weights, "measured": measured, "how": how}))
"""


def cmd_measure(args) -> None:
    from rewardbooth.mini.world import make_subject

    with tempfile.TemporaryDirectory() as tmp:
        subject = Path(tmp) / "toy"
        make_subject(seed=3, num_images=4).resized(max(64, args.resolution)).save(subject)
        print("| model | method | set-up | estimate GiB | measured GiB | measured / estimate | measured as |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for method_label, (method, method_overrides) in METHODS.items():
            if method_label not in args.methods:
                continue
            for setup_name in args.setups:
                overrides = {"model.name": args.model, "data.instance_dir": str(subject), "data.class_noun": "toy",
                             "data.resolution": args.resolution, "train.method": method, "train.steps": args.steps,
                             "train.checkpoint_every": 0, "validation.every": 0, "prior.num_class_images": 2,
                             "prior.generation_steps": 2, "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2,
                             "evaluation.dino_model": "tiny" if args.model.startswith("tiny") else "facebook/dino-vits16",
                             **common_settings(method), **method_overrides, **SETUPS[setup_name]}
                if method_label.startswith("dpg (direct") and not args.model.startswith("tiny"):
                    continue  # needs a DINO download
                run = Path(tmp) / f"run-{method}-{len(os.listdir(tmp))}"
                out = subprocess.run([sys.executable, "-c", MEASURE_CHILD, json.dumps(overrides), str(run)],
                                     capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(f"| {args.model} | {method_label} | {setup_name} | failed: {out.stderr.strip().splitlines()[-1:]} |")
                    continue
                r = json.loads(line[7:])
                print(f"| {args.model} | {method_label} | {setup_name} | {r['estimate'] / GIB:.3f} | {r['measured'] / GIB:.3f} | "
                      f"{r['measured'] / r['estimate']:.2f} | {r['how']} |", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="SD 1.5 / SDXL set-ups against 12 and 24 GB, flow models against 16 / 24 / 48 GB")
    table.add_argument("--flow", action="store_true", help="the flow-matching models only")
    table.add_argument("--sharded", action="store_true", help="full fine-tuning sharded over 2, 4, 8 GPUs (--fsdp), per GPU")
    measure = sub.add_parser("measure", help="estimate vs measured peak of short real runs")
    measure.add_argument("--model", default="tiny")
    measure.add_argument("--resolution", type=int, default=64)
    measure.add_argument("--steps", type=int, default=3)
    measure.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    measure.add_argument("--setups", nargs="+", default=["LoRA fp32", "full bf16 + checkpointing"], choices=list(SETUPS))
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    {"table": cmd_table, "measure": cmd_measure}[args.command](args)


if __name__ == "__main__":
    main()
