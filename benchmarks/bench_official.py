"""Whole runs, side by side: the research scripts against the matching `rewardbooth train`.

    python benchmarks/bench_official.py --official-dpg DPG_DIR --diffusers-examples DIFFUSERS_DIR --pairs dreambooth-lora,dpg --steps 10 --repeats 2 --plot phases.png
    python benchmarks/bench_official.py --official-rpo RPO_DIR --rpo-python RPO_ENV/bin/python --pairs rpo --resolution 32 --steps 80 --rpo-validation-every 40 --repeats 2
    python benchmarks/bench_official.py --diffusers-examples DIFFUSERS_DIR --pairs dreambooth-lora-flux --steps 20 --repeats 3

DPG_DIR, RPO_DIR and DIFFUSERS_DIR are checkouts the user fetched (commits in
docs/research-code-notes.md); nothing of them is vendored. RPO's train.py loads its ALIGN judge by
hub id: every run here reads a Hugging Face cache filled with the tiny judges under the hub ids
(HF_HUB_CACHE, offline), so both sides score with the same tiny ALIGN and nothing is downloaded. Each pair trains the same tiny
SD-shaped model (the `tiny` preset's from_pretrained folder, passed to both as a folder) on the
same images, with the same steps, class images and resolution. Runs alternate (official, ours,
then ours, official, ...) because these machines are shared; medians and ranges are printed.

`dreambooth-lora-flux` runs diffusers' train_dreambooth_lora_flux.py and ours on the `tiny-flux`
preset's folder at --flux-resolution (64, its native size): LoRA rank 4, lr 1e-4, batch 1, guidance
1.0 fed to the transformer, no prior preservation, no validation. Ours runs twice: our default LoRA
targets (adapter.targets=attention: both streams' attention projections) and the script's list
(those plus both feed-forwards).

Each run's wall time is split by what its own output shows: set-up (loading, class images,
negatives) until the first training-step update, training until the last one, and after (final
validation, saving, our report) until the process exits; ms / step is training over the steps
between those updates. Peak RSS is the child's own (wait4). OMP_NUM_THREADS, when set for the
bench, holds for every run (unset, ours times 1 and all cores on small models and keeps the faster;
the scripts use torch's default, all cores). "NaN" is any nan/inf the run printed, or an anomaly error.

The research scripts import torchvision only for a few transforms; `official_shims/run_official.py`
runs them with a small stand-in so the multi-GB torchvision install is not needed.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
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
    first_seen: int = 0  # the step of the first update timed (tqdm skips some)

    @property
    def step_time(self) -> float | None:
        """Seconds per step between the first and the last update."""
        if self.training is None or self.steps_seen <= self.first_seen:
            return None
        return self.training / (self.steps_seen - self.first_seen)


def execute(run: Run, env: dict, log: Path | None = None, cwd: Path | None = None) -> Run:
    """Run a command in `cwd`, timestamping its output lines (tqdm's \\r updates count as lines); its
    whole output goes to `log` when given."""
    start = time.perf_counter()
    terminal, child_side = pty.openpty()
    # A 0x0 terminal gets 0-column tqdm bars, that is none: give it a size.
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    process = subprocess.Popen(run.command, stdin=subprocess.DEVNULL, stdout=child_side, stderr=child_side, env=env,
                               cwd=cwd)
    os.close(child_side)
    first_step = last_step = None
    buffer = b""
    log_file = open(log, "wb") if log else None
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: every writer of the terminal has exited
            chunk = b""
        if not chunk:
            break
        buffer += chunk
        if log_file:
            log_file.write(chunk)
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        now = time.perf_counter()
        # tqdm ends an update with the next "\r": the unterminated tail is already the newest update.
        for index, raw in enumerate([*lines, buffer]):
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            if index < len(lines) and not run.step_pattern.search(line):
                run.last_line = line  # a failure's message, not the progress bar it interrupted
            match = run.step_pattern.search(line)
            if match:
                done = int(match.group(1))
                if done >= 1 and first_step is None:
                    first_step, run.first_seen = now, done
                if done > run.steps_seen:
                    run.steps_seen, last_step = done, now
            if index < len(lines) and NAN.search(line) and ("loss" in line.lower() or "nan values" in line.lower()):
                run.nan = True
    if buffer.strip():
        run.last_line = buffer.decode(errors="replace").strip()
        run.nan = run.nan or bool(NAN.search(run.last_line) and "loss" in run.last_line.lower())
    os.close(terminal)
    if log_file:
        log_file.close()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    end = time.perf_counter()
    run.total, run.returncode, run.peak_mb = end - start, process.returncode, usage.ru_maxrss / 1024
    if first_step is not None:
        run.setup, run.training, run.after = first_step - start, last_step - first_step, end - last_step
    return run


PAIR_NAMES = ("dreambooth-lora", "dreambooth-full", "dreambooth-lora-flux", "dpg", "rpo")


@dataclass
class Pair:
    name: str
    official: Run
    ours: list[Run]  # first our defaults; further runs do the script's amount of work where our default differs


# diffusers' FLUX script's default LoRA targets: the attention projections (our default) and the feed-forwards.
FLUX_SCRIPT_LORA_LAYERS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                           "ff_context.net.2")


def pairs(args, model: Path, subject: Path, work: Path, repeat: int, flux: tuple[Path, Path] | None = None) -> list[Pair]:
    """`flux`: the tiny-flux folder and the subject at --flux-resolution."""
    steps, n, res = str(args.steps), str(args.num_class_images), str(args.resolution)
    python = sys.executable
    ours_step = re.compile(r"train \w+:\s+\d+%\|.*?\|\s*(\d+)/\d+")
    their_step = re.compile(r"Steps:\s+\d+%\|.*?\|\s*(\d+)/\d+")

    def ours(pair: str, label: str, method: str, *extra: str, validation_every: int = 0, model=model, subject=subject,
             res=res) -> Run:
        command = [python, "-m", "rewardbooth", "train", "--model", str(model), "--instance-dir", str(subject),
                   "--class-noun", "toy", "--identifier", "sks", "--steps", steps, "--resolution", res,
                   "--num-class-images", n, "--validation-every", str(validation_every), "--checkpoint-every", "0",
                   "--seed", "0", "--set", "data.instance_prompt=a photo of {identifier} {class_noun}",
                   "--set", "data.class_prompt=a photo of {class_noun}", "--method", method,
                   "--output", str(work / f"{pair}-{re.sub(r'[^a-z0-9]+', '-', label)}-{repeat}"), *extra]
        return Run(label, command, ours_step)

    def official(script: Path, *script_args: str, interpreter: str = python, shim: tuple[str, ...] = (), model=model) -> Run:
        return Run("official", [interpreter, str(RUN_OFFICIAL), *shim, str(script), "--pretrained_model_name_or_path", str(model),
                                *script_args], their_step)

    wanted = set(args.pairs)
    out = []
    dreambooth = Path(args.diffusers_examples or ".") / "examples" / "dreambooth"
    for kind, script, lr, their_extra, our_extra in (("lora", "train_dreambooth_lora.py", "1e-4", ["--rank", "4"], ["--rank", "4"]),
                                                     ("full", "train_dreambooth.py", "5e-6", [], ["--full"])):
        if args.diffusers_examples and f"dreambooth-{kind}" in wanted:
            theirs = official(dreambooth / script, "--instance_data_dir", str(subject), "--instance_prompt", "a photo of sks toy",
                              "--with_prior_preservation", "--class_prompt", "a photo of toy",
                              "--class_data_dir", str(work / f"db-{kind}-class-{repeat}"), "--num_class_images", n,
                              "--output_dir", str(work / f"db-{kind}-official-{repeat}"), "--resolution", res,
                              "--train_batch_size", "1", "--learning_rate", lr, *their_extra,
                              "--max_train_steps", steps, "--lr_scheduler", "constant", "--seed", "0",
                              "--checkpointing_steps", str(10 * args.steps))
            theirs.label = "diffusers"
            out.append(Pair(f"dreambooth {kind} vs diffusers example", theirs,
                            [ours(f"dreambooth-{kind}", "rewardbooth", "dreambooth", *our_extra, "--lr", lr)]))
    if args.diffusers_examples and flux and "dreambooth-lora-flux" in wanted:
        flux_model, flux_subject, flux_res = *flux, str(args.flux_resolution)
        # No prior preservation, no validation; both feed the transformer guidance 1.0 and draw sigma logit-normal
        # (our default; the script's is uniform); weight decay ours. Its final reload of the pipeline is its "after".
        theirs = official(dreambooth / "train_dreambooth_lora_flux.py", "--instance_data_dir", str(flux_subject),
                          "--instance_prompt", "a photo of sks toy", "--output_dir", str(work / f"db-flux-official-{repeat}"),
                          "--resolution", flux_res, "--train_batch_size", "1", "--learning_rate", "1e-4", "--rank", "4",
                          "--max_train_steps", steps, "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0",
                          "--guidance_scale", "1.0", "--weighting_scheme", "logit_normal", "--adam_weight_decay", "1e-2",
                          "--mixed_precision", "no", "--checkpointing_steps", str(10 * args.steps), model=flux_model)
        theirs.label = "diffusers"

        def ours_flux(label: str, *extra: str) -> Run:
            return ours("dreambooth-lora-flux", label, "dreambooth", "--no-prior", "--rank", "4", "--lr", "1e-4",
                        "--set", "flow.guidance=1.0", *extra, model=flux_model, subject=flux_subject, res=flux_res)

        layers = f"adapter.target_modules=[{','.join(FLUX_SCRIPT_LORA_LAYERS)}]"
        out.append(Pair("dreambooth lora flux vs diffusers example", theirs,
                        [ours_flux("rewardbooth"), ours_flux("rewardbooth, the script's LoRA layers", "--set", layers)]))
    if args.official_dpg and "dpg" in wanted:
        theirs = official(Path(args.official_dpg) / "train_dreambooth_dpg.py", "--instance_data_dir", str(subject),
                          "--instance_prompt", "a photo of sks toy", "--with_prior_preservation", "--prior_loss_weight=1.0",
                          "--class_data_dir", str(work / f"dpg-class-{repeat}"), "--class_prompt", "a photo of toy",
                          "--output_dir", str(work / f"dpg-official-{repeat}"), f"--resolution={res}", "--train_batch_size=1",
                          f"--max_train_steps={steps}", "--learning_rate=1e-6", f"--num_class_images={n}",
                          "--lr_scheduler=constant", "--train_text_encoder", "--seed", "23",
                          shim=() if args.dpg_anomaly_detection else ("--no-anomaly-detection",))
        out.append(Pair("dpg vs official", theirs, [ours("dpg", "rewardbooth", "dpg-recon")]))  # the released command and critic
    if args.official_rpo and "rpo" in wanted:
        every = args.rpo_validation_every
        theirs = official(Path(args.official_rpo) / "train.py", "--reference_data_dir", str(subject),
                          "--generated_data_dir", str(work / f"rpo-neg-{repeat}"), "--savepath", str(work / f"rpo-official-{repeat}"),
                          "--output_dir", str(work / f"rpo-out-{repeat}"), "--cache_dir", str(work / "rpo-cache"),
                          "--beta=1.0", "--prompt", "a [V] toy", f"--resolution={res}", "--train_batch_size=1",
                          "--learning_rate=5e-6", f"--max_train_steps={steps}", f"--validation_step={every}",
                          "--subject", "toy", "--class_token", "toy", "--reward_lambda=0.5", "--seed", "0",
                          interpreter=args.rpo_python or python, shim=("--one-device",))  # it divides by the GPU count
        # RPO's defaults are the README command's; the script draws 16 negatives per prompt, the paper 4 (ours).
        out.append(Pair("rpo vs official", theirs, [ours("rpo", "rewardbooth", "rpo", validation_every=every),
                                                    ours("rpo", "rewardbooth, 16 negatives", "rpo", "--set", "rpo.negatives_per_prompt=16",
                                                         validation_every=every)]))
    return out


def write_legacy_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt (BPE) or vocab.txt (WordPiece) beside tokenizer.json: transformers 5
    saves only the latter, and the research code's environments (transformers 4.x, slow
    tokenizers) read only the former."""
    import json

    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model["type"] == "BPE":
        (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    elif model["type"] == "WordPiece":
        (folder / "vocab.txt").write_text("\n".join(sorted(model["vocab"], key=model["vocab"].get)) + "\n")


def filled_hub_cache(into: Path) -> Path:
    """A Hugging Face hub cache holding the tiny judges under the research code's hub ids, so scripts
    that load "kakaobrain/align-base" & co. run offline (with HF_HUB_CACHE and HF_HUB_OFFLINE)."""
    from rewardbooth.rewards.encoders import DEFAULT_ENCODER_MODELS, ENCODER_KINDS, tiny_encoder_path

    cache = into / "hub"
    revision = "0" * 40
    for kind in ENCODER_KINDS:
        repo = cache / ("models--" + DEFAULT_ENCODER_MODELS[kind].replace("/", "--"))
        shutil.copytree(tiny_encoder_path(kind), repo / "snapshots" / revision)
        if (repo / "snapshots" / revision / "tokenizer.json").is_file():
            write_legacy_tokenizer_files(repo / "snapshots" / revision)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
    return cache


def native_size_copy(folder: Path, resolution: int, into: Path) -> Path:
    """The tiny model with `resolution` as its native size (same weights): the research scripts draw
    class images at the model's native size and rewardbooth at the training resolution, so both
    must agree for the set-up times to compare like with like."""
    import json

    target = into / "tiny-native"
    shutil.copytree(folder, target)
    for part, key, size in (("unet", "sample_size", resolution // 2), ("vae", "sample_size", resolution)):
        config = target / part / "config.json"
        values = json.loads(config.read_text())
        values[key] = size  # tiny's VAE halves the image: latents are resolution / 2
        config.write_text(json.dumps(values, indent=1))
    write_legacy_tokenizer_files(target / "tokenizer")
    _prefix_text_encoder_keys(target / "text_encoder" / "model.safetensors")
    return target


def _prefix_text_encoder_keys(file: Path) -> None:
    """transformers 5 saves CLIPTextModel's weights without the "text_model." prefix that 4.x
    expects (and silently replaces with random weights); the hub's SD checkpoints carry it, and 5.x
    reads it too. With it both environments load the same text encoder."""
    from safetensors.torch import load_file, save_file

    weights = load_file(file)
    if not any(key.startswith("text_model.") for key in weights):
        save_file({f"text_model.{key}": value for key, value in weights.items()}, file, metadata={"format": "pt"})


def fmt(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{values[0]:.1f}"


def table_rows(text: str) -> list[dict]:
    """The medians of the printed table's rows (a run's output or a saved log)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) not in (9, 11) or cells[0] in ("pair", "---"):
            continue
        median = [float(c.split()[0]) if c not in ("-", "") else 0.0 for c in cells[2:6]]
        rows.append({"pair": cells[0], "side": cells[1], **dict(zip(("total", "setup", "training", "after"), median)),
                     "finished": cells[7], "ratio": cells[8]})
    return rows


def plot_phases(rows: list[dict], path: Path, title: str = "") -> None:
    """Stacked bars, one per pair and side: set-up, training and after, with each of ours' ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.4))
    labels = [f"{r['pair'].replace(' vs ', ' / ')}: {r['side']}" for r in rows][::-1]
    left = [0.0] * len(rows)
    for phase, colour in (("setup", "#8da0cb"), ("training", "#fc8d62"), ("after", "#66c2a5")):
        widths = [r[phase] for r in rows][::-1]
        ax.barh(labels, widths, left=left, color=colour, label=phase.replace("setup", "set-up"))
        left = [a + b for a, b in zip(left, widths)]
    for y, r in enumerate(rows[::-1]):
        note = f" {r['ratio']}x" if r["ratio"] and r["ratio"][0].isdigit() else ("" if not r["ratio"] else f" {r['ratio']}")
        if "NaN in 0" not in r["finished"]:
            note += f" ({r['finished']})"
        ax.text(r["total"], y, note, va="center", fontsize=8)
    ax.set_xlabel("seconds (median)")
    ax.set_xlim(0, max(r["total"] for r in rows) * 1.35)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "whole runs: research code vs rewardbooth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dpg", help="checkout of wfanyue/DPG-T2I-Personalization")
    parser.add_argument("--official-rpo", help="checkout of andrew-miao/RPO (needs torchmetrics, see docs/research-code-notes.md)")
    parser.add_argument("--rpo-python", help="the Python of an environment with RPO's pins (its environment.yaml: "
                        "transformers 4.46, diffusers 0.30; train.py breaks on transformers 5), default this one")
    parser.add_argument("--diffusers-examples", help="checkout of huggingface/diffusers (examples/dreambooth)")
    parser.add_argument("--pairs", default=",".join(PAIR_NAMES), type=lambda text: [p for p in text.split(",") if p],
                        help=f"comma-separated, of {', '.join(PAIR_NAMES)} (default: every pair whose code is given)")
    parser.add_argument("--dpg-anomaly-detection", action="store_true",
                        help="leave the DPG script's anomaly detection on, as released: it then stops at its first NaN "
                             "(default: off, so the run reaches its end and has a whole-run time)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-class-images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128, help="px (128 on tiny: the 64x64 latents DPG's critic is built for)")
    parser.add_argument("--flux-resolution", type=int, default=64, help="px of the FLUX pair (64: tiny-flux's native size)")
    parser.add_argument("--rpo-validation-every", type=int, default=40, help="both RPO sides validate (and select) every N steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logs", type=Path, help="folder to keep every run's whole output in (default: none kept)")
    parser.add_argument("--plot", type=Path, help="also draw the table as stacked bars (set-up / training / after) into this PNG")
    parser.add_argument("--replot", type=Path, help="only draw --plot from a saved output of this script (no runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot")
        rows = table_rows(args.replot.read_text())
        if not rows:
            parser.error(f"--replot: no result table in {args.replot}")
        plot_phases(rows, args.plot)
        return 0
    if not (args.official_dpg or args.official_rpo or args.diffusers_examples):
        parser.error("give at least one of --official-dpg, --official-rpo, --diffusers-examples")
    unknown = sorted(set(args.pairs) - set(PAIR_NAMES))
    if unknown:
        parser.error(f"--pairs: unknown {', '.join(unknown)}; use {', '.join(PAIR_NAMES)}")
    if args.official_dpg and "dpg" in args.pairs and args.resolution != 128:
        parser.error("--pairs dpg needs --resolution 128: the official critic flattens 64x64 latents (tiny halves the image)")

    from rewardbooth.mini.world import make_subject
    from rewardbooth.models.tiny import tiny_model_path
    from rewardbooth.models.tiny_flow import flow_model_path

    with tempfile.TemporaryDirectory(prefix="bench-official-") as tmp:
        work = Path(tmp)
        model = native_size_copy(tiny_model_path("tiny"), args.resolution, work)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(filled_hub_cache(work)), "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        subject = work / "subject"
        make_subject(seed=3, num_images=4).resized(args.resolution).save(subject)
        flux = None
        if "dreambooth-lora-flux" in args.pairs:
            flux = flow_model_path("tiny-flux"), work / "subject-flux"
            make_subject(seed=3, num_images=4).resized(args.flux_resolution).save(flux[1])
        results: dict[str, list[Pair]] = {}
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
        for repeat in range(args.repeats):
            for pair in pairs(args, model, subject, work, repeat, flux):
                order = [pair.official, *pair.ours]
                for run in order if repeat % 2 == 0 else order[::-1]:
                    log = None
                    if args.logs:
                        log = args.logs / f"{re.sub(r'[^a-z0-9]+', '-', f'{pair.name} {run.label}')}-{repeat}.log"
                    execute(run, env, log, cwd=work)  # RPO's train.py writes logs/ into its working directory
                    print(f"  {pair.name} / {run.label} #{repeat}: {run.total:.1f} s, rc {run.returncode}, steps {run.steps_seen}"
                          + (", NaN" if run.nan else "") + ("" if run.returncode == 0 else f": {run.last_line[:160]}"), flush=True)
                results.setdefault(pair.name, []).append(pair)
    flux_note = f" (tiny-flux at {args.flux_resolution} px, no class images)" if "dreambooth-lora-flux" in args.pairs else ""
    threads = f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in os.environ else ""
    heading = (f"{time.strftime('%Y-%m-%d')}, tiny SD-shaped model at {args.resolution} px{flux_note}, {args.steps} steps, "
               f"{args.num_class_images} class images, {args.repeats} alternating repeats{threads}; seconds, median (range)")
    table = [("| pair | side | total | set-up | training | after | peak RSS MB | finished / NaN | ours / theirs (total) "
              "| ms / step | ours / theirs (step) |"), "| --- " * 11 + "|"]
    for name, repeats in results.items():
        theirs = [pair.official for pair in repeats]
        completed = [r.total for r in theirs if r.returncode == 0]
        their_steps = [r.step_time for r in theirs if r.step_time]
        sides = [(theirs[0].label, theirs, "", "")]
        for index, variant in enumerate(repeats[0].ours):
            runs = [pair.ours[index] for pair in repeats]
            ratio = f"{statistics.median(r.total for r in runs) / statistics.median(completed):.2f}" if completed else "theirs never finished"
            our_steps = [r.step_time for r in runs if r.step_time]
            step_ratio = f"{statistics.median(our_steps) / statistics.median(their_steps):.2f}" if our_steps and their_steps else "-"
            sides.append((variant.label, runs, ratio, step_ratio))
        for label, runs, ratio, step_ratio in sides:
            finished = sum(r.returncode == 0 for r in runs)
            per_step = fmt([1000 * r.step_time if r.step_time else None for r in runs])
            table.append(f"| {name} | {label} | {fmt([r.total for r in runs])} | {fmt([r.setup for r in runs])} | "
                         f"{fmt([r.training for r in runs])} | {fmt([r.after for r in runs])} | {fmt([r.peak_mb for r in runs])} | "
                         f"{finished}/{len(runs)} finished, NaN in {sum(r.nan for r in runs)} | {ratio} | {per_step} | {step_ratio} |")
    print(f"\n{heading}\n" + "\n".join(table))
    if args.plot:
        plot_phases(table_rows("\n".join(table)), args.plot, heading.split(";")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
