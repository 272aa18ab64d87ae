"""`rewardbooth demo`: the whole pipeline on a CPU, offline, in about a minute.

Makes a procedural subject, personalizes the built-in tiny model to it with DreamBooth-LoRA,
samples it in a few contexts and writes report.html.
"""

from __future__ import annotations

from pathlib import Path

from rewardbooth.config import load_config
from rewardbooth.data.procedural import make_subject, save_subject
from rewardbooth.evaluation.report import ReportSection, save_image_grid
from rewardbooth.evaluation.run_report import write_run_report
from rewardbooth.models.loading import load_run_pipeline
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import prepare_run_dir

DEMO_PROMPTS = ["a {identifier} {class_noun}", "a {identifier} {class_noun} on the beach", "a {identifier} {class_noun} in the snow"]
RANDOM_WEIGHTS_NOTICE = (
    "These images come from the built-in 'tiny' model, whose weights are random: it has never seen a real image, "
    "so the samples show that the pipeline runs end to end, not what personalization looks like. "
    "Pass --model with a real Stable Diffusion checkpoint for real results."
)


def run_demo(run_dir: Path, steps: int = 300, seed: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
    subject = make_subject(seed=seed, num_images=5, size=64)
    reference_dir = run_dir / "reference"
    save_subject(subject, reference_dir)
    cfg = load_config(overrides={
        "model.name": "tiny",
        "data.instance_dir": str(reference_dir),
        "data.class_noun": subject.class_noun,
        "train.steps": steps,
        "train.learning_rate": 1e-3,  # a tiny random model needs a large step to move at all
        "train.batch_size": 2,
        "train.seed": seed,
        "train.checkpoint_every": 0,
        "prior.num_class_images": 16,
        "prior.generation_steps": 10,
        "validation.every": max(steps // 3, 1),
        "validation.steps": 10,
        "validation.prompts": DEMO_PROMPTS,
    })
    train(cfg, run_dir, progress=progress)

    _, pipe = load_run_pipeline(run_dir)
    prompts = [cfg.format_prompt(p) for p in DEMO_PROMPTS]
    images = generate(pipe, prompts, 4, SampleSettings(steps=20, seed=seed), progress=progress, description="final samples")
    grid = save_image_grid([im for row in images for im in row], run_dir / "report_assets" / "final.png", cols=4)
    final = ReportSection("Final samples (trained LoRA reloaded from disk)", "rows: " + " | ".join(prompts),
                          images=[(str(grid.relative_to(run_dir)), "4 seeds per prompt")])
    return write_run_report(run_dir, notice=RANDOM_WEIGHTS_NOTICE, extra_sections=[final])
