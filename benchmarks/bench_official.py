"""Whole runs, side by side: the research scripts against the matching `rewardbooth train`.

    python benchmarks/bench_official.py --official-dpg DPG_DIR --diffusers-examples DIFFUSERS_DIR [--official-rpo RPO_DIR]

DPG_DIR, RPO_DIR and DIFFUSERS_DIR are checkouts the user fetched (commits in
docs/research-code-notes.md); nothing of them is vendored. Each pair trains the same tiny
SD-shaped model (the `tiny` preset's from_pretrained folder, passed to both as a folder) on the
same images, with the same steps, class images and resolution. Runs alternate (official, ours,
then ours, official, ...) because these machines are shared; medians and ranges are printed.

Each run's wall time is split by what its own output shows: set-up (loading, class images,
negatives) until the first training-step update, training until the last one, and after (final
validation, saving, our report) until the process exits. Peak RSS is the child's own (wait4).
"NaN" is any nan/inf the run printed, or an anomaly error.

The research scripts import torchvision only for a few transforms; `official_shims/run_official.py`
runs them with a small stand-in so the multi-GB torchvision install is not needed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_OFFICIAL = HERE / "official_shims" / "run_official.py"
NAN = re.compile(r"\b(nan|inf)\b|returned nan", re.IGNORECASE)


@dataclass
class Run:
    label: str
    command: list[str]
    step_pattern: re.Pattern  # a training progress update
    total: float = 0.0
    setup: float | None = None
    training: float | None = None
    after: float | None = None
    peak_mb: float = 0.0
    nan: bool = False
    returncode: int = 0
    last_line: str = ""
    steps_seen: int = 0


def execute(run: Run, env: dict) -> Run:
    """Run a command, timestamping its output lines (tqdm's \\r updates count as lines)."""
    start = time.perf_counter()
    process = subprocess.Popen(run.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    first_step = last_step = None
    buffer = b""
    while True:
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        now = time.perf_counter()
        # tqdm ends an update with the next "\r": the unterminated tail is already the newest update.
        for index, raw in enumerate([*lines, buffer]):
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            if index < len(lines):
                run.last_line = line
            match = run.step_pattern.search(line)
            if match:
                done = int(match.group(1))
                if done >= 1 and first_step is None:
                    first_step = now
                if done > run.steps_seen:
                    run.steps_seen, last_step = done, now
            if index < len(lines) and NAN.search(line) and ("loss" in line.lower() or "nan values" in line.lower()):
                run.nan = True
    if buffer.strip():
        run.last_line = buffer.decode(errors="replace").strip()
        run.nan = run.nan or bool(NAN.search(run.last_line) and "loss" in run.last_line.lower())
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    end = time.perf_counter()
    run.total, run.returncode, run.peak_mb = end - start, process.returncode, usage.ru_maxrss / 1024
    if first_step is not None:
        run.setup, run.training, run.after = first_step - start, last_step - first_step, end - last_step
    return run


def pairs(args, model: Path, subject: Path, work: Path, repeat: int) -> list[tuple[str, Run, Run]]:
    common = dict(steps=args.steps, n=args.num_class_images, res=args.resolution)
    python = sys.executable
    out = []
    ours_base = [python, "-m", "rewardbooth", "train", "--model", str(model), "--instance-dir", str(subject), "--class-noun", "toy",
                 "--identifier", "sks", "--steps", str(args.steps), "--resolution", str(args.resolution),
                 "--num-class-images", str(args.num_class_images), "--validation-every", "0", "--checkpoint-every", "0", "--seed", "0",
                 "--set", "data.instance_prompt=a photo of {identifier} {class_noun}", "--set", "data.class_prompt=a photo of {class_noun}"]
    ours_step = re.compile(r"train \w+:\s+\d+%\|.*?\|\s*(\d+)/\d+")
    their_step = re.compile(r"Steps:\s+\d+%\|.*?\|\s*(\d+)/\d+")
    if args.diffusers_examples:
        script = Path(args.diffusers_examples) / "examples" / "dreambooth" / "train_dreambooth_lora.py"
        official = [python, str(RUN_OFFICIAL), str(script), "--pretrained_model_name_or_path", str(model),
                    "--instance_data_dir", str(subject), "--instance_prompt", "a photo of sks toy", "--with_prior_preservation",
                    "--class_prompt", "a photo of toy", "--class_data_dir", str(work / f"db-class-{repeat}"),
                    "--num_class_images", str(common["n"]), "--output_dir", str(work / f"db-official-{repeat}"),
                    "--resolution", str(common["res"]), "--train_batch_size", "1", "--learning_rate", "1e-4", "--rank", "4",
                    "--max_train_steps", str(common["steps"]), "--lr_scheduler", "constant", "--seed", "0",
                    "--checkpointing_steps", str(10 * common["steps"])]
        ours = [*ours_base, "--method", "dreambooth", "--rank", "4", "--lr", "1e-4", "--output", str(work / f"db-ours-{repeat}")]
        out.append(("dreambooth LoRA vs diffusers example", Run("diffusers", official, their_step), Run("rewardbooth", ours, ours_step)))
    if args.official_dpg:
        script = Path(args.official_dpg) / "train_dreambooth_dpg.py"
        official = [python, str(RUN_OFFICIAL), str(script), "--pretrained_model_name_or_path", str(model),
                    "--instance_data_dir", str(subject), "--instance_prompt", "a photo of sks toy", "--with_prior_preservation",
                    "--prior_loss_weight=1.0", "--class_data_dir", str(work / f"dpg-class-{repeat}"), "--class_prompt", "a photo of toy",
                    "--output_dir", str(work / f"dpg-official-{repeat}"), f"--resolution={common['res']}", "--train_batch_size=1",
                    f"--max_train_steps={common['steps']}", "--learning_rate=1e-6", f"--num_class_images={common['n']}",
                    "--lr_scheduler=constant", "--train_text_encoder", "--seed", "23"]
        ours = [*ours_base, "--method", "dpg", "--output", str(work / f"dpg-ours-{repeat}")]  # DPG's defaults: the released command
        out.append(("dpg vs official", Run("official", official, their_step), Run("rewardbooth", ours, ours_step)))
    if args.official_rpo:
        print("note: the official RPO script loads its judges by hub id (facebook/dino-vits16, openai/clip-vit-base-patch16, "
              "kakaobrain/align-base) and needs torchmetrics; run this with network access or a filled Hugging Face cache",
              file=sys.stderr)
        script = Path(args.official_rpo) / "train.py"
        official = [python, str(RUN_OFFICIAL), str(script), "--pretrained_model_name_or_path", str(model),
                    "--reference_data_dir", str(subject), "--generated_data_dir", str(work / f"rpo-neg-{repeat}"),
                    "--savepath", str(work / f"rpo-official-{repeat}"), "--beta=1.0", "--prompt", "a [V] toy",
                    f"--resolution={common['res']}", "--train_batch_size=1", "--learning_rate=5e-6",
                    f"--max_train_steps={common['steps']}", "--eval_steps=40", "--subject", "toy", "--class_token", "toy",
                    "--reward_lambda=0.5"]
        ours = [*ours_base, "--method", "rpo", "--output", str(work / f"rpo-ours-{repeat}")]
        out.append(("rpo vs official", Run("official", official, their_step), Run("rewardbooth", ours, ours_step)))
    return out


def native_size_copy(folder: Path, resolution: int, into: Path) -> Path:
    """The tiny model with `resolution` as its native size (same weights): the research scripts draw
    class images at the model's native size and rewardbooth at the training resolution, so both
    must agree for the set-up times to compare like with like."""
    import json
    import shutil

    target = into / "tiny-native"
    shutil.copytree(folder, target)
    for part, key, size in (("unet", "sample_size", resolution // 2), ("vae", "sample_size", resolution)):
        config = target / part / "config.json"
        values = json.loads(config.read_text())
        values[key] = size  # tiny's VAE halves the image: latents are resolution / 2
        config.write_text(json.dumps(values, indent=1))
    return target


def fmt(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{values[0]:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dpg", help="checkout of wfanyue/DPG-T2I-Personalization")
    parser.add_argument("--official-rpo", help="checkout of andrew-miao/RPO")
    parser.add_argument("--diffusers-examples", help="checkout of huggingface/diffusers (examples/dreambooth)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-class-images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128, help="px (128 on tiny: the 64x64 latents DPG's critic is built for)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.official_dpg or args.official_rpo or args.diffusers_examples):
        parser.error("give at least one of --official-dpg, --official-rpo, --diffusers-examples")

    from rewardbooth.data.procedural import make_subject, save_subject
    from rewardbooth.models.tiny import tiny_model_path

    model = native_size_copy(tiny_model_path("tiny"), args.resolution, Path(tempfile.mkdtemp(prefix="bench-official-model-")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, list[Run]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subject = work / "subject"
        save_subject(make_subject(seed=3, num_images=4, size=args.resolution), subject)
        for repeat in range(args.repeats):
            for name, official, ours in pairs(args, model, subject, work, repeat):
                order = (official, ours) if repeat % 2 == 0 else (ours, official)
                for run in order:
                    execute(run, env)
                    print(f"  {name} / {run.label} #{repeat}: {run.total:.1f} s, rc {run.returncode}, steps {run.steps_seen}"
                          + (", NaN" if run.nan else "") + ("" if run.returncode == 0 else f": {run.last_line[:160]}"), flush=True)
                    results.setdefault(name, {}).setdefault(run.label, []).append(run)
    print(f"\n{time.strftime('%Y-%m-%d')}, tiny SD-shaped model at {args.resolution} px, {args.steps} steps, "
          f"{args.num_class_images} class images, {args.repeats} alternating repeats; seconds, median (range)")
    print("| pair | side | total | set-up | training | after | peak RSS MB | finished / NaN | ours / theirs (total) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, sides in results.items():
        (theirs_label, theirs), (ours_label, ours) = [(k, v) for k, v in sides.items() if k != "rewardbooth"][0], ("rewardbooth", sides["rewardbooth"])
        for label, runs in ((theirs_label, theirs), (ours_label, ours)):
            ratio = ""
            if label == "rewardbooth":
                completed = [r.total for r in theirs if r.returncode == 0]
                ratio = f"{statistics.median(r.total for r in ours) / statistics.median(completed):.2f}" if completed else "theirs never finished"
            finished = sum(r.returncode == 0 for r in runs)
            print(f"| {name} | {label} | {fmt([r.total for r in runs])} | {fmt([r.setup for r in runs])} | "
                  f"{fmt([r.training for r in runs])} | {fmt([r.after for r in runs])} | {fmt([r.peak_mb for r in runs])} | "
                  f"{finished}/{len(runs)} finished, NaN in {sum(r.nan for r in runs)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
