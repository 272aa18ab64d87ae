"""report.html for one training run: references, curves, validation grids, settings."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rewardbooth.data.images import load_image_folder, save_image_grid
from rewardbooth.evaluation.figures import plot_metrics
from rewardbooth.evaluation.report import ReportSection, write_report
from rewardbooth.methods import method_registry
from rewardbooth.training.run_dir import RunFolder

REFERENCE_THUMBNAIL = 256  # px, longest side of each reference in the report's strip


def write_run_report(run_dir: Path, notice: str | None = None, extra_sections: list[ReportSection] = ()) -> Path:
    folder = RunFolder(run_dir)
    run_dir = folder.root
    cfg = yaml.safe_load(folder.config.read_text())
    result = folder.read_result()
    records = folder.read_metrics()
    sections = []

    instance_dir = cfg["data"]["instance_dir"]
    if instance_dir and Path(instance_dir).is_dir():
        references = load_image_folder(Path(instance_dir))
        save_image_grid(references, run_dir / "report_assets" / "references.png", cols=len(references), max_side=REFERENCE_THUMBNAIL)
        sections.append(ReportSection("Reference images", f"{len(references)} images of the subject from {instance_dir}",
                                      images=[("report_assets/references.png", "references")]))

    train_records = [r for r in records if not r.get("validation")]
    keys = _numeric_keys(train_records, skip={"step", "lr", "seconds_per_step"})
    # DPG: the critic's prediction beside the true reward shows whether Q has converged.
    panels = [("reward_true", "reward_predicted") if k == "reward_true" and "reward_predicted" in keys else k
              for k in keys if k != "reward_predicted" or "reward_true" not in keys]
    plot = plot_metrics(train_records, panels, run_dir / "report_assets" / "loss.png", title="training")
    if plot is not None:
        last = train_records[-1]
        text = f"step {last['step']}: " + _numbers(last, keys)
        sections.append(ReportSection("Training curves", text, images=[("report_assets/loss.png", "per logged step")]))
    validation_records = [r for r in records if r.get("validation")]
    keys = _numeric_keys(validation_records, skip={"step", "validation"})
    if plot_metrics(validation_records, keys, run_dir / "report_assets" / "validation.png", title="validation") is not None:
        text = "; ".join(f"step {r['step']}: " + _numbers(r, keys) for r in validation_records)
        if result is not None and result.selected_step != result.last_step:
            text += f". Selected weights: step {result.selected_step} (best validation)."
        sections.append(ReportSection("Validation curve", text, images=[("report_assets/validation.png", "per validation")]))

    grids = folder.sample_grids()
    if grids:
        prompts_file = grids[-1].parent / "prompts.json"
        prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else []
        sections.append(ReportSection(
            "Validation samples",
            "rows: " + " | ".join(prompts) + f"; {cfg['validation']['num_images']} seeds per prompt, same seeds at every step",
            images=[(str(g.relative_to(run_dir)), g.parent.name) for g in grids],
        ))

    sections.extend(extra_sections)
    method = cfg["train"]["method"]
    # each method's own section; the others do not apply to this run
    other_methods = {cls.section for name, cls in method_registry().items() if cls.section and name != method}
    not_this_model = {"flow"} if result and result.flow_matching is False else set()  # flow.* applies to flow models
    settings = [{"setting": f"{section}.{key}", "value": json.dumps(value)} for section, values in cfg.items()
                if section not in other_methods | not_this_model for key, value in values.items()]
    sections.append(ReportSection("Settings", f"the resolved config.yaml of this run (the settings {method} uses)", table=settings))
    title = f"rewardbooth {result.method if result else method} run: {cfg['data']['identifier']} {cfg['data']['class_noun']}"
    return write_report(run_dir, title, sections, notice=notice)


def _numeric_keys(records: list[dict], skip: set[str]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys[key] = None
    return list(keys)


def _numbers(record: dict, keys: list[str]) -> str:
    # null: a NaN/inf value (metrics.jsonl is strict JSON)
    return ", ".join(f"{k} {'nan' if record[k] is None else format(record[k], '.4f')}" for k in keys if k in record)
