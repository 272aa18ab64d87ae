"""`rewardbooth bench --suite mini`: every method personalized on fresh MiniBench subjects, judged.

Layout of a mini bench folder:
    references/<subject>/00.png ...   the subjects' reference images (drawn from --subjects-seed)
    class_images/<class noun>/        the prior's class images, made once by the base model, shared by all
    <method>/                         one DreamBench-style bench folder per method (resumable; results.csv per image)
    <method>@<budget>/                with --budgets: one per method and budget, evaluating ...
    runs/<method>/<subject>/          ... one training run per method and subject, to the largest budget
    report.html, results.json/.csv    all methods side by side (means and spread over subjects)
    paired.json                       each method minus dreambooth, subject by subject, with bootstrap intervals

Subjects are split over `jobs` worker processes (one CPU thread each by default): the small
model's batches do not keep two threads busy, two processes do. With `subjects_per_batch` K the
subjects of a method train K at a time (training/many.py), each worker taking its share of the
batches, and are evaluated as without it (evaluation/bench.py: how their seconds are counted).

Per image it reports the DreamBench trio with the mini judges (mini-DINO, mini-CLIP-I,
mini-CLIP-T) and the attribute judge's checks (see `rewardbooth.mini.scoring`).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from rewardbooth.config import MINIBENCH_SUITES, RunConfig
from rewardbooth.errors import ConfigError
from rewardbooth.evaluation.bench import (PAIRED_NAME, BenchRunner, SubjectsFailed, equal_seconds_section, frontier_sections,
                                          is_batched, subject_config, summarize_folders, write_bench_report)
from rewardbooth.evaluation.metrics import ImageScore, Scorer
from rewardbooth.evaluation.paired import paired_at_equal_seconds, paired_differences, paired_rows
from rewardbooth.evaluation.report import ReportSection
from rewardbooth.methods import baseline_method, load_config, resolve_variant
from rewardbooth.methods.dreambooth import class_image_settings
from rewardbooth.mini.assets import FLOW_NAME, MINI_NAME, MODEL_NAMES
from rewardbooth.mini.preset import FLOW_SAMPLER_GUIDANCE, FLOW_SAMPLER_STEPS, mini_defaults
from rewardbooth.mini.scoring import AttributeJudge, attribute_checks
from rewardbooth.mini.world import DEFAULT_SPLIT, MiniSubject, PromptSpec, make_subjects, subject_prompts
from rewardbooth.models.loading import FLOW_PIPELINES, load_components, make_pipeline, read_model_config
from rewardbooth.models.presets import preset_defaults
from rewardbooth.sampling import generate
from rewardbooth.training.many import check_many_settings
from rewardbooth.training.run_dir import RunFolder, run_lock

# Settings every method shares in the bench (its model and validation steps: method_config); the mini preset's own
# world (judges, prompts, guidance: rewardbooth.models.presets) comes with --model mini or mini-flow.
MINI_COMMON: dict[str, Any] = {
    "data.random_flip": True,
    "prior.num_class_images": 32,
    "prior.generation_batch_size": 32,  # 32 px samples: big batches are nearly free
    "validation.batch_size": 32,
    "train.checkpoint_every": 0,
    "train.log_every": 10,
    # Where a method validates (RPO, selection variants): on the preset's RPO prompts, four of the seven
    # contexts the bench asks for (RPO's own default, its training prompts, are the same list).
    "validation.prompts": mini_defaults()["rpo.prompts"],
}
# The LoRA suite (--suite mini-lora): what most users train. The library's LoRA (rank 4 on the attention
# projections, as diffusers' DreamBooth LoRA script; 4 / 64-128 channels is about SD 1.5's rank-16 share),
# the rest of each method's MiniBench settings kept; learning rates: docs/minibench.md, "LoRA suite".
MINI_LORA: dict[str, Any] = {"adapter.kind": "lora", "adapter.rank": 4, "adapter.targets": "attention", "train.learning_rate": 1e-3}
ADAPTERS = tuple(MINIBENCH_SUITES.values())
# Every method's own MiniBench settings and named variants live with the method (Method.minibench,
# Method.variants in rewardbooth/methods/): full U-Net, the same 400 steps at batch 1 (+ 1 class
# image), learning rates chosen on the tuning subjects of set 100 (docs/minibench.md, "Tuning");
# Method.minibench_models on top for another base model (mini-flow's transformer).
SUITES = {
    # subjects, images per prompt: 2 because the spread between subjects, not between images, limits
    # what a paired comparison can tell.
    "quick": {"subjects": 2, "images_per_prompt": 2},
    "full": {"subjects": 24, "images_per_prompt": 2},
}
# The bench's sampler per base model, (steps, guidance), for the judged images and validation. mini: 10 DPM-Solver steps
# keep its attribute accuracies of 25 (docs/minibench.md, "Where the time goes"), samples cleanest at guidance 3-5;
# mini-flow: its preset's Euler sampler (docs/mini-flow.md, "The quality bar").
SAMPLERS = {MINI_NAME: (10, 4.0), FLOW_NAME: (FLOW_SAMPLER_STEPS, FLOW_SAMPLER_GUIDANCE)}
assert set(SAMPLERS) == set(MODEL_NAMES), "every shipped MiniBench model needs its sampler"
# Subject i of --subjects-seed N is made from seed N * SUBJECT_SEED_STRIDE + i (taken combinations
# skipped), so different --subjects-seed values never share a subject. Runs recorded before this
# mapping name their subjects by seed (mini-100-...): make_subject(100) remakes them.
SUBJECT_SEED_STRIDE = 1000
SAMPLE_BATCH = 32


@dataclass
class MiniBenchSubject:
    """A MiniSubject with its references on disk, shaped like a DreamBench subject for BenchRunner."""
    subject: MiniSubject
    image_dir: Path

    @property
    def name(self) -> str:
        return self.subject.name

    @property
    def class_noun(self) -> str:
        return self.subject.class_noun

    def specs(self, identifier: str = "sks") -> list[PromptSpec]:
        return subject_prompts(self.subject, identifier)

    def prompts(self, identifier: str = "sks") -> list[str]:
        return [spec.prompt for spec in self.specs(identifier)]


def prepare_subjects(root: Path, count: int, seed: int) -> list[MiniBenchSubject]:
    """Draw `count` held-out subjects from `seed` and write their references under root/references."""
    if not 1 <= count <= len(DEFAULT_SPLIT.heldout):
        raise ConfigError(f"--num-subjects must lie in [1, {len(DEFAULT_SPLIT.heldout)}] (the held-out combinations), got {count}")
    if seed < 0:
        raise ConfigError(f"--subjects-seed must be >= 0, got {seed}")
    subjects = []
    for subject in make_subjects(count, seed=seed * SUBJECT_SEED_STRIDE):
        folder = root / "references" / subject.name
        if not folder.is_dir():  # deterministic from the seed, so an existing folder holds the same images
            subject.save(folder)
        subjects.append(MiniBenchSubject(subject, folder))
    return subjects


class MiniBenchRunner(BenchRunner):
    """One method on the mini subjects. With a `budget`, the runs live in `run_root` (shared by
    the method's budgets) and this runner evaluates the weights kept at that step."""

    def __init__(self, subjects_root: Path, subjects_seed: int, judge: AttributeJudge, *args: Any,
                 run_root: Path | None = None, budget: int | None = None, **kwargs: Any):
        super().__init__(None, *args, **kwargs)
        self.subjects_root, self.subjects_seed, self.judge = Path(subjects_root), subjects_seed, judge
        self.run_root, self.budget = run_root, budget

    def run_dir(self, subject: MiniBenchSubject) -> Path:
        return self.run_root / subject.name if self.run_root else super().run_dir(subject)

    def weights_dir(self, run_dir: Path) -> Path | None:
        return RunFolder(run_dir).budget_dir(self.budget) if self.budget and self.budget != self.cfg.train.steps else None

    def evaluated_step(self) -> int:
        return self.budget or self.cfg.train.steps

    def info(self) -> dict[str, Any]:
        return {"suite": "mini", "method": self.cfg.train.method, "model": self.cfg.model.name, "budget": self.budget,
                "references": str(self.subjects_root.resolve() / "references"), "subjects_seed": self.subjects_seed,
                "images_per_prompt": self.images_per_prompt, "sample_steps": self.sample_steps,
                "guidance_scale": self.guidance_scale, "judges": {**self.scorer.checkpoints(), "attributes": self.judge.name},
                "config": self.cfg.to_dict()}

    def subject_config(self, subject: MiniBenchSubject) -> RunConfig:
        cfg = super().subject_config(subject)
        if cfg.prior.enabled and not cfg.prior.class_dir:
            cfg.prior.class_dir = str(class_image_dir(self.subjects_root, subject.class_noun))
        return cfg

    def add_scores(self, subject: MiniBenchSubject, images: list[Image.Image], scores: list[ImageScore]) -> None:
        specs = [spec for spec in subject.specs(self.cfg.data.identifier) for _ in range(self.images_per_prompt)]
        for score, predicted, spec in zip(scores, self.judge.predict(images), specs, strict=True):
            score.extra.update(attribute_checks(predicted, spec))


def bench_model(overrides: dict[str, Any]) -> tuple[str, str]:
    """The bench's base model (--model, default mini) and which of MiniBench's models it is: a folder (a retrained mini)
    is mini-flow if it holds a flow pipeline, else mini. The judges know only mini's world: anything else is refused."""
    model = str(overrides.get("model.name") or MINI_NAME)
    if model in SAMPLERS:
        return model, model
    if not Path(model).expanduser().is_dir():
        raise ConfigError(f"--model {model}: MiniBench's judges know only mini's world; use {', '.join(MODEL_NAMES)} or a local "
                          "folder of a model trained on it")
    flow = read_model_config(model, None, "model_index.json").get("_class_name") in FLOW_PIPELINES
    return model, FLOW_NAME if flow else MINI_NAME


def method_config(method: str, config_file: str | None, overrides: dict[str, Any], adapter: str = "full") -> RunConfig:
    """A method's (or named variant's) MiniBench settings for the bench's model, with `adapter` "lora" its LoRA
    suite's; `overrides` (--set) on top."""
    if adapter not in ADAPTERS:
        raise ConfigError(f"MiniBench adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}")
    model, kind = bench_model(overrides)
    cls, changes = resolve_variant(method)
    # a folder is no preset: the bench brings its world (judges, prompts, sampler), as --model mini(-flow) does
    world = preset_defaults(kind) if model != kind else {}
    common = {**world, **MINI_COMMON, "model.name": model, "validation.steps": SAMPLERS[kind][0]}
    lora = {**MINI_LORA, **cls.minibench_lora, **cls.variant_minibench_lora.get(method, {})} if adapter == "lora" else {}
    model_settings = {**cls.minibench_models.get(kind, {}), **cls.variant_minibench_models.get(method, {}).get(kind, {})}
    return load_config(config_file, {"train.method": cls.name, **common, **cls.minibench, **model_settings,
                                     **lora, **changes, **overrides})


def class_image_dir(root: Path, class_noun: str) -> Path:
    return Path(root) / "class_images" / class_noun


def prepare_class_images(root: Path, cfg: RunConfig, subjects: list[MiniBenchSubject], device: str, progress: bool) -> None:
    """The prior's class images depend only on the base model, the class prompt and the seed, so
    every method and subject of one class shares one set (made here, before any worker starts;
    the same images each run would otherwise make for itself)."""

    pipe = None
    for subject in {s.class_noun: s for s in subjects}.values():
        folder = class_image_dir(root, subject.class_noun)
        if len(list(folder.glob("*.png"))) >= cfg.prior.num_class_images:
            continue
        pipe = pipe or make_pipeline(load_components(cfg.model.name)).to(device)
        images = generate(pipe, [subject_config(cfg, subject).class_prompt], cfg.prior.num_class_images, class_image_settings(cfg),
                          progress=progress, description=f"class images: {subject.class_noun}")[0]
        partial = folder.with_name(folder.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(partial / f"class_{i:05d}.png")
        partial.replace(folder)


def bench_folder_name(method: str, budget: int | None) -> str:
    return f"{method}@{budget}" if budget else method


def bench_baseline(methods: list[str]) -> str:
    """What every method is paired with: dreambooth, or the first method where it is not benched."""
    return baseline_method().name if baseline_method().name in methods else methods[0]


def budgets_per_method(methods: list[str], budgets: list[int] | None, baseline_budgets: list[int] | None) -> dict[str, list[int] | None]:
    """Each method's budgets: `budgets` for all, and the baseline also at `baseline_budgets`, so its curve can reach
    the seconds a slower method spends at its budgets (the equal-seconds pairing never extrapolates)."""
    if baseline_budgets and not budgets:
        raise ConfigError("--baseline-budgets adds budgets to --budgets: give both, e.g. --budgets 200,400 --baseline-budgets 800,1600")
    baseline = bench_baseline(methods)
    return {m: sorted({*budgets, *(baseline_budgets or [] if m == baseline else [])}) if budgets else None for m in methods}


def budget_settings(budgets: list[int] | None) -> dict[str, Any]:
    """Train to the largest budget, keeping the weights as they stood at the others."""
    return {"train.steps": max(budgets), "train.save_steps": [b for b in budgets if b != max(budgets)]} if budgets else {}


def _runners(out: Path, subjects_seed: int, judge: AttributeJudge, method: str, cfg: RunConfig, images_per_prompt: int,
             sample_steps: int, guidance: float, device: str, budgets: list[int] | None, progress: bool = False,
             subjects_per_batch: int | str | None = None) -> list[MiniBenchRunner]:
    """The method's runners: one, or one per budget (the largest first: it trains the shared runs)."""
    scorer = Scorer.from_config(cfg.evaluation, device=device)
    common = dict(images_per_prompt=images_per_prompt, sample_steps=sample_steps, guidance_scale=guidance,
                  progress=progress, sample_batch_size=SAMPLE_BATCH, subjects_per_batch=subjects_per_batch)
    if not budgets:
        return [MiniBenchRunner(out, subjects_seed, judge, out / method, cfg, scorer, **common)]
    return [MiniBenchRunner(out, subjects_seed, judge, out / bench_folder_name(method, budget), cfg, scorer,
                            run_root=out / "runs" / method, budget=budget, **common) for budget in sorted(budgets, reverse=True)]


def _run_methods(out: Path, configs: dict[str, RunConfig], subjects: list[MiniBenchSubject], subjects_seed: int,
                 images_per_prompt: int, sample_steps: int, guidance: float, device: str, progress: bool,
                 budgets: dict[str, list[int] | None],
                 threads: int | None = None, subjects_per_batch: int | str | None = None) -> None:
    """Every method on `subjects` (a worker process's whole job): subject by subject, each finishing every method and
    budget before the next starts, so an interrupted bench leaves complete pairs behind and loses at most one subject's
    work; with K subjects per batch, method by method (a method's subjects train together). Subjects trained K at a
    time whose training failed are named at the end (SubjectsFailed), every other subject and method done."""
    if threads:

        os.environ["OMP_NUM_THREADS"] = str(threads)  # the workers share the cores: no per-run thread search
        torch.set_num_threads(threads)
    judge = AttributeJudge("mini", device=device)
    runners = {method: _runners(out, subjects_seed, judge, method, cfg, images_per_prompt, sample_steps, guidance, device,
                                budgets[method], progress, subjects_per_batch) for method, cfg in configs.items()}
    failures: dict[str, str] = {}
    groups = [subjects] if is_batched(subjects_per_batch) else [[s] for s in subjects]
    for group in tqdm(groups, desc="subjects", disable=not progress or len(groups) < 2):
        for method_runners in runners.values():
            left = group  # a subject that failed to train is not trained again for the method's smaller budgets
            for runner in method_runners:
                try:
                    runner.run(left)
                except SubjectsFailed as exc:
                    failures.update((f"{runner.out_dir.name}/{name}", error) for name, error in exc.failures.items())
                    left = [s for s in left if s.name not in exc.failures]
    if failures:
        raise SubjectsFailed(failures)


PAIRED_METRICS = ("dino", "clip_i", "clip_t", "shape_kept", "colour_kept", "pattern_kept", "identity_kept", "context_ok",
                  "modifier_ok", "prompt_ok")


def paired_by_budget(results: dict[str, dict], methods: list[str], budgets: list[int | None]) -> dict[str, Any]:
    """Per budget: each method minus dreambooth (or the first method) at the same budget, subject by subject.
    `results`: bench folder name -> its results.json."""
    baseline = bench_baseline(methods)
    paired = {}
    for budget in budgets:
        per_subject = {m: results[bench_folder_name(m, budget)]["per_subject"] for m in methods}
        present = [k for k in PAIRED_METRICS if k in results[bench_folder_name(baseline, budget)]["overall"]]
        paired[str(budget or "final")] = paired_differences(per_subject, tuple(present), baseline=baseline)
    return {"baseline": baseline, "budgets": paired}


def paired_by_seconds(results: dict[str, dict], methods: list[str], budgets: list[int],
                      baseline_budgets: list[int] | None = None) -> dict[str, Any]:
    """Per budget: each method minus dreambooth at the same seconds (dreambooth interpolated on its budget curve, over
    `baseline_budgets` where it ran more budgets than the others; CPU seconds where every run trained alone on the
    CPU, else wall seconds: each table's "clock")."""
    baseline = bench_baseline(methods)
    base_rows = [results[bench_folder_name(baseline, b)]["per_subject"] for b in baseline_budgets or budgets]
    tables = {}
    for budget in budgets:
        present = [k for k in PAIRED_METRICS if k in results[bench_folder_name(baseline, budget)]["overall"]]
        tables[str(budget)] = {m: paired_at_equal_seconds(results[bench_folder_name(m, budget)]["per_subject"], base_rows,
                                                          tuple(present), m, baseline)
                               for m in methods if m != baseline}
    return {"baseline": baseline, "budgets": tables}


def default_jobs(num_subjects: int, device: str) -> int:
    return 1 if device != "cpu" else max(1, min(num_subjects, os.cpu_count() or 1))


def subject_shares(subjects: list[MiniBenchSubject], jobs: int, subjects_per_batch: int | str | None) -> list[list[MiniBenchSubject]]:
    """Each worker's subjects: every jobs-th subject, or with K subjects per batch every jobs-th batch of K (auto: by
    subject; the memory estimate sizes the batches inside each worker)."""
    k = subjects_per_batch if isinstance(subjects_per_batch, int) and subjects_per_batch > 1 else 1
    batches = [subjects[i:i + k] for i in range(0, len(subjects), k)]
    return [[s for batch in batches[i::jobs] for s in batch] for i in range(min(jobs, len(batches)))]


def parse_budgets(text: str | None, flag: str = "--budgets") -> list[int] | None:
    if not text:
        return None
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated step counts, e.g. 200,400,800; got {text!r}") from None
    if not budgets or budgets[0] < 1:
        raise ConfigError(f"{flag} must be positive step counts, got {text!r}")
    return budgets


def run_mini_bench(out: Path, methods: list[str], *, quick: bool = False, subjects_seed: int = 0,
                   num_subjects: int | None = None, images_per_prompt: int | None = None, sample_steps: int | None = None,
                   config_file: str | None = None, overrides: dict[str, Any] | None = None, device: str = "cpu",
                   progress: bool = True, jobs: int | None = None, budgets: list[int] | None = None,
                   subjects_per_batch: int | str | None = None, adapter: str = "full",
                   baseline_budgets: list[int] | None = None) -> Path:
    """Run (or finish) every method on the same subjects, then merge them into out/report.html.
    `budgets`: train each subject once to the largest, evaluate the weights kept at each; `baseline_budgets`: more
    budgets for the baseline (dreambooth) alone, for the comparison at equal seconds.
    `subjects_per_batch`: K (or "auto"): train each method's subjects K at a time (train_many); None or 1: one by one.
    `adapter`: "full" (the whole denoiser) or "lora" (the LoRA suite, each method's minibench_lora)."""
    suite = SUITES["quick" if quick else "full"]
    overrides = dict(overrides or {})
    method_budgets = budgets_per_method(methods, budgets, baseline_budgets)
    configs = {m: method_config(m, config_file, {**overrides, **budget_settings(method_budgets[m])}, adapter)
               for m in methods}  # bad settings fail first
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if is_batched(subjects_per_batch):
        for cfg in configs.values():  # settings train_many refuses, named before any work
            check_many_settings(cfg)
    out = Path(out)
    with run_lock(out):  # one bench per folder: a second would train the same subjects (the web app's queue sees it too)
        return _run_locked(out, configs, method_budgets, subjects_seed=subjects_seed, num_subjects=num_subjects or suite["subjects"],
                           images_per_prompt=images_per_prompt or suite["images_per_prompt"], sample_steps=sample_steps,
                           overrides=overrides, device=device, progress=progress, jobs=jobs, budgets=budgets,
                           subjects_per_batch=subjects_per_batch)


def _run_locked(out: Path, configs: dict[str, RunConfig], method_budgets: dict[str, list[int] | None], *,
                subjects_seed: int, num_subjects: int, images_per_prompt: int, sample_steps: int | None,
                overrides: dict[str, Any], device: str, progress: bool, jobs: int | None, budgets: list[int] | None,
                subjects_per_batch: int | str | None) -> Path:
    """run_mini_bench's work, its settings checked and its folder held."""
    subjects = prepare_subjects(out, num_subjects, subjects_seed)
    model_steps, guidance = SAMPLERS[bench_model(overrides)[1]]
    sample_steps = sample_steps or model_steps
    shares = subject_shares(subjects, jobs or default_jobs(len(subjects), device), subjects_per_batch)
    jobs = len(shares)
    judge = AttributeJudge("mini", device=device)
    for method, cfg in configs.items():  # refuse a folder made with other settings before any work
        for runner in _runners(out, subjects_seed, judge, method, cfg, images_per_prompt, sample_steps, guidance, device,
                               method_budgets[method]):
            runner.check_folder()
    first = next(iter(configs.values()))
    if first.prior.enabled and not first.prior.class_dir:
        prepare_class_images(out, first, subjects, device, progress)
    work = dict(out=out, configs=configs, subjects_seed=subjects_seed, images_per_prompt=images_per_prompt,
                sample_steps=sample_steps, guidance=guidance, device=device, budgets=method_budgets,
                subjects_per_batch=subjects_per_batch)
    if jobs == 1:
        _run_methods(subjects=subjects, progress=progress, **work)
    else:

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            # Worker 0 shows its progress bars; the others would only interleave with them.
            futures = [pool.submit(_run_methods, subjects=share, progress=progress and i == 0, threads=threads, **work)
                       for i, share in enumerate(shares)]
            failures: dict[str, str] = {}
            for future in futures:
                try:
                    future.result()
                except SubjectsFailed as exc:  # every worker finishes its share first
                    failures.update(exc.failures)
            if failures:
                raise SubjectsFailed(failures)
    budget_list: list[int | None] = list(budgets) if budgets else [None]  # every method's; the baseline may have more
    every_budget = sorted({b for bs in method_budgets.values() for b in bs}) if budgets else [None]
    folders = [out / bench_folder_name(m, b) for b in every_budget for m in configs if b in (method_budgets[m] or [None])]
    summarized = summarize_folders(folders)
    results = {folder.name: result for folder, _, result in summarized}
    summary = {name: {**result["overall"], "failed": len(result["failed"])} for name, result in results.items()}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    with (out / "results.csv").open("w", newline="") as f:  # one row per method (and budget): means and spread over subjects
        # every row's keys: a method whose every subject diverged has no means
        columns = dict.fromkeys(k for row in summary.values() for k in row if k != "scope")
        writer = csv.DictWriter(f, fieldnames=["method", *columns])
        writer.writeheader()
        writer.writerows({"method": name, **{k: v for k, v in row.items() if k != "scope"}} for name, row in summary.items())
    paired = paired_by_budget(results, list(configs), budget_list)
    baseline_curve = method_budgets[paired["baseline"]]
    if baseline_curve and len(baseline_curve) > 1:  # equal compute, not only equal steps
        paired["equal_seconds"] = paired_by_seconds(results, list(configs), list(budgets), baseline_curve)
    (out / PAIRED_NAME).write_text(json.dumps(paired, indent=2))
    return write_bench_report(out, summarized, "rewardbooth MiniBench results",
                              extra_sections=mini_report_sections(out, results, paired, method_budgets))


def mini_report_sections(out: Path, results: dict[str, dict], paired: dict[str, Any],
                         budgets: dict[str, list[int] | None]) -> list:
    """The paired table (with intervals and verdicts) per budget, and the budget and compute frontier plots (each
    method's curve over its own budgets)."""
    sections = []
    for budget, table in paired["budgets"].items():
        sections.append(ReportSection(
            f"Paired with {paired['baseline']}" + (f" at {budget} steps" if budget != "final" else ""),
            f"method minus {paired['baseline']} on the same subjects; {table['interval']}; the verdict follows the "
            "interval (better: all above 0, worse: all below 0)", table=paired_rows(table)))
    if all(budgets.values()):
        sections += frontier_sections(out, {m: {b: results[bench_folder_name(m, b)]["overall"] for b in bs}
                                            for m, bs in budgets.items()})
    for budget, tables in paired.get("equal_seconds", {}).get("budgets", {}).items():
        sections += [equal_seconds_section(f"{method} at {budget} steps", table) for method, table in tables.items()]
    return sections
