"""Training memory: the estimate `rewardbooth train` prints, as a table and against measurement.

    python benchmarks/bench_memory.py table                  # SD 1.5 and SDXL at native size: which set-ups fit 12 / 24 GB
    python benchmarks/bench_memory.py measure --model tiny   # estimate vs measured peak of a short real run

`table` builds SD 1.5- and SDXL-shaped models (the real layer sizes, random weights) on fake
tensors, so it needs no download, no GPU and almost no memory, and runs the estimate the trainer
runs: frozen parts placed as the trainer places them, adapters attached by the trainer's own
code, each method's forward passes traced. Figures are allocated tensor memory; the CUDA context
and the allocator's cache add roughly 0.5-1.5 GB to what nvidia-smi shows.

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
    "dpg (recon critic)": ("dpg", {}),
    "dpg (direct / feature critic)": ("dpg", {"dpg.actor": "direct", "dpg.reward": "dino"}),
}
MODELS = {"SD 1.5 (512 px)": "sd15-random", "SDXL (1024 px)": "sdxl-random"}


def common_settings(method: str) -> dict:
    """Every row's base: LoRA, frozen text encoders, prior preservation for DreamBooth and DPG
    (the methods' paper defaults, full fine-tuning and DPG's text encoder, would hide the set-up)."""
    return {"adapter.kind": "lora", "adapter.train_text_encoder": False, "prior.enabled": method != "rpo"}


def components_on_meta(preset_name: str):
    """The preset's components with parameters on the meta device: shapes and dtypes, no storage."""
    from accelerate import init_empty_weights

    from rewardbooth.models.loading import Components
    from rewardbooth.models.tiny import TINY_PRESETS, build_tiny_pipeline

    with init_empty_weights():  # parameters on meta; buffers and schedulers as usual
        pipe = build_tiny_pipeline(TINY_PRESETS[preset_name])
    return Components.from_pipeline(preset_name, pipe)


def table_estimate(preset_name: str, method_name: str, overrides: dict):
    """The trainer's estimate for a set-up, on meta SD-shaped weights placed and adapted by the
    trainer's own code."""
    from rewardbooth.methods import get_method, load_config
    from rewardbooth.methods.context import TrainContext
    from rewardbooth.methods.dpg import decode_latents
    from rewardbooth.training import memory
    from rewardbooth.training.setup import attach_trainable, place_frozen

    components = components_on_meta(preset_name)
    cfg = load_config(overrides={"train.method": method_name, "data.class_noun": "dog", **common_settings(method_name),
                                 "data.resolution": components.native_resolution, **overrides})
    weight_dtype = place_frozen(components, "meta", cfg.train.mixed_precision)
    groups = attach_trainable(components, cfg)
    method = get_method(method_name)()
    # What prepare() would have set, without images: prior preservation on, the trained
    # U-Net's frozen copy for RPO's reference under full fine-tuning, DPG's actor settings.
    method.prior = cfg.prior.enabled
    method.frozen_copy = copy.deepcopy(components.unet).requires_grad_(False) if cfg.adapter.kind == "full" and method_name == "rpo" else None
    # The forward passes are traced on CPU stand-ins of the meta weights.
    ctx = TrainContext(cfg, Path("."), SimpleNamespace(device=torch.device("cpu")), components,
                       components.native_resolution, weight_dtype)
    ctx.unet = components.unet
    if method_name == "dpg":  # the released critic judges latents; the direct actor decodes (no encoder on fake tensors)
        method.actor = SimpleNamespace(decodes=cfg.dpg.actor == "direct",
                                       judge=SimpleNamespace(decode=lambda latents: decode_latents(ctx, latents), encoder=None))
    trained = [p for group in groups for p in group["params"]]
    return memory.estimate(resident=memory.resident_modules([components, method]), trained=trained,
                           probes=method.memory_probes(ctx), optimizer=cfg.train.optimizer,
                           mixed_precision=cfg.train.mixed_precision, device="cpu")


def cmd_table(args) -> None:
    print("Estimated peak training memory, GiB (batch 1, native size, DreamBooth and DPG with prior preservation,")
    print("rank-4 LoRA on attention, text encoders frozen;")
    print("'fits' counts the estimate plus 1 GiB of CUDA context and allocator slack).")
    header = "| model | method | " + " | ".join(SETUPS) + " |"
    print(header)
    print("|" + " --- |" * (2 + len(SETUPS)))
    for model_label, preset in MODELS.items():
        for method_label, (method, method_overrides) in METHODS.items():
            cells = []
            for setup in SETUPS.values():
                total = table_estimate(preset, method, {**method_overrides, **setup}).total / GIB
                fits = "12" if total + 1 <= 12 else "24" if total + 1 <= 24 else "-"
                cells.append(f"{total:.1f} ({'fits ' + fits if fits != '-' else 'over 24'})")
            print(f"| {model_label} | {method_label} | " + " | ".join(cells) + " |", flush=True)


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
        print(f"| model | method | set-up | estimate GiB | measured GiB | measured / estimate | measured as |")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="SD 1.5 / SDXL set-ups against 12 and 24 GB")
    measure = sub.add_parser("measure", help="estimate vs measured peak of short real runs")
    measure.add_argument("--model", default="tiny")
    measure.add_argument("--resolution", type=int, default=64)
    measure.add_argument("--steps", type=int, default=3)
    measure.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    measure.add_argument("--setups", nargs="+", default=["LoRA fp32", "full bf16 + checkpointing"], choices=list(SETUPS))
    args = parser.parse_args()
    {"table": cmd_table, "measure": cmd_measure}[args.command](args)


if __name__ == "__main__":
    main()
