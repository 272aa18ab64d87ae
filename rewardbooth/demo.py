"""`rewardbooth demo`: personalization you can see, on a CPU, offline, in a few minutes.

Draws a MiniBench subject (a shape/colour/pattern combination the shipped `mini` model never saw
in pretraining; which one is fixed by --seed, never chosen by how a method does on it),
personalizes the model to it twice, with DreamBooth and with the default reward method (DPG), and
writes report.html: the same prompts and seeds before training, after DreamBooth and after the
reward method, side by side and judged by the shipped attribute classifier.

    DIR/rewardbooth-demo.json   what was asked (seed, steps, methods): marks the folder as a demo's
    DIR/reference/              the subject's photos
    DIR/runs/<method>/          one ordinary run folder per method (report.html, weights, metrics)
    DIR/report.html             the comparison
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rewardbooth.data.images import save_labelled_rows
from rewardbooth.errors import OutputExistsError
from rewardbooth.evaluation.report import ReportSection, write_report
from rewardbooth.evaluation.run_report import write_run_report
from rewardbooth.methods import baseline_method, showcase_method
from rewardbooth.mini.assets import MINI_NAME
from rewardbooth.mini.bench import SAMPLE_BATCH, SAMPLERS, method_config
from rewardbooth.mini.scoring import ATTRIBUTE_METRICS, AttributeJudge, attribute_checks
from rewardbooth.mini.world import make_subject, subject_prompts
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.finished_run import load_run_pipeline
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import RunFolder, prepare_run_dir

IMAGES_PER_PROMPT = 4
DEMO_MARKER = "rewardbooth-demo.json"
MINI_NOTICE = ("The 'mini' model was pretrained on rewardbooth's procedural MiniBench world (32 px shapes in 8 contexts), "
               "so it shows what personalization does, at toy scale. Pass --model with a Stable Diffusion or FLUX checkpoint "
               "to `rewardbooth train` for real photos.")
ONE_SUBJECT = ("One subject proves nothing: methods win on some subjects and lose on others. Whether a method is better is "
               "measured over 24 subjects with paired intervals by `rewardbooth bench --suite mini` (README, MiniBench).")


def run_demo(run_dir: Path, steps: int | None = None, seed: int = 0, overwrite: bool = False, progress: bool = True,
             method: str | None = None, images_per_prompt: int = IMAGES_PER_PROMPT) -> Path:
    """DreamBooth and `method` (default: the showcase reward method) on one MiniBench subject; the comparison report."""
    run_dir = Path(run_dir)
    methods = list(dict.fromkeys([baseline_method().name, method or showcase_method().name]))
    asked = {"seed": seed, "steps": steps, "methods": methods, "images_per_prompt": images_per_prompt}
    report = run_dir / "report.html"
    if _prepare_folder(run_dir, asked, overwrite):
        print(f"the demo in {run_dir} is already done: {report} (pass --overwrite to run it again)")
        return report
    subject = make_subject(seed=seed)
    reference_dir = run_dir / "reference"
    subject.save(reference_dir, overwrite=True)  # the demo's own folder (its marker says so)
    overrides = {"data.instance_dir": str(reference_dir), "data.class_noun": subject.class_noun, "train.seed": seed}
    if steps is not None:
        overrides["train.steps"] = steps
    configs = {name: method_config(name, None, overrides) for name in methods}
    first = configs[methods[0]]
    specs = subject_prompts(subject, first.data.identifier)
    prompts = [spec.prompt for spec in specs]
    steps, guidance = SAMPLERS[MINI_NAME]
    settings = SampleSettings(steps=steps, guidance_scale=guidance, seed=seed, batch_size=SAMPLE_BATCH)
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

    columns = {"before training": sample_and_judge(make_pipeline(load_components(first.model.name)))}
    for name, cfg in configs.items():
        method_dir = run_dir / "runs" / name
        if not (method_dir.is_dir() and RunFolder(method_dir).is_finished()):  # an interrupted run starts again
            prepare_run_dir(method_dir, resume=False, overwrite=True)
            train(cfg, method_dir, progress=progress)
            write_run_report(method_dir, notice=MINI_NOTICE)
        columns[f"after {cfg.train.steps} {name} steps"] = sample_and_judge(load_run_pipeline(method_dir)[1])

    labels = list(columns)
    compare = save_labelled_rows([(prompt, [im for label in labels for im in columns[label][0][j]]) for j, prompt in enumerate(prompts)],
                                 run_dir / "report_assets" / "compare.png", scale=3, group=images_per_prompt, header=labels)
    scores = {label: means for label, (_, means) in columns.items()}
    summary = demo_summary(subject, scores)
    table = [{"check": m, **{label: f"{scores[label][m]:.2f}" for label in labels}} for m in ATTRIBUTE_METRICS]
    sections = [
        ReportSection("Did it learn the subject?", "\n".join(summary) + "\n\nShare of images where the attribute judge sees "
                      "what the prompt needs: the subject's shape, colour and pattern kept (identity_kept: all three at once, "
                      "the strictest number), the prompted context and modifiers drawn (prompt_ok).", table=table),
        ReportSection("Reference images", f"the subject: {subject.colour} {subject.pattern} {subject.shape}, drawn by seed {seed}",
                      images=[(str(p.relative_to(run_dir)), p.stem) for p in sorted(reference_dir.glob("*.png"))[:4]]),
        ReportSection("Prompt by prompt", f"each row one prompt; {images_per_prompt} images per column, the same seeds in every "
                      "column: the base model, then each method's trained weights reloaded from disk (each run's own report: "
                      + ", ".join(f"runs/{name}/report.html" for name in methods) + ")",
                      images=[(str(compare.relative_to(run_dir)), " | ".join(labels))]),
    ]
    report = write_report(run_dir, "rewardbooth demo: DreamBooth and a reward method on one subject", sections, notice=MINI_NOTICE)
    print("\n".join([*summary, f"report: {report}"]))
    return report


def _prepare_folder(run_dir: Path, asked: dict, overwrite: bool) -> bool:
    """Make or reuse the demo folder; True when it holds a finished demo (kept unless --overwrite). A folder
    of anything else is refused (a mistyped --output must never lose files); only a demo's is ever removed:
    with --overwrite, or when an unfinished one was started with other settings."""
    marker = run_dir / DEMO_MARKER
    ours = marker.is_file()
    if run_dir.exists() and any(run_dir.iterdir()) and not ours:
        raise OutputExistsError(f"output folder {run_dir} is not empty and not a demo's; choose another --output")
    if ours and not overwrite and (run_dir / "report.html").is_file():
        return True
    if ours and (overwrite or json.loads(marker.read_text()) != asked):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(asked))
    return False


def demo_summary(subject, scores: dict[str, dict[str, float]]) -> list[str]:
    """Plain-language lines: how much of the subject each column keeps, and whether it still follows prompts."""
    labels = list(scores)

    def row(metric: str) -> str:
        return " -> ".join(f"{scores[label][metric]:.0%}" for label in labels)

    return [
        f"The {subject.colour} {subject.pattern} {subject.shape} ({' -> '.join(labels)}):",
        f"  kept whole (shape, colour and pattern at once): {row('identity_kept')}",
        f"  still draws what the prompt asks (context, colour, size): {row('prompt_ok')}",
        ONE_SUBJECT,
    ]
