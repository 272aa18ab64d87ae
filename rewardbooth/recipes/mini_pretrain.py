"""Pretrain MiniBench's base model on the procedural world, reproducibly, in one command.

    python -m rewardbooth.recipes.mini_pretrain --out runs/mini-base --preset s --steps 6000 --batch 32 --seed 0

1. trains the autoencoder (AutoencoderKL, 32 px -> 4 x 16 x 16) on world images for
   `--vae-steps` steps and sets its `scaling_factor` to 1 / std(latents);
2. trains the text encoder and U-Net jointly with the standard epsilon loss
   (`rewardbooth.diffusion` primitives) on `pretraining_batch` captions, dropping captions
   to "" with probability `--cfg-drop` so classifier-free guidance works; AdamW, linear
   warm-up then cosine decay;
3. keeps an exponential moving average (EMA) of those weights; the EMA is what gets
   sampled and saved, because at a few thousand steps it draws far cleaner images than the
   raw weights;
4. logs loss and s/step to DIR/metrics.jsonl, writes sample grids for fixed prompts to
   DIR/samples/, and saves the pipeline with `save_pretrained(safe_serialization=True)`
   into DIR, loadable by `rewardbooth.models.loading.load_components(DIR)`. The raw weights,
   optimizer and step go to DIR/train_state.pt so `--resume` continues a stopped run
   (CPU pretraining spans sessions).

`--vae-from DIR` reuses the autoencoder of an earlier run and skips step 1.

`--bench xs,s,m` only times training steps of the named presets and exits.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewardbooth.diffusion import add_noise, denoising_error, encode_prompts
from rewardbooth.mini.world import pretraining_batch
from rewardbooth.recipes.mini_model import (
    MINI_PRESETS,
    MiniModelConfig,
    build_mini_pipeline,
    count_params,
)
from rewardbooth.training.options import WeightEMA
from rewardbooth.training.schedule import warmup_cosine_lr

# diffusers / transformers are imported inside the functions that use them, so --help answers at once.

SAMPLE_PROMPTS = (
    "a red ball on the beach",
    "a blue striped cube in the snow",
    "a green star at night",
    "a yellow house in the desert",
)
FINAL_LR_FRACTION = 0.05  # the cosine decays to 5% of the peak learning rate, not to 0


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1], as SD's VAE expects."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class Batches:
    """World batches drawn in a background thread (rendering is ~3 ms per 32 px image)."""

    def __init__(self, seed: int, batch: int, size: int, prefetch: int = 4):
        self.rng = np.random.default_rng(seed)
        self.batch, self.size = batch, size
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            images, captions, _ = pretraining_batch(self.rng, self.batch, self.size)
            self.q.put((images_to_tensor(images), captions))

    def next(self):
        return self.q.get()

    def close(self):
        self.stop = True
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass


def log(path: Path | None, record: dict) -> None:
    print(json.dumps(record), flush=True)
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# --- autoencoder --------------------------------------------------------------------------


def train_vae(vae, steps: int, batch: int, seed: int, lr: float, device, metrics: Path | None, kl_weight: float = 1e-6):
    """Train the AutoencoderKL on world images (MSE + tiny KL); return held-out PSNR and latent std."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    data = Batches(seed + 1, batch, vae.config.sample_size)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step, steps, lr, min(50, steps // 10 + 1), floor=FINAL_LR_FRACTION)
            x, _ = data.next()
            x = x.to(device)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            mse = torch.nn.functional.mse_loss(recon, x)
            loss = mse + kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # range [-1, 1] -> peak-to-peak 2
                log(metrics, {"phase": "vae", "step": step, "mse": round(mse.item(), 5), "psnr": round(psnr, 2),
                              "s_per_step": round((time.perf_counter() - t0) / (step + 1), 3)})
    finally:
        data.close()
    vae.eval().requires_grad_(False)
    return evaluate_vae(vae, seed, device)


@torch.no_grad()
def evaluate_vae(vae, seed: int, device, n: int = 128) -> dict:
    images, _, _ = pretraining_batch(np.random.default_rng(10_000 + seed), n, vae.config.sample_size)
    x = images_to_tensor(images).to(device)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.mode()).sample
    mse = torch.nn.functional.mse_loss(recon.clamp(-1, 1), x).item()
    latents = posterior.sample()
    return {"psnr": 10 * math.log10(4.0 / max(mse, 1e-10)), "latent_std": latents.std().item(),
            "latent_mean": latents.mean().item(), "recon": recon[:8].cpu(), "orig": x[:8].cpu()}


# --- text encoder + U-Net -----------------------------------------------------------------


def train_step(pipe, opt, x, captions, cfg_drop: float, gen: torch.Generator, rng: np.random.Generator, device):
    captions = ["" if rng.random() < cfg_drop else c for c in captions]
    with torch.no_grad():
        latents = pipe.vae.encode(x.to(device)).latent_dist.sample(generator=None) * pipe.vae.config.scaling_factor
    batch = add_noise(pipe.scheduler, latents, generator=gen)
    embeddings = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    loss = denoising_error(pipe.unet, pipe.scheduler, batch, embeddings).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return loss.item()


@torch.no_grad()
def sample_grid(pipe, prompts, path: Path, seeds=(0, 1, 2, 3), steps: int = 25, guidance: float = 4.0, device="cpu"):
    """One row per prompt, one column per seed, 32 px cells scaled 3x; returns the PIL grid."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sampler = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sampler.set_progress_bar_config(disable=True)
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    size = pipe.vae.config.sample_size
    rows = []
    for prompt in prompts:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = sampler([prompt] * len(seeds), height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance, generator=gens, output_type="np").images
        rows.append(np.concatenate(list((out * 255).round().astype(np.uint8)), axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    if was_training:
        pipe.unet.train()
        pipe.text_encoder.train()
    return grid


def save_pipeline(pipe, out: Path, info: dict) -> int:
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "rewardbooth_mini.json").write_text(json.dumps(info, indent=2))
    return sum(p.stat().st_size for p in out.rglob("*.safetensors"))


TRAIN_STATE = "train_state.pt"


def save_train_state(out: Path, params, opt, ema: WeightEMA, step: int, gen: torch.Generator) -> None:
    state = {"step": step, "params": [p.detach().clone() for p in params], "ema": ema.state_tensors(),
             "optimizer": opt.state_dict(), "noise_generator": gen.get_state()}
    tmp = out / (TRAIN_STATE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / TRAIN_STATE)  # atomic: a kill mid-save leaves the previous state


def benchmark(presets: list[str], batch: int, steps: int, device) -> None:
    for name in presets:
        pipe = build_mini_pipeline(MINI_PRESETS[name])
        pipe.to(device)
        pipe.unet.train()
        pipe.text_encoder.train()
        pipe.vae.requires_grad_(False)
        params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        data = Batches(0, batch, 32)
        gen, rng = torch.Generator("cpu").manual_seed(0), np.random.default_rng(0)
        times = []
        for i in range(steps + 2):
            x, caps = data.next()
            t = time.perf_counter()
            train_step(pipe, opt, x, caps, 0.1, gen, rng, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # first steps warm up allocators
                times.append(time.perf_counter() - t)
        data.close()
        print(json.dumps({"preset": name, "unet_params_M": round(count_params(pipe.unet) / 1e6, 2),
                          "text_params_M": round(count_params(pipe.text_encoder) / 1e6, 2), "batch": batch,
                          "threads": torch.get_num_threads(), "s_per_step": round(float(np.median(times)), 3)}), flush=True)


def run_steps(args, start: int, data, metrics: Path, phase: str, step_fn, sample_fn, checkpoint) -> None:
    """The pretraining loop both recipes share: warm-up + cosine learning rate, one `step_fn(x, captions, lr)` per step
    (its loss), a metrics line every --log-every steps, a sample grid every --sample-every, a save every --save-every."""
    t0, window = time.perf_counter(), []
    try:
        for step in range(start, args.steps):
            lr = warmup_cosine_lr(step, args.steps, args.lr, args.warmup, floor=FINAL_LR_FRACTION)
            x, captions = data.next()
            window.append(step_fn(x, captions, lr))
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                elapsed = time.perf_counter() - t0
                log(metrics, {"phase": phase, "step": done, "loss": round(float(np.mean(window)), 5), "lr": round(lr, 6),
                              "s_per_step": round(elapsed / (done - start), 3), "elapsed_s": round(elapsed, 1)})
                window = []
            if done % args.sample_every == 0 or done == args.steps:
                sample_fn(args.out / "samples" / f"step{done:06d}.png")
            if done % args.save_every == 0 and done != args.steps:
                checkpoint(done)
    finally:
        data.close()


def start_command(ap, args, benchmark) -> tuple[torch.device, Path] | int:
    """A pretraining command's common start: threads and device, `--bench` (time steps, exit 0), then the checked
    run folder and its metrics file; an exit code where the command stops here."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.bench:
        benchmark(args.bench.split(","), args.batch, args.bench_steps, device)
        return 0
    if args.out is None:
        ap.error("--out is required")
    metrics = prepare_out(args.out, args.resume, args.overwrite)
    return 2 if metrics is None else (device, metrics)


def prepare_out(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The run folder of a pretraining (checked: --resume needs its state, a non-empty folder needs --overwrite);
    its metrics.jsonl, emptied unless resuming. None after printing the one-line reason it cannot be used."""
    if resume and not (out / TRAIN_STATE).is_file():
        print(f"error: --resume: {out / TRAIN_STATE} does not exist", file=sys.stderr)
        return None
    if not resume and out.exists() and any(out.iterdir()) and not overwrite:
        print(f"error: {out} is not empty (pass --overwrite or --resume)", file=sys.stderr)
        return None
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if not resume:
        metrics.write_text("")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rewardbooth.recipes.mini_pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="pipeline folder to write (diffusers layout)")
    ap.add_argument("--preset", default="s", choices=sorted(MINI_PRESETS))
    ap.add_argument("--steps", type=int, default=6000, help="text encoder + U-Net steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="probability a caption becomes '' (for CFG)")
    ap.add_argument("--vae-steps", type=int, default=600, help="autoencoder steps before diffusion (0: keep random VAE)")
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--sample-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--bench", default=None, help="comma-separated presets: time training steps and exit")
    ap.add_argument("--bench-steps", type=int, default=6)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse the trained autoencoder in this pipeline folder")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its train_state.pt")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    started = start_command(ap, args, benchmark)
    if isinstance(started, int):
        return started
    device, metrics = started

    torch.manual_seed(args.seed)
    config: MiniModelConfig = replace(MINI_PRESETS[args.preset], seed=args.seed)
    pipe = build_mini_pipeline(config)
    pipe.to(device)
    log(metrics, {"phase": "build", "preset": args.preset, "config": config.to_dict(), "args": {k: str(v) for k, v in vars(args).items()},
                  "params_M": {k: round(count_params(getattr(pipe, k)) / 1e6, 3) for k in ("unet", "vae", "text_encoder")}})

    # 1. autoencoder
    from diffusers import AutoencoderKL

    if args.resume or args.vae_from:
        pipe.vae = AutoencoderKL.from_pretrained(args.out if args.resume else args.vae_from, subfolder="vae").to(device)
        pipe.vae.eval().requires_grad_(False)
        stats = evaluate_vae(pipe.vae, args.seed, device)
        stats["latent_std"] = 1.0 / pipe.vae.config.scaling_factor  # keep the scale the U-Net was trained with
    elif args.vae_steps > 0:
        stats = train_vae(pipe.vae, args.vae_steps, args.vae_batch, args.seed, args.vae_lr, device, metrics)
    else:
        pipe.vae.eval().requires_grad_(False)
        stats = evaluate_vae(pipe.vae, args.seed, device)
    pipe.vae.register_to_config(scaling_factor=round(1.0 / stats["latent_std"], 5))

    pair = np.concatenate([np.concatenate(list(tensor_to_uint8(stats[k])), axis=1) for k in ("orig", "recon")], axis=0)
    (args.out / "samples").mkdir(exist_ok=True)
    Image.fromarray(pair).resize((pair.shape[1] * 3, pair.shape[0] * 3), Image.NEAREST).save(args.out / "samples" / "vae_recon.png")
    log(metrics, {"phase": "vae_done", "psnr": round(stats["psnr"], 2), "latent_std": round(stats["latent_std"], 4),
                  "scaling_factor": pipe.vae.config.scaling_factor})

    # 2. text encoder + U-Net
    pipe.unet.train()
    pipe.text_encoder.train()
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = WeightEMA(params, args.ema)
    gen = torch.Generator("cpu").manual_seed(args.seed)
    start = 0
    if args.resume:
        state = torch.load(args.out / TRAIN_STATE, weights_only=True)  # tensors and numbers only: no pickled code
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], state["params"])
        ema.load_state_tensors(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["noise_generator"])
        start = state["step"]
        log(metrics, {"phase": "resume", "step": start})
    # World batches and caption dropout are seeded by the start step, so a resumed run draws new images.
    data = Batches(args.seed + 7919 * start, args.batch, config.image_size)
    caption_rng = np.random.default_rng(args.seed + 2 + 7919 * start)
    t0 = time.perf_counter()
    info = {"preset": args.preset, "config": config.to_dict(), "seed": args.seed, "batch": args.batch,
            "vae_psnr": round(stats["psnr"], 2), "ema": args.ema, "steps_done": start}

    def checkpoint(done: int) -> None:
        info["steps_done"] = done
        save_train_state(args.out, params, opt, ema, done, gen)
        with ema.applied():
            save_pipeline(pipe, args.out, info)

    def step_fn(x, captions, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        loss = train_step(pipe, opt, x, captions, args.cfg_drop, gen, caption_rng, device)
        ema.step()
        return loss

    def sample_fn(path: Path) -> None:
        with ema.applied():
            sample_grid(pipe, SAMPLE_PROMPTS, path, device=device)

    run_steps(args, start, data, metrics, "diffusion", step_fn, sample_fn, checkpoint)
    info["train_s"] = round(time.perf_counter() - t0, 1)
    checkpoint(args.steps)
    size = sum(p.stat().st_size for p in args.out.rglob("*.safetensors"))
    log(metrics, {"phase": "saved", "out": str(args.out), "safetensors_MB": round(size / 1e6, 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
