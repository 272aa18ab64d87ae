"""`rewardbooth demo`: personalization you can see, on a CPU, offline, in a few minutes.

Draws a MiniBench subject (a shape/colour/pattern combination the shipped `mini` model never
saw in pretraining), personalizes the model to it with DreamBooth, and writes report.html with
the same prompts sampled before and after training, judged by the shipped attribute classifier.
"""

from __future__ import annotations

from pathlib import Path

from rewardbooth.data.images import save_labelled_rows
from rewardbooth.evaluation.report import ReportSection
from rewardbooth.evaluation.run_report import write_run_report
from rewardbooth.methods import baseline_method
from rewardbooth.mini.bench import GUIDANCE, SAMPLE_BATCH, SUITES, method_config
from rewardbooth.mini.scoring import ATTRIBUTE_METRICS, AttributeJudge, attribute_checks
from rewardbooth.mini.world import make_subject, subject_prompts
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.finished_run import load_run_pipeline
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import RUN_MARKER, RunFolder, prepare_run_dir

IMAGES_PER_PROMPT = 4
MINI_NOTICE = ("The 'mini' model was pretrained on rewardbooth's procedural MiniBench world (32 px shapes in 8 contexts), "
               "so it shows what personalization does, at toy scale. Pass --model with a Stable Diffusion checkpoint to "
               "`rewardbooth train` for real photos.")


def run_demo(run_dir: Path, steps: int | None = None, seed: int = 0, overwrite: bool = False, progress: bool = True,
             method: str | None = None, images_per_prompt: int = IMAGES_PER_PROMPT) -> Path:
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    report = folder.report
    if not overwrite and (run_dir / RUN_MARKER).is_file():
        if report.is_file() and folder.is_finished():
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
    cfg = method_config(method or baseline_method().name, None, overrides)
    specs = subject_prompts(subject, cfg.data.identifier)
    prompts = [spec.prompt for spec in specs]
    settings = SampleSettings(steps=SUITES["full"]["sample_steps"], guidance_scale=GUIDANCE, seed=seed, batch_size=SAMPLE_BATCH)
    judge = AttributeJudge("mini")

    def sample_and_judge(pipe) -> tuple[list[list], dict[str, float]]:
        rows = generate(pipe, prompts, images_per_prompt, settings, progress=progress, description="samples")
        flat = [im for row in rows for im in row]
        checks = [attribute_checks(p, spec) for p, spec in zip(judge.predict(flat), [s for s in specs for _ in range(images_per_prompt)])]
        means = {}
        for metric in ATTRIBUTE_METRICS:
            values = [c[metric] for c in checks if c[metric] == c[metric]]  # NaN: not asked by that prompt
            means[metric] = sum(values) / len(values) if values else float("nan")
        return rows, means

    before_rows, before = sample_and_judge(make_pipeline(load_components(cfg.model.name)))
    train(cfg, run_dir, progress=progress)
    _, pipe = load_run_pipeline(run_dir)
    after_rows, after = sample_and_judge(pipe)

    side_by_side = save_labelled_rows([(prompt, b + a) for prompt, b, a in zip(prompts, before_rows, after_rows)],
                                      run_dir / "report_assets" / "before_after.png", scale=3, gap_after=images_per_prompt,
                                      header=["before training", f"after {cfg.train.steps} {method} steps"])
    summary = demo_summary(subject, before, after)
    table = [{"check": m, "before training": f"{before[m]:.2f}", "after training": f"{after[m]:.2f}",
              "change": _change(before[m], after[m])} for m in ATTRIBUTE_METRICS]
    sections = [
        ReportSection("Did it learn the subject?", "\n".join(summary) + "\n\nShare of images where the attribute judge sees "
                      "what the prompt needs: the subject's shape, colour and pattern kept (identity_kept: all three at once, "
                      "the strictest number), the prompted context and modifiers drawn (prompt_ok).", table=table),
        ReportSection("Before and after, prompt by prompt",
                      f"each row one prompt; left {images_per_prompt} images from the base model, right the same seeds after "
                      "training (weights reloaded from disk)", images=[(str(side_by_side.relative_to(run_dir)), "before | after")]),
    ]
    report = write_run_report(run_dir, notice=MINI_NOTICE, extra_sections=sections)
    print("\n".join([*summary, f"report: {report}"]))
    return report


def _change(before: float, after: float) -> str:
    if before != before or after != after:
        return ""
    if after > before + 0.05:
        return "better"
    return "worse" if after < before - 0.05 else "about the same"


def demo_summary(subject, before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Two plain-language lines: what the model now keeps of the subject, and whether it still follows prompts."""
    kept = ", ".join(f"{name} {before[f'{name}_kept']:.0%} -> {after[f'{name}_kept']:.0%}" for name in ("shape", "colour", "pattern"))
    return [
        f"The {subject.colour} {subject.pattern} {subject.shape}: kept in the images (before -> after training): {kept}; "
        f"all three at once {before['identity_kept']:.0%} -> {after['identity_kept']:.0%}.",
        f"It still draws what the prompt asks (context, colour, size) in {after['prompt_ok']:.0%} of images "
        f"({before['prompt_ok']:.0%} before).",
    ]
