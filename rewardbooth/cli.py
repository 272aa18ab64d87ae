"""The `rewardbooth` command: train | generate | evaluate | bench | demo.

User errors (bad folders, files or settings) end with one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
from pathlib import Path

from rewardbooth.config import MINIBENCH_SUITES, RunConfig
from rewardbooth.errors import RewardboothError, Stopped

# Each command imports the layers it runs (torch, diffusers ...) inside its function, so that
# `rewardbooth --help` and argument errors answer in well under a second.

# Flags that set a config value: (flag, dotted key, type, help). None type = boolean switch.
TRAIN_FLAGS = [
    ("--model", "model.name", str, None),  # help from the preset registry (build_parser)
    ("--method", "train.method", str, None),  # help from the method registry (build_parser)
    ("--instance-dir", "data.instance_dir", str, "folder of 3-6 subject images"),
    ("--class-noun", "data.class_noun", str, "the subject's class, e.g. dog"),
    ("--identifier", "data.identifier", str, "rare token naming the subject (default sks)"),
    ("--resolution", "data.resolution", int, "training resolution (default: the model's native size)"),
    ("--steps", "train.steps", int, "optimizer steps"),
    ("--lr", "train.learning_rate", float, "learning rate (default 1e-4 LoRA, 5e-6 full)"),
    ("--batch-size", "train.batch_size", int, "instance images per step (plus as many class images)"),
    ("--gradient-accumulation", "train.gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    ("--mixed-precision", "train.mixed_precision", str, "no | fp16 | bf16"),
    ("--seed", "train.seed", int, "seed for data order, noise and timesteps"),
    ("--checkpoint-every", "train.checkpoint_every", int, "save a resumable checkpoint every N steps (0: off)"),
    ("--rank", "adapter.rank", int, "LoRA rank"),
    ("--alpha", "adapter.alpha", float, "LoRA alpha; the update is scaled by alpha / rank (default: rank)"),
    ("--quantize", "model.quantize", str, "int8 | fp8: keep the frozen base quantized (torchao; LoRA only), e.g. FLUX.1-dev on 24 GB"),
    ("--vae", "model.vae", str, "another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16"),
    ("--num-class-images", "prior.num_class_images", int, "class images for prior preservation"),
    ("--prior-weight", "prior.weight", float, "weight of the prior-preservation loss"),
    ("--class-dir", "prior.class_dir", str, "your own class images (read only; missing ones are generated)"),
    ("--validation-every", "validation.every", int, "generate validation images every N steps (0: off)"),
    ("--snr-gamma", "train.snr_gamma", float, "min-SNR-gamma loss weighting, e.g. 5 (epsilon and v-prediction)"),
    ("--noise-offset", "train.noise_offset", float, "offset noise strength, e.g. 0.05"),
    ("--ema-decay", "train.ema_decay", float, "keep an EMA of the trained weights (e.g. 0.999) and save it as the result"),
    ("--optimizer", "train.optimizer", str, "adamw | adamw8bit (pip install rewardbooth[bnb]) | prodigy (rewardbooth[prodigy], --lr 1)"),
    ("--report-to", "train.report_to", str, "tensorboard | wandb: also log to an accelerate tracker (metrics.jsonl stays)"),
]
TRAIN_SWITCHES = [
    ("--full", "adapter.kind", "full", "fine-tune the whole denoiser (U-Net or transformer) instead of LoRA"),
    ("--train-text-encoder", "adapter.train_text_encoder", True, "also train the text encoder"),
    ("--no-prior", "prior.enabled", False, "turn prior preservation off"),
    ("--gradient-checkpointing", "train.gradient_checkpointing", True, "trade compute for memory"),
    ("--fsdp", "train.fsdp", True, "full fine-tuning past one card: shard weights, gradients and AdamW state over the "
     "--num-processes processes, per block (PyTorch FSDP2)"),
    ("--random-crop", "data.center_crop", False, "random crops instead of center crops"),
    ("--center-crop", "data.center_crop", True, "center crops (the default, except under DPG's defaults: random, as its released script)"),
    ("--random-flip", "data.random_flip", True, "random horizontal flips"),
    ("--cache-latents", "data.cache_latents", True, "keep class-image latents on disk in the run folder (large class sets; needs center crops)"),
]


def add_judge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dino-model", help="DINO checkpoint (default facebook/dino-vits16; mini: the MiniBench judge; tiny: random weights)")
    parser.add_argument("--clip-model", help="CLIP checkpoint for CLIP-I/CLIP-T (default openai/clip-vit-base-patch16; mini; tiny)")
    parser.add_argument("--reward", action="append", default=[], help="extra reward to report (registered name or module:function); repeatable")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _device(args: argparse.Namespace) -> str:
    from rewardbooth.models.loading import default_device

    return default_device(args.device)


def _scorer(args: argparse.Namespace, evaluation=None):
    """Judges from the config's evaluation section, with the command-line flags on top."""
    from rewardbooth.config import EvaluationConfig
    from rewardbooth.evaluation.metrics import Scorer

    evaluation = evaluation or EvaluationConfig()
    evaluation.dino_model = args.dino_model or evaluation.dino_model
    evaluation.clip_model = args.clip_model or evaluation.clip_model
    evaluation.extra_rewards = [*evaluation.extra_rewards, *args.reward]
    return Scorer.from_config(evaluation, device=_device(args))


def _run_evaluation_settings(images: Path):
    """The judges of the run that made `images` (RUN/generated, or a folder inside a run), if any."""
    from rewardbooth.methods import load_config
    from rewardbooth.training.run_dir import CONFIG_NAME

    for folder in (images, *images.resolve().parents[:2]):
        if (folder / CONFIG_NAME).is_file():
            return load_config(folder / CONFIG_NAME).evaluation
    return None


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _method_help() -> str:
    from rewardbooth.methods import baseline_method, method_names, methods_help

    return (f"{' | '.join(method_names())} (default {baseline_method().name}); {methods_help()}; "
            "defaults and departures from the papers: docs/methods.md")


def _model_help() -> str:
    from rewardbooth.models.presets import preset_names

    return (f"hub id, local diffusers folder, a single file FILE.safetensors[+BASE] (BASE: hub id, folder or preset giving "
            f"its configs and missing parts), or a preset: {', '.join(preset_names())}. "
            "SDXL: e.g. stabilityai/stable-diffusion-xl-base-1.0")


# Help drawn from the registries (methods, presets) when --help is printed, not at every start.
LAZY_HELP = {"--method": _method_help, "--model": _model_help}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows defaults, except the empty ones (unset flags fall back to the config's default);
    a callable help (LAZY_HELP) is asked for its text only when help is printed."""

    def _format_action(self, action: argparse.Action) -> str:
        if callable(action.help):
            action.help = action.help()
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _config_default(key: str):
    value = RunConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def set_library_verbosity(verbose: bool) -> None:
    """Keep the libraries' warnings (torchvision fallbacks, dtype notes, banners) off the user's terminal
    unless --verbose; the environment carries the choice into `accelerate launch` processes."""
    level = "warning" if verbose else "error"
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "ACCELERATE_LOG_LEVEL"):
        os.environ[variable] = level
    if not verbose:  # the libraries' per-file "Loading weights" bars; rewardbooth's own bars show the real work
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            getattr(sys.modules[name].utils.logging, f"set_verbosity_{level}")()
    # torchao (the quantized base), which diffusers imports whenever it is installed, registers its
    # enums with torch's pytree on import and torch warns about each: not news to a user.
    for name in ("torch.utils._pytree", "torchao"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)



def add_run_settings(parser: argparse.ArgumentParser, set_help: str, processes_help: str, show_defaults: bool,
                     skip: tuple[str, ...] = ()) -> None:
    """The flags `train` and `train-many` share: --set, --quiet, --num-processes and the settings' own flags."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"any setting, {set_help}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--num-processes", type=int, default=1, help=processes_help)
    for flag, key, kind, text in TRAIN_FLAGS:
        if flag in skip:
            continue
        default = _config_default(key) if show_defaults else None
        shown = LAZY_HELP[flag] if text is None else text if "default" in text or default is None else f"{text} (default: {default})"
        parser.add_argument(flag, type=kind, help=shown)
    for flag, _, _, text in TRAIN_SWITCHES:
        parser.add_argument(flag, action="store_true", help=text)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardbooth", description="Reward-driven subject personalization for text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show the libraries' warnings and banners too")

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=HelpFormatter, parents=[common], **kwargs)

    train = add_parser("train", help="personalize a model to a subject")
    train.add_argument("--config", help=f"YAML run config (sections: {', '.join(f.name for f in dataclasses.fields(RunConfig))})")
    train.add_argument("--output", required=True, help="run folder to create")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint, with its own settings "
                       "(flags may change --steps and bookkeeping only; others are refused)")
    train.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    train.add_argument("--validation-prompt", action="append", help="validation prompt ({identifier}, {class_noun} allowed); repeatable")
    add_run_settings(train, "e.g. --set adapter.alpha=8", "data-parallel processes (runs `accelerate launch`; GPUs if available, else "
                     "CPU processes)", show_defaults=True)

    many = add_parser("train-many", help="train many subjects at once: one batched denoiser call and one backward per step "
                                         "for all of them (each its own adapter, data, seeds and run folder)")
    many.add_argument("subjects", help="SUBJECTS.yaml (entries: name, instance_dir, class_noun, run_dir, settings), or a folder "
                                       "of subject folders (a DreamBench folder gives their class nouns)")
    many.add_argument("--output", help="folder holding the subjects' run folders (default: the file's `output:`, else runs-many "
                                       "beside it)")
    many.add_argument("--config", help="YAML run config every subject starts from")
    many.add_argument("--subjects-per-batch", default=None, metavar="K|auto",
                      help="subjects trained together (default: all of them; auto: as many as the memory estimate fits)")
    many.add_argument("--resume", action="store_true", help="continue every subject's run from its latest checkpoint")
    many.add_argument("--overwrite", action="store_true", help="replace previous runs in the subjects' run folders")
    add_run_settings(many, "for every subject", "processes sharing the subjects (runs `accelerate launch`; one GPU each if available, "
                     "else CPU)", show_defaults=False, skip=("--instance-dir",))
    many.set_defaults(instance_dir=None, validation_prompt=None)

    gen = add_parser("generate", help="sample images from a trained run")
    gen.add_argument("--run", required=True, help="run folder written by `rewardbooth train`")
    gen.add_argument("--prompt", action="append", required=True, help="prompt; repeatable")
    gen.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt")
    gen.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's validation steps)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance (default: the run's validation guidance: 4 for mini, 7.5 for SD, 3.5 for FLUX.1-dev and SD3.5, 4 for FLUX.2 [klein], 0 for Z-Image-Turbo, 5 for Z-Image, 4 for Qwen-Image: its true CFG, off at 1)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=4)
    gen.add_argument("--output", help="folder for the PNGs (default RUN/generated)")
    gen.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")

    export = add_parser("export", help="write a LoRA run's weights for other tools (kohya: A1111/Forge/ComfyUI; diffusers; peft)")
    export.add_argument("run", help="run folder written by `rewardbooth train` (adapter.kind=lora)")
    export.add_argument("--format", default=None, choices=["kohya", "diffusers", "peft"],
                        help="key layout to write (default: every layout the run's model takes that the run folder lacks; a "
                             "finished LoRA run already holds the diffusers file, and the kohya file for SD, SDXL and FLUX.1)")
    export.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="cast the weights (default: as trained)")
    export.add_argument("--output", default=None,
                        help="file (kohya, diffusers) or folder (peft) to write, with --format; default beside the run's weights, named by format and dtype")

    ev = add_parser("evaluate", help="DreamBench metrics (DINO, CLIP-I, CLIP-T) of a folder of generated images")
    ev.add_argument("--images", required=True, help="generated images (with metadata.jsonl from `generate`, or use --prompt)")
    ev.add_argument("--references", required=True, help="the subject's reference images")
    ev.add_argument("--prompt", help="the prompt of every image (overrides metadata.jsonl)")
    ev.add_argument("--identifier", default="sks", help="removed from prompts before CLIP-T")
    ev.add_argument("--output", help="also write per-image scores and summaries to this JSON file")
    add_judge_flags(ev)

    bench = add_parser("bench", help="DreamBench or MiniBench: train, generate, score, report; resumable, shardable")
    bench.add_argument("--suite", choices=("dreambench", *MINIBENCH_SUITES), default="dreambench",
                       help="dreambench: the 30 DreamBench subjects (needs --dreambench); mini: fresh MiniBench subjects, "
                            "the shipped mini model (or --model mini-flow) and judges, every method of --methods compared, "
                            "full fine-tuning (CPU); mini-lora: the same with each method's LoRA")
    bench.add_argument("--dreambench", help="DreamBench dataset folder (subject folders + prompts_and_classes.txt)")
    bench.add_argument("--method", default=None, help="one method (dreambench default: dreambooth)")
    bench.add_argument("--methods", help="comma-separated methods, e.g. dreambooth,dpg,rpo (mini default: all three)")
    bench.add_argument("--output", help="bench folder (default bench-METHOD, or bench-SUITE for MiniBench); with --merge, where the report goes")
    bench.add_argument("--subjects", help="comma-separated DreamBench subject names (default: all 30)")
    bench.add_argument("--quick", action="store_true", help="mini: 2 subjects, 2 images per prompt (under 10 minutes on 2 cores)")
    bench.add_argument("--subjects-seed", type=int, default=0, help="mini: subject set N (subjects made from seeds 1000N, 1000N+1, ...; "
                       "different N never share a subject; 100 and up are for tuning)")
    bench.add_argument("--num-subjects", type=int, help="mini: how many subjects (default 24, --quick 2)")
    bench.add_argument("--budgets", help="mini: e.g. 200,400,800: train each subject once to the largest, evaluate the weights "
                       "kept at every budget, and plot the identity/prompt frontier")
    bench.add_argument("--baseline-budgets", help="mini: more budgets for the baseline (dreambooth) alone, e.g. 800,1600 beside "
                       "--budgets 200,400: its curve then reaches the slower methods' seconds for the equal-seconds pairing")
    bench.add_argument("--shard", help="i/N: this process takes every N-th subject starting at i")
    bench.add_argument("--jobs", type=int, default=None,
                       help="mini: worker processes splitting the subjects (default: one per CPU core, 1 on a GPU)")
    bench.add_argument("--subjects-per-batch", default=None, metavar="K|auto",
                       help="train the subjects K at a time in one process, as train-many does (auto: as many as the memory "
                            "estimate fits), then evaluate them as usual; each is charged its batch's wall seconds / K")
    bench.add_argument("-k", "--images-per-prompt", type=int, help="images per prompt (dreambench default 4; mini 2)")
    bench.add_argument("--sample-steps", type=int, help="sampler steps (dreambench default 50; mini: the model's, 10 for mini)")
    bench.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance (dreambench default: the model's, 7.5 for SD, 3.5 for FLUX.1-dev; "
                            "mini: the model's, 4 for mini)")
    bench.add_argument("--model", help="base model for training (hub id, folder, mini, tiny; --suite mini: mini, mini-flow or "
                       "a folder of either)")
    bench.add_argument("--steps", type=int, help="training steps per subject")
    bench.add_argument("--config", help="YAML run config used for every subject")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any training setting")
    bench.add_argument("--merge", nargs="+", metavar="BENCH_DIR", help="merge finished bench folders (one per method) into results and one report; with two or more, "
                       "each is paired with the first on the subjects they share (printed, and paired.json)")
    bench.add_argument("--curve", nargs="+", metavar="BENCH_DIR", help="with --merge: one method's bench folders at several "
                       "budgets (e.g. DreamBooth at its best, dreambooth@200 ... @1600); each merged folder is also paired "
                       "with it at its own seconds (interpolated between the budgets, never extrapolated)")
    bench.add_argument("--quiet", action="store_true")
    add_judge_flags(bench)

    ui = add_parser("ui", help="a local web app: start runs from photos, watch them, generate and compare, bench")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    ui.add_argument("--runs-dir", default="runs", help="folder holding the runs, uploads and logs (default ./runs)")
    ui.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login (needed for any --host but localhost)")

    demo = add_parser("demo", help="the built-in CPU demo: one MiniBench subject learned by the shipped mini model with "
                                   "DreamBooth and with the default reward method, side by side; report")
    demo.add_argument("--output", default="rewardbooth-demo", help="run folder (default ./rewardbooth-demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the mini bench's setting)")
    demo.add_argument("--method", default=None, help="the method shown beside DreamBooth (default: the reward method with the "
                                                       "larger gain on MiniBench's fresh subjects)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the MiniBench subject and the run")
    demo.add_argument("--overwrite", action="store_true", help="replace a previous demo run")
    return parser


def train_overrides(args: argparse.Namespace) -> dict:
    from rewardbooth.config import parse_override

    if args.center_crop and args.random_crop:
        from rewardbooth.errors import ConfigError

        raise ConfigError("give --center-crop or --random-crop, not both")
    overrides = {key: getattr(args, _dest(flag)) for flag, key, _, _ in TRAIN_FLAGS}
    for flag, key, value, _ in TRAIN_SWITCHES:
        if getattr(args, _dest(flag)):
            overrides[key] = value
    if args.validation_prompt:
        overrides["validation.prompts"] = args.validation_prompt
    overrides.update(parse_override(text) for text in args.set)
    return overrides


def launch_processes(num_processes: int, argv: list[str], program: tuple[str, ...] = ("-m", "rewardbooth.cli")) -> int:
    """Re-run this command (or another `program`: the tests' scripts) under `accelerate launch` with N processes."""
    import subprocess

    import torch

    from rewardbooth.errors import ConfigError

    if num_processes < 1:
        raise ConfigError(f"--num-processes must be positive, got {num_processes}")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # accelerate's torchrun launcher is behind --multi_gpu; ACCELERATE_USE_CPU makes the
        # processes pick the CPU (gloo) backend. `accelerate launch --cpu` would start only one.
        env["ACCELERATE_USE_CPU"] = "1"
    # A free port, not accelerate's fixed 29500, so two runs on one machine (or parallel tests) never collide.
    port = os.environ.get("MASTER_PORT") or str(_free_port())
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--main_process_port", port, "--dynamo_backend", "no",
               "--mixed_precision", "no",  # the run config sets precision
               *program, *argv]
    return subprocess.call(command, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _without_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--num-processes":
            skip = True
        elif not item.startswith("--num-processes="):
            out.append(item)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from rewardbooth.evaluation.run_report import write_run_report
    from rewardbooth.methods import load_config
    from rewardbooth.training.loop import train
    from rewardbooth.training.preflight import check_training_inputs, input_folders
    from rewardbooth.training.resume import resume_changes
    from rewardbooth.training.run_dir import CONFIG_NAME, prepare_run_dir

    run_dir = Path(args.output)
    config_file = args.config
    if args.resume and config_file is None and (run_dir / CONFIG_NAME).is_file():
        config_file = run_dir / CONFIG_NAME  # resume repeats the saved run unless told otherwise
    cfg = load_config(config_file, train_overrides(args))
    check_training_inputs(cfg)  # everything checkable, before any model loads or anything is written
    from rewardbooth.training.sharding import check_processes

    check_processes(cfg.train.fsdp, int(os.environ.get("WORLD_SIZE", "1")))  # e.g. --fsdp without --num-processes
    if args.resume:
        resume_changes(cfg, run_dir)  # another run's settings are refused here, before the folder is touched
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # only the main process touches the folder
    if state.is_main_process:
        prepare_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite, protected=input_folders(cfg))
    state.wait_for_everyone()
    result = train(cfg, run_dir, resume=args.resume, progress=not args.quiet)
    if not state.is_main_process:
        return 0
    if result.already_finished:
        print(f"run {run_dir} is already finished ({result.final_step} steps; weights {result.weights}); nothing to resume. "
              f"Pass --resume --steps N with N > {result.final_step} to train it further.")
        return 0
    report = write_run_report(run_dir)
    selected = f" (best validated step {result.selected_step})" if result.selected_step != result.final_step else ""
    print(f"trained {cfg.train.method} for {result.final_step} steps{selected}: weights {result.weights}, report {report}")
    return 0


def cmd_train_many(args: argparse.Namespace) -> int:
    from rewardbooth.evaluation.run_report import write_run_report
    from rewardbooth.training.many import Share, prepare_subjects, read_subjects, subjects_per_batch, train_many

    share = Share().take()  # under accelerate launch: every count-th subject, trained by this process alone
    index, count = share.index, share.count
    overrides = {k: v for k, v in train_overrides(args).items() if k not in ("data.instance_dir", "data.class_noun")}
    entries = read_subjects(args.subjects, args.output, class_noun=args.class_noun)[index::count]
    runs, failed = prepare_subjects(entries, args.config, overrides, resume=args.resume, overwrite=args.overwrite,
                                    class_noun=args.class_noun)
    for outcome in failed:  # before anything trains; the others train on
        print(f"rewardbooth: subject {outcome.name}: {outcome.error}", file=sys.stderr)
    outcomes = train_many(runs, resume=args.resume, progress=not args.quiet, check_inputs=False,
                          subjects_per_batch=subjects_per_batch(args.subjects_per_batch))
    for outcome in outcomes:
        if outcome.ok and not outcome.result.already_finished:
            write_run_report(outcome.run_dir)
        state = ("already finished" if outcome.ok and outcome.result.already_finished else
                 f"trained {outcome.result.final_step} steps: weights {outcome.result.weights}" if outcome.ok else f"failed: {outcome.error}")
        print(f"{outcome.name}: {state}")
    bad = [o.name for o in [*failed, *outcomes] if not o.ok]
    where = f" (process {index + 1} of {count})" if count > 1 else ""
    print(f"train-many{where}: {sum(o.ok for o in outcomes)} of {len(outcomes) + len(failed)} subjects trained"
          + (f"; failed: {', '.join(bad)}" if bad else ""), flush=True)
    return 0 if share.all_ok(not bad) else 1


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from rewardbooth.data.images import save_image_grid
    from rewardbooth.errors import ConfigError
    from rewardbooth.sampling import METADATA_NAME, generate, run_sample_settings, save_generated
    from rewardbooth.training.finished_run import load_run_pipeline

    if args.num_images < 1 or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        raise ConfigError("-n, --steps and --batch-size must be positive")
    device = _device(args)
    dtype = torch.float16 if str(device).startswith("cuda") else None
    run_dir = Path(args.run)
    cfg, pipe = load_run_pipeline(run_dir, device=device, dtype=dtype)
    out = Path(args.output) if args.output else run_dir / "generated"
    out.mkdir(parents=True, exist_ok=True)
    settings = run_sample_settings(cfg, args.seed, args.steps, args.guidance, args.batch_size)
    images = generate(pipe, args.prompt, args.num_images, settings, progress=True)
    written = save_generated(out, args.prompt, images, args.seed)
    grid = save_image_grid([im for row in images for im in row], out / "grids" / f"{written[0].stem}.png", cols=args.num_images)
    print(f"wrote {len(written)} images to {out} ({METADATA_NAME} lists their prompts) and {grid}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rewardbooth.errors import ConfigError
    from rewardbooth.training.finished_run import export_lora, export_missing

    if args.format is None:
        if args.output:
            raise ConfigError("--output names one file or folder: give --format with it")
        for fmt, path, written in export_missing(Path(args.run), args.dtype):
            print(f"{fmt}: {path} ({'written now' if written else 'already there'})")
        return 0
    written = export_lora(Path(args.run), args.format, Path(args.output) if args.output else None, args.dtype)
    print(f"wrote {written}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rewardbooth.demo import run_demo

    run_demo(Path(args.output), steps=args.steps, seed=args.seed, overwrite=args.overwrite, method=args.method)  # prints its summary
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rewardbooth.evaluation.metrics import evaluate_folder, format_table, summarize

    scorer = _scorer(args, _run_evaluation_settings(Path(args.images)))
    scores = evaluate_folder(Path(args.images), Path(args.references), identifier=args.identifier, prompt=args.prompt, scorer=scorer)
    per_prompt, overall = summarize(scores, "prompt"), summarize(scores)
    print(format_table(per_prompt))
    print()
    print(format_table(overall))
    print(f"{len(scores)} images vs {args.references}; judges: " + ", ".join(f"{k}={v}" for k, v in scorer.checkpoints().items()))
    if args.output:
        Path(args.output).write_text(json.dumps({"judges": scorer.checkpoints(), "overall": overall[0], "per_prompt": per_prompt,
                                                 "images": [asdict(s) for s in scores]}, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rewardbooth.config import parse_override
    from rewardbooth.data.dreambench import load_dreambench
    from rewardbooth.errors import ConfigError
    from rewardbooth.evaluation.bench import FAILED_NAME, PAIRED_NAME, BenchRunner, merge, parse_shard, shard_subjects
    from rewardbooth.methods import load_config
    from rewardbooth.training.run_dir import run_lock

    if args.curve and not args.merge:
        raise ConfigError("--curve pairs the folders of --merge at equal seconds: give --merge BENCH_DIR ... too")
    if args.merge:
        report = merge([Path(d) for d in args.merge], Path(args.output) if args.output else None,
                       [Path(d) for d in args.curve or []])
        print(f"merged {len(args.merge)} bench folder(s): {report}")
        # only what this merge wrote: a paired.json left in the report folder by an earlier merge is not this one's
        paired = json.loads((report.parent / PAIRED_NAME).read_text()) if len(args.merge) > 1 or args.curve else {}
        if len(args.merge) > 1:
            _print_paired(paired, f"paired with {args.merge[0]}")
        for label, table in paired.get("equal_seconds", {}).items():
            _print_equal_seconds(label, table)
        return 0
    if any(v is not None and v < 1 for v in (args.images_per_prompt, args.sample_steps, args.num_subjects)):
        raise ConfigError("-k, --sample-steps and --num-subjects must be positive")
    if args.method and args.methods:
        raise ConfigError("give --method or --methods, not both")
    methods = [m.strip() for m in (args.methods or args.method or "").split(",") if m.strip()]
    from rewardbooth.training.many import check_many_settings, subjects_per_batch

    args.subjects_per_batch = subjects_per_batch(args.subjects_per_batch)
    if args.suite in MINIBENCH_SUITES:
        from rewardbooth.methods import BUILTIN_METHODS

        return _bench_mini(args, methods or list(BUILTIN_METHODS), MINIBENCH_SUITES[args.suite])
    if len(methods) > 1:
        raise ConfigError("the dreambench suite runs one --method per bench folder (shard and --merge them); --methods is for --suite mini")
    mini_only = [flag for flag, value in (("--budgets", args.budgets), ("--baseline-budgets", args.baseline_budgets),
                                          ("--num-subjects", args.num_subjects), ("--jobs", args.jobs)) if value is not None]
    if mini_only:
        raise ConfigError(f"{', '.join(mini_only)} apply to --suite mini only (the dreambench suite trains each subject once, "
                          "to --steps)")
    from rewardbooth.methods import baseline_method

    args.method = methods[0] if methods else baseline_method().name
    args.images_per_prompt = args.images_per_prompt or 4
    args.sample_steps = args.sample_steps or 50
    if not args.dreambench:
        raise ConfigError("bench needs --dreambench DIR (or --suite mini, or --merge BENCH_DIR ...)")
    bench = load_dreambench(Path(args.dreambench))
    subjects = bench.select([s.strip() for s in args.subjects.split(",") if s.strip()]) if args.subjects else list(bench.subjects.values())
    index, count = parse_shard(args.shard)
    overrides = {"train.method": args.method, "model.name": args.model, "train.steps": args.steps, "validation.every": 0}
    overrides.update(parse_override(text) for text in args.set)
    cfg = load_config(args.config, overrides)
    if args.subjects_per_batch not in (None, 1):
        check_many_settings(cfg)
    out = Path(args.output or f"bench-{args.method}")
    runner = BenchRunner(bench, out, cfg, _scorer(args, cfg.evaluation), images_per_prompt=args.images_per_prompt,
                         sample_steps=args.sample_steps,
                         guidance_scale=cfg.validation.guidance_scale if args.guidance is None else args.guidance, progress=not args.quiet,
                         subjects_per_batch=args.subjects_per_batch)
    mine = shard_subjects(subjects, index, count)
    with run_lock(out, shared=True):  # shards share the folder; the web app's queue waits for any of them
        computed = runner.run(mine)
    skipped = len(mine) - len(computed)
    failed = [s.name for s in mine if (runner.subject_dir(s) / FAILED_NAME).is_file()]
    print(f"shard {index}/{count}: {len(computed)} subject(s) computed, {skipped} already finished (skipped)"
          + (f"; {len(failed)} failed, training diverged: {', '.join(failed)} (subjects/<name>/{FAILED_NAME})" if failed else ""))
    if count == 1:
        print(f"results: {merge([out])}")
    else:
        print(f"when every shard is done: rewardbooth bench --merge {out}")
    return 0


def _bench_mini(args: argparse.Namespace, methods: list[str], adapter: str) -> int:
    from rewardbooth.config import parse_override
    from rewardbooth.errors import ConfigError
    from rewardbooth.evaluation.bench import PAIRED_NAME
    from rewardbooth.evaluation.metrics import format_table
    from rewardbooth.mini.bench import parse_budgets, run_mini_bench

    ignored = [flag for flag, value in (("--dreambench", args.dreambench), ("--subjects", args.subjects), ("--shard", args.shard),
                                        ("--dino-model", args.dino_model), ("--clip-model", args.clip_model)) if value]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)} do not apply to --suite mini (it uses the mini judges on its own subjects)")
    if (args.budgets or args.baseline_budgets) and args.steps:
        raise ConfigError("give --steps or --budgets, not both (the largest budget is the training length)")
    overrides = {k: v for k, v in (("model.name", args.model), ("train.steps", args.steps)) if v is not None}
    overrides.update(parse_override(text) for text in args.set)
    out = Path(args.output or f"bench-{args.suite}")
    report = run_mini_bench(out, methods, quick=args.quick, subjects_seed=args.subjects_seed, num_subjects=args.num_subjects,
                            images_per_prompt=args.images_per_prompt, sample_steps=args.sample_steps, config_file=args.config,
                            overrides=overrides, device=_device(args), progress=not args.quiet, jobs=args.jobs,
                            budgets=parse_budgets(args.budgets), subjects_per_batch=args.subjects_per_batch,
                            adapter=adapter, baseline_budgets=parse_budgets(args.baseline_budgets, "--baseline-budgets"))
    summary = json.loads((out / "results.json").read_text())
    spread = "_std_over_subjects"

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.3f}±{row[key + spread]:.3f}" if key + spread in row else str(row[key])

    print(format_table([{"method": m, **{k: cell(row, k) for k in row if k != "scope" and not k.endswith(spread)}}
                        for m, row in summary.items()]))
    print(f"mean±std over subjects; per image: {out}/<method>/results.csv; this table: {out}/results.csv")
    paired = json.loads((out / PAIRED_NAME).read_text())
    for budget, table in paired["budgets"].items():
        _print_paired(table, f"paired with {paired['baseline']}" + (f" at {budget} steps" if budget != "final" else ""))
    for budget, tables in paired.get("equal_seconds", {}).get("budgets", {}).items():
        for method, table in tables.items():
            _print_equal_seconds(f"{method} at {budget} steps", table)
    print(f"report: {report}")
    return 0


def _print_equal_seconds(what: str, table: dict) -> None:
    from rewardbooth.evaluation.bench import equal_seconds_title

    _print_paired(table, f"{equal_seconds_title(what, table)} ({table['how']}; {table['outside']} subject(s) outside its "
                         "range left out)")


def _print_paired(table: dict, title: str) -> None:
    from rewardbooth.evaluation.metrics import format_table
    from rewardbooth.evaluation.paired import paired_rows

    print(f"\n{title} ({table['interval']}):")
    print(format_table(paired_rows(table)))


def cmd_ui(args: argparse.Namespace) -> int:
    from rewardbooth.ui.server import serve

    server = serve(Path(args.runs_dir), args.host, args.port, args.auth)
    host, port = server.server_address[:2]
    print(f"rewardbooth ui: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/ (runs in {server.workspace.root}; Ctrl+C stops the page, not the runs)",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


# After a stop at a checkpointed step (Ctrl-C, SIGTERM): how to carry on.
STOP_HINTS = {"train": "continue with --resume", "train-many": "continue with --resume", "bench": "run the same command again to continue",
              "demo": "run it again (the stopped training starts over)"}
COMMANDS = {"ui": cmd_ui, "train": cmd_train, "train-many": cmd_train_many, "generate": cmd_generate, "export": cmd_export, "evaluate": cmd_evaluate, "bench": cmd_bench, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    set_library_verbosity(args.verbose)
    try:
        if args.command in ("train", "train-many") and args.num_processes != 1 and "WORLD_SIZE" not in os.environ:
            return launch_processes(args.num_processes, _without_num_processes(argv))
        return COMMANDS[args.command](args)
    except RewardboothError as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"rewardbooth: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        hint = f"; {STOP_HINTS[args.command]}" if isinstance(exc, Stopped) and args.command in STOP_HINTS else ""
        print("rewardbooth: interrupted" + (f": {exc}{hint}" if str(exc) else ""), file=sys.stderr)
        return 130
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"rewardbooth: error: cannot write{where}: {exc.strerror} (finished checkpoints are kept; "
              "free space or pick another --output, then --resume)", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script: main(), then exit without the interpreter's final garbage collection over
    the libraries' millions of objects (1-1.8 s of a tiny run's wall time here). Every file a command
    writes is closed by then; gc.freeze only skips collecting what is left, so tests calling main() keep
    their normal collector."""
    code = main()
    sys.stdout.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
