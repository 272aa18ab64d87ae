"""Pretrain `mini-flow`, MiniBench's flow-matching transformer, reproducibly and resumably, in one command.

    python -m rewardbooth.recipes.mini_flow_pretrain --out runs/mini-flow --size m --steps 20000 --batch 32 --seed 0 --threads 2 --ship

(the defaults are that run; the same command with --resume continues it from its last save)

An SD3-style pipeline (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`) sized for mini's 32 px world:

- mini's VAE, frozen (4 x 16 x 16 latents), with `shift_factor` = mean and `scaling_factor` = 1 / std of its
  latents on world images (the flow pipelines decode z / scale + shift, so the shift must be a number);
- mini's CLIP text encoder (a projection added for SD3's pooled vector) in both of SD3's CLIP slots, one
  module while pretraining, trained jointly as `mini` trained it; no T5 (SD3 samples without one);
- the transformer regresses the velocity eps - x0 through the model-family interface (`rewardbooth.flow`:
  logit-normal sigma, `FlowConfig`'s defaults) on `pretraining_batch` captions, captions dropped with
  probability `--cfg-drop`; AdamW, warm-up then cosine, an EMA of the weights is what gets sampled and saved.

As `mini_pretrain`: metrics.jsonl, sample grids in samples/, the pipeline saved into DIR (loadable by
`rewardbooth.models.loading.load_components(DIR)`), DIR/train_state.pt for `--resume`. Batch k is drawn from the
seed (seed, k) and the noise generator is saved, so a resumed run trains on exactly what an uninterrupted one would.
`--ship` copies the finished pipeline into the package (`--model mini-flow`); `--bench s,m,unet-s` times steps and exits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rewardbooth.config import FlowConfig
from rewardbooth.data.images import save_image_grid
from rewardbooth.diffusion import encode_moments, vae_downsampling
from rewardbooth.mini.assets import BASE_DIR, FLOW_DIR
from rewardbooth.mini.world import pretraining_batch
from rewardbooth.models.loading import Components, quiet_library_progress
from rewardbooth.recipes import mini_pretrain
from rewardbooth.recipes.mini_model import count_params
from rewardbooth.recipes.mini_pretrain import (
    SAMPLE_PROMPTS,
    TRAIN_STATE,
    Batches,
    evaluate_vae,
    images_to_tensor,
    log,
    run_steps,
    start_command,
    save_pipeline,
    save_train_state,
)
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.options import WeightEMA

# diffusers / transformers are imported inside the functions that use them, so --help answers at once.

# SD3Transformer2DModel sizes (head dim 32). Patch 2 on 16 x 16 latents: 64 image tokens; patch 1: 256 (2.7x the step).
FLOW_SIZES = {
    "xs": dict(num_layers=2, num_attention_heads=2, patch_size=2),  # tests
    "s": dict(num_layers=4, num_attention_heads=4, patch_size=2),
    "m": dict(num_layers=6, num_attention_heads=4, patch_size=2),  # 3.5 M, 14 MB: MiniBench's assets stay under 40 MB
    "s-p1": dict(num_layers=4, num_attention_heads=4, patch_size=1),
}
HEAD_DIM = 32
# SD3's shift 3.0 is for 128 x 128 latents; its paper scales the shift with resolution, which leaves ~1 at 16 x 16.
SCHEDULER_SHIFT = 1.0
SAMPLE_STEPS, SAMPLE_GUIDANCE = 20, 4.0  # sample grids, as mini's validation samples


def build_flow_pipeline(size: str, seed: int = 0, base: Path = BASE_DIR, device="cpu"):
    """An untrained mini-flow StableDiffusion3Pipeline: mini's VAE (latent statistics measured) and text encoder,
    a seeded transformer; the same module in both CLIP slots."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").to(device).eval().requires_grad_(False)
    text_config = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder")
    text_config.projection_dim = text_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stats = evaluate_vae(vae, seed, device)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder", config=text_config)
        side, shape = vae.config.sample_size // vae_downsampling(vae.config), FLOW_SIZES[size]
        joint = 2 * text_config.hidden_size  # SD3 sets the two CLIPs' states side by side
        transformer = SD3Transformer2DModel(
            sample_size=side, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
            attention_head_dim=HEAD_DIM, joint_attention_dim=joint, pooled_projection_dim=joint,
            caption_projection_dim=HEAD_DIM * shape["num_attention_heads"], pos_embed_max_size=side // shape["patch_size"],
            qk_norm="rms_norm", **shape)  # qk_norm: SD3.5's, keeps attention logits bounded at a high learning rate
    # (z - mean) / std is what the transformer sees; the pipelines decode z / scale + shift
    vae.register_to_config(shift_factor=round(stats["latent_mean"], 5), scaling_factor=round(1.0 / stats["latent_std"], 5))
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)
    return StableDiffusion3Pipeline(transformer=transformer.to(device), scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder.to(device), tokenizer=tokenizer, text_encoder_2=text_encoder,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


class StepBatches(Batches):
    """World batches, captions dropped to "" with probability `cfg_drop`; batch k from the seed (seed, k)."""

    def __init__(self, seed: int, batch: int, size: int, start: int, cfg_drop: float):
        self.seed, self.k, self.cfg_drop = seed, start, cfg_drop  # before the thread starts
        super().__init__(seed, batch, size)

    def _run(self):
        while not self.stop:
            rng = np.random.default_rng([self.seed, self.k])
            images, captions, _ = pretraining_batch(rng, self.batch, self.size)
            self.q.put((images_to_tensor(images), ["" if rng.random() < self.cfg_drop else c for c in captions]))
            self.k += 1


class FlowTrainer:
    """The transformer and the (shared) text encoder trained on the family's flow-matching loss."""

    def __init__(self, pipe, lr: float, ema: float, seed: int, flow: FlowConfig | None = None):
        self.pipe = pipe
        self.family = Components.from_pipeline("mini-flow", pipe).family(flow or FlowConfig())
        self.params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        self.ema = WeightEMA(self.params, ema)
        self.gen = torch.Generator("cpu").manual_seed(seed)  # latents' posterior draws, noise and sigma

    def step(self, x: torch.Tensor, captions: list[str], lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        pipe, family = self.pipe, self.family
        x0 = family.latents_from_moments(encode_moments(pipe.vae, x, batch_size=len(x)), self.gen)
        batch = family.add_noise(x0, self.gen)
        text = family.encode_prompts([pipe.text_encoder, pipe.text_encoder_2], captions, pipe.vae.config.sample_size)
        loss = family.denoising_error(pipe.transformer, batch, text).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.ema.step()
        return loss.item()

    def save_state(self, out: Path, step: int) -> None:
        save_train_state(out, self.params, self.opt, self.ema, step, self.gen)

    def load_state(self, out: Path) -> int:
        state = torch.load(out / TRAIN_STATE, weights_only=True)  # tensors and numbers only: no pickled code
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], state["params"])
        self.ema.load_state_tensors(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["noise_generator"])
        return state["step"]

    @torch.no_grad()
    def sample_grid(self, path: Path, seeds: int = 4) -> None:
        """One row per SAMPLE_PROMPTS prompt, one column per seed, 32 px cells scaled 3x, with the EMA weights."""
        pipe = self.family.pipeline()
        pipe.set_progress_bar_config(disable=True)
        with self.ema.applied():
            rows = generate(pipe, list(SAMPLE_PROMPTS), seeds,
                            SampleSettings(steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, batch_size=16))
        save_image_grid([im.resize((im.width * 3, im.height * 3), 0) for row in rows for im in row], path, cols=seeds)


def ship(out: Path, dest: Path = FLOW_DIR) -> None:
    """The pipeline's weights and configs (no train state, metrics or samples) into the package's asset folder."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns(TRAIN_STATE, "*.tmp", "metrics.jsonl", "samples"))


def benchmark(sizes: list[str], batch: int, steps: int, device) -> None:
    """Median s/step of each size (`unet-NAME`: mini's U-Net preset, timed by mini_pretrain, for a same-load comparison)."""
    for size in sizes:
        if size.startswith("unet-"):
            mini_pretrain.benchmark([size.removeprefix("unet-")], batch, steps, device)
            continue
        trainer = FlowTrainer(build_flow_pipeline(size, device=device), 1e-4, 0.999, 0)
        data = StepBatches(0, batch, 32, 0, 0.1)
        times = []
        for i in range(steps + 2):
            x, captions = data.next()
            t = time.perf_counter()
            trainer.step(x.to(device), captions, 1e-4)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first steps warm up allocators
                times.append(time.perf_counter() - t)
        data.close()
        print(json.dumps({"size": size, "transformer_params_M": round(count_params(trainer.pipe.transformer) / 1e6, 2),
                          "batch": batch, "threads": torch.get_num_threads(), "s_per_step": round(float(np.median(times)), 3)}),
              flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rewardbooth.recipes.mini_flow_pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="pipeline folder to write (diffusers layout)")
    ap.add_argument("--size", default="m", choices=sorted(FLOW_SIZES))
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="probability a caption becomes '' (for CFG)")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--sample-every", type=int, default=1000)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its train_state.pt")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--ship", action="store_true", help=f"when done, copy the pipeline into {FLOW_DIR} (--model mini-flow)")
    ap.add_argument("--bench", default=None, help="comma-separated sizes (unet-s: mini's U-Net): time training steps and exit")
    ap.add_argument("--bench-steps", type=int, default=6)
    args = ap.parse_args(argv)

    quiet_library_progress()
    started = start_command(ap, args, benchmark)
    if isinstance(started, int):
        return started
    device, metrics = started

    pipe = build_flow_pipeline(args.size, args.seed, device=device)
    trainer = FlowTrainer(pipe, args.lr, args.ema, args.seed)
    start = trainer.load_state(args.out) if args.resume else 0
    saved_info = args.out / "rewardbooth_mini.json"
    before_s = json.loads(saved_info.read_text()).get("train_s", 0.0) if args.resume and saved_info.is_file() else 0.0
    info = {"size": args.size, "transformer": dict(pipe.transformer.config), "seed": args.seed, "batch": args.batch,
            "steps": args.steps, "lr": args.lr, "ema": args.ema, "cfg_drop": args.cfg_drop, "steps_done": start,
            "params_M": {k: round(count_params(getattr(pipe, k)) / 1e6, 3) for k in ("transformer", "vae", "text_encoder")}}
    log(metrics, {"phase": "resume" if args.resume else "build", **info,
                  "vae": {k: pipe.vae.config[k] for k in ("shift_factor", "scaling_factor")}})

    def checkpoint(done: int) -> None:
        info["steps_done"], info["train_s"] = done, round(before_s + time.perf_counter() - t0, 1)  # resumes included
        trainer.save_state(args.out, done)
        with trainer.ema.applied():
            save_pipeline(pipe, args.out, info)

    data = StepBatches(args.seed, args.batch, pipe.vae.config.sample_size, start, args.cfg_drop)
    t0 = time.perf_counter()
    run_steps(args, start, data, metrics, "flow", lambda x, captions, lr: trainer.step(x.to(device), captions, lr),
              trainer.sample_grid, checkpoint)
    checkpoint(args.steps)
    size = sum(p.stat().st_size for p in args.out.rglob("*.safetensors"))
    log(metrics, {"phase": "saved", "out": str(args.out), "safetensors_MB": round(size / 1e6, 2)})
    if args.ship:
        ship(args.out)
        log(metrics, {"phase": "shipped", "to": str(FLOW_DIR)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
