"""`rewardbooth demo`: personalization you can see, on a CPU, offline, in a few minutes.

Draws a MiniBench subject (a shape/colour/pattern combination the shipped `mini` model never
saw in pretraining), personalizes the model to it with DreamBooth, and writes report.html with
the same prompts sampled before and after training, judged by the shipped attribute classifier.
"""

from __future__ import annotations

from pathlib import Path

from rewardbooth.evaluation.report import ReportSection, save_image_grid
from rewardbooth.evaluation.run_report import write_run_report
from rewardbooth.mini.bench import GUIDANCE, SAMPLE_BATCH, method_config
from rewardbooth.mini.scoring import ATTRIBUTE_METRICS, AttributeJudge, attribute_checks
from rewardbooth.mini.world import make_subject, subject_prompts
from rewardbooth.models.loading import load_components, load_run_pipeline, make_pipeline
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import RUN_MARKER, prepare_run_dir

IMAGES_PER_PROMPT = 4
MINI_NOTICE = ("The 'mini' model was pretrained on rewardbooth's procedural MiniBench world (32 px shapes in 8 contexts), "
               "so it shows what personalization does, at toy scale. Pass --model with a Stable Diffusion checkpoint to "
               "`rewardbooth train` for real photos.")


def run_demo(run_dir: Path, steps: int | None = None, seed: int = 0, overwrite: bool = False, progress: bool = True,
             method: str = "dreambooth", images_per_prompt: int = IMAGES_PER_PROMPT) -> Path:
    run_dir = Path(run_dir)
    report = run_dir / "report.html"
    if not overwrite and (run_dir / RUN_MARKER).is_file():
        if report.is_file() and (run_dir / "result.json").is_file():
            print(f"the demo in {run_dir} is already done: {report} (pass --overwrite to run it again)")
            return report
        overwrite = True  # an interrupted demo of ours: start it again (the marker says the folder is ours)
    prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
    subject = make_subject(seed=seed)
    reference_dir = run_dir / "reference"
    subject.save(reference_dir)
    overrides = {"data.instance_dir": str(reference_dir), "data.class_noun": subject.class_noun, "train.seed": seed}
    if steps is not None:
        overrides["train.steps"] = steps
    cfg = method_config(method, None, overrides)
    specs = subject_prompts(subject, cfg.data.identifier)
    prompts = [spec.prompt for spec in specs]
    settings = SampleSettings(steps=20, guidance_scale=GUIDANCE, seed=seed, batch_size=SAMPLE_BATCH)
    judge = AttributeJudge("mini")

    def sample_and_judge(pipe, label: str) -> tuple[Path, dict[str, float]]:
        rows = generate(pipe, prompts, images_per_prompt, settings, progress=progress, description=f"samples {label}")
        flat = [im for row in rows for im in row]
        checks = [attribute_checks(p, spec) for p, spec in zip(judge.predict(flat), [s for s in specs for _ in range(images_per_prompt)])]
        means = {}
        for metric in ATTRIBUTE_METRICS:
            values = [c[metric] for c in checks if c[metric] == c[metric]]  # NaN: not asked by that prompt
            means[metric] = sum(values) / len(values) if values else float("nan")
        grid = save_image_grid(flat, run_dir / "report_assets" / f"samples_{label}.png", cols=images_per_prompt)
        return grid, means

    before_grid, before = sample_and_judge(make_pipeline(load_components(cfg.model.name)), "before")
    train(cfg, run_dir, progress=progress)
    _, pipe = load_run_pipeline(run_dir)
    after_grid, after = sample_and_judge(pipe, "after")

    table = [{"check": m, "before training": f"{before[m]:.2f}", "after training": f"{after[m]:.2f}"} for m in ATTRIBUTE_METRICS]
    rows_text = "rows: " + " | ".join(prompts) + f"; {images_per_prompt} seeds per prompt, the same seeds before and after"
    sections = [
        ReportSection("Did it learn the subject?",
                      f"The subject is a {subject.colour} {subject.pattern} {subject.shape}. Share of images where the attribute "
                      "judge sees what the prompt needs: the subject's shape, colour and pattern kept (identity_kept: all three), "
                      "the prompted context and modifiers drawn (prompt_ok).", table=table),
        ReportSection("Before training (the base model given the same prompts)", rows_text,
                      images=[(str(before_grid.relative_to(run_dir)), "before")]),
        ReportSection(f"After {cfg.train.steps} {method} steps (weights reloaded from disk)", rows_text,
                      images=[(str(after_grid.relative_to(run_dir)), "after")]),
    ]
    return write_run_report(run_dir, notice=MINI_NOTICE, extra_sections=sections)
