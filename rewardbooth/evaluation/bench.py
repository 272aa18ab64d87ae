"""DreamBench runner: per subject train (or reuse), generate 25 prompts x K, score; merge; report.

Layout of a bench folder (one method):
    bench.json                    method, settings, judges
    subjects/<name>/run/          the training run (resumed if interrupted)
    subjects/<name>/images/       generated PNGs + metadata.jsonl
    subjects/<name>/scores.json   per-image scores; its presence marks the subject finished
    subjects/<name>/failed.json   instead: its training diverged (the error); counted as failed, never scored
    subjects/<name>/seconds.json  seconds of set-up and training behind the scored weights, "clock" saying which:
                                  CPU seconds for a run trained alone on the CPU (a pause or other jobs on its cores
                                  are not its compute), else wall seconds (and, for subjects trained K at a time, how
                                  they were measured)
    subjects/<name>/run.batch.json  with --subjects-per-batch: the batch the run trained in and its clock
    results.csv, results.json, report.html   written by merge
Shards (--shard i/N) take every N-th subject, so processes or machines sharing the folder never
touch the same subject; `merge` combines whatever is finished.

With --subjects-per-batch K the subjects still to train are trained K at a time in one process
(training/many.py: their denoiser calls stacked, each subject's run its solo run within float32 rounding), then
evaluated one by one exactly as without it. A subject of a batch is charged the batch's wall seconds divided by
its subjects (seconds.json says so; wall, as its subjects share one process's CPU time); a subject that fails to
train is named and the others are evaluated.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from statistics import pstdev
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from rewardbooth.config import RunConfig
from rewardbooth.data.dreambench import DreamBench, DreamBenchSubject, load_dreambench
from rewardbooth.data.images import load_image, load_image_folder, save_image_grid
from rewardbooth.errors import ConfigError, OutputExistsError, RewardboothError, Stopped, TrainingDiverged
from rewardbooth.evaluation.figures import plot_bars, plot_frontier, plot_tradeoff
from rewardbooth.evaluation.metrics import METRICS, ImageScore, Scorer, read_generated_folder, summarize
from rewardbooth.evaluation.paired import combined_clock, paired_at_equal_seconds, paired_differences, paired_rows, seconds_words
from rewardbooth.evaluation.report import ReportSection, write_report
from rewardbooth.provenance import code_version, warn_other_code
from rewardbooth.rewards import Subject
from rewardbooth.sampling import SampleSettings, generate, save_generated
from rewardbooth.training.finished_run import load_run_pipeline
from rewardbooth.training.loop import train
from rewardbooth.training.many import ManyEngine, SubjectOutcome, SubjectRun, check_subjects, train_many
from rewardbooth.training.run_dir import CONFIG_NAME, LOCK_NAME, RunFolder, prepare_run_dir, seconds_at

BENCH_INFO = "bench.json"
FAILED_NAME = "failed.json"
SECONDS_NAME = "seconds.json"
PAIRED_NAME = "paired.json"  # beside a report comparing bench folders
BATCH_SUFFIX = ".batch.json"  # beside a run trained K at a time: its batch and the batch's clock
BATCH_HOW = ("the wall seconds of the batch this subject trained in (its subjects' set-ups one after another, then their "
             "steps in lockstep, one stacked denoiser call per step), to this step, divided by its subjects_per_batch")


class SubjectsFailed(RewardboothError):
    """Subjects trained K at a time whose training failed (not diverged): named, while the others were evaluated."""

    exit_code = 1

    def __init__(self, failures: dict[str, str]):
        super().__init__(failures)  # the mapping alone: pickled across bench worker processes and rebuilt from it
        self.failures = dict(failures)

    def __str__(self) -> str:
        named = "; ".join(f"{name}: {error}" for name, error in self.failures.items())
        return (f"{len(self.failures)} subject(s) failed to train ({named}); the others are finished: run the same command "
                "again to retry these, or `rewardbooth bench --merge` the folders for a report without them")


def batch_record_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + BATCH_SUFFIX)


def _own_clock(run_dir: Path) -> float | None:
    """The run's own wall seconds at its last logged step (tells a batch record from a run trained again since)."""
    records = [r for r in RunFolder(run_dir).read_metrics() if "wall_seconds" in r and not r.get("validation")]
    return float(max(records, key=lambda r: r["step"])["wall_seconds"]) if records else None


def write_batch_records(runs: list[SubjectRun], outcomes: list[SubjectOutcome], wall: float, requested: int | str | None) -> None:
    """After a batch trained together: beside each finished run, the batch (names), its size, and per logged step the
    batch's wall seconds to that step divided by its size. The batch's clock at a step is the largest of its runs'
    own clocks there: the first subject's clock starts with the batch and runs through every set-up and the lockstep
    steps (the others start at their own set-ups)."""
    members = [(run, outcome) for run, outcome in zip(runs, outcomes) if not outcome.deferred]
    size = len(members)
    steps = sorted({r["step"] for run, _ in members for r in RunFolder(run.run_dir).read_metrics()
                    if "wall_seconds" in r and not r.get("validation")})
    clock = {}
    for step in steps:
        times = [t for run, _ in members if (t := seconds_at(run.run_dir, step)) is not None]
        if times:
            clock[str(step)] = round(max(times) / size, 3)
    for run, outcome in members:
        if outcome.ok:
            record = {"subjects_per_batch": size, "requested": requested, "batch": [r.name for r, _ in members], "how": BATCH_HOW,
                      "batch_wall_seconds": round(wall, 3), "own_clock": _own_clock(run.run_dir), "seconds": clock}
            batch_record_path(run.run_dir).write_text(json.dumps(record, indent=1))


def batch_seconds(run_dir: Path, step: int) -> dict[str, Any] | None:
    """seconds.json's content for a run trained in a batch (None: it trained alone, or has trained again since)."""
    path = batch_record_path(run_dir)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("own_clock") != _own_clock(run_dir):
        return None
    after = sorted(int(s) for s in record["seconds"] if int(s) >= step)
    seconds = record["seconds"][str(after[0])] if after else None
    return {"seconds": seconds, "clock": "wall", "subjects_per_batch": record["subjects_per_batch"], "how": record["how"]}


def solo_seconds(run_dir: Path, step: int) -> dict[str, Any]:
    """seconds.json's content for a run trained alone: its CPU seconds where the loop measured them (on the CPU, in
    one process), with its wall seconds beside them; else its wall seconds."""
    wall, cpu = seconds_at(run_dir, step), seconds_at(run_dir, step, clock="cpu")
    return {"seconds": wall, "clock": "wall"} if cpu is None else {"seconds": cpu, "clock": "cpu", "wall_seconds": wall}


class _RecordingEngine(ManyEngine):
    """train_many's engine, writing each batch's record as soon as the batch is done (an interrupted bench keeps them)."""

    def __init__(self, progress: bool, requested: int | str | None):
        super().__init__(progress)
        self.requested = requested

    def run_group(self, runs, resume):
        started = time.perf_counter()
        outcomes = super().run_group(runs, resume)
        write_batch_records(list(runs), outcomes, time.perf_counter() - started, self.requested)
        return outcomes


def is_batched(subjects_per_batch: int | str | None) -> bool:
    """K > 1 or auto: subjects train K at a time (None and 1: one by one, as they always did)."""
    return subjects_per_batch == "auto" or (isinstance(subjects_per_batch, int) and subjects_per_batch > 1)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not (count > 0 and 0 <= index < count):
        raise ConfigError(f"--shard {text}: need 0 <= i < N")
    return index, count


def shard_subjects(subjects: list[DreamBenchSubject], index: int, count: int) -> list[DreamBenchSubject]:
    return sorted(subjects, key=lambda s: s.name)[index::count]


def subject_config(base: RunConfig, subject: DreamBenchSubject) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.data.instance_dir = str(subject.image_dir)
    cfg.data.class_noun = subject.class_noun
    return cfg


class BenchRunner:
    def __init__(self, bench: DreamBench, out_dir: Path, cfg: RunConfig, scorer: Scorer, images_per_prompt: int = 4,
                 sample_steps: int = 50, guidance_scale: float = 7.5, progress: bool = True, sample_batch_size: int = 4,
                 subjects_per_batch: int | str | None = None):
        self.bench, self.out_dir, self.cfg, self.scorer = bench, Path(out_dir), cfg, scorer
        self.images_per_prompt, self.sample_steps, self.guidance_scale = images_per_prompt, sample_steps, guidance_scale
        self.progress, self.sample_batch_size = progress, sample_batch_size
        self.subjects_per_batch = subjects_per_batch  # K > 1 or "auto": train K at a time (train_many), then evaluate

    def info(self) -> dict[str, Any]:
        return {"method": self.cfg.train.method, "model": self.cfg.model.name, "dreambench": str(self.bench.root),
                "images_per_prompt": self.images_per_prompt, "sample_steps": self.sample_steps,
                "guidance_scale": self.guidance_scale, "judges": self.scorer.checkpoints(), "config": self.cfg.to_dict()}

    def check_folder(self) -> None:
        """A bench folder is reused only for the same method and settings (so reruns skip work)."""
        info_path = self.out_dir / BENCH_INFO
        if info_path.is_file():
            saved = json.loads(info_path.read_text())
            mine = json.loads(json.dumps(self.info()))
            changed = [k for k in mine if saved.get(k) != mine[k]]
            if changed:
                raise OutputExistsError(f"bench folder {self.out_dir} was made with other settings ({', '.join(changed)}); use another --output")
            warn_other_code(saved.get("code"), f"bench folder {self.out_dir} was started by")
        elif self.out_dir.is_dir() and any(p.name != LOCK_NAME for p in self.out_dir.iterdir()):
            raise OutputExistsError(f"output folder {self.out_dir} is not empty and is not a bench folder; use another --output")
        else:  # written once: parallel workers sharing the folder only read it
            self.out_dir.mkdir(parents=True, exist_ok=True)
            info_path.write_text(json.dumps({**self.info(), "code": code_version()}, indent=2))

    def subject_dir(self, subject: DreamBenchSubject) -> Path:
        return self.out_dir / "subjects" / subject.name

    def run(self, subjects: list[DreamBenchSubject]) -> list[str]:
        """Process subjects; returns the names actually (re)computed."""
        self.check_folder()
        if is_batched(self.subjects_per_batch):
            return self._run_batched(subjects)
        done = []
        for subject in tqdm(subjects, desc="subjects", disable=not self.progress or len(subjects) < 2):
            if self.is_done(subject):
                continue
            self.run_subject(subject)
            done.append(subject.name)
        return done

    def _run_batched(self, subjects: list[DreamBenchSubject]) -> list[str]:
        """Train the unfinished runs K at a time, then evaluate every subject as `run` does; a subject whose training
        failed is named at the end (SubjectsFailed) and the others are evaluated."""
        todo = [s for s in subjects if not self.is_done(s)]
        failures = self.train_batches(todo)
        done = []
        for subject in tqdm(todo, desc="subjects", disable=not self.progress):
            if subject.name in failures or self.is_done(subject):  # failed, or diverged (failed.json)
                continue
            self.run_subject(subject)
            done.append(subject.name)
        if failures:
            raise SubjectsFailed(failures)
        return done

    def train_batches(self, subjects: list[DreamBenchSubject]) -> dict[str, str]:
        """Train the subjects whose runs are not finished through train_many, subjects_per_batch at a time (runs to
        resume in batches of their own, before fresh ones). A diverged run gets its failed.json, as alone; returns
        why each other failed subject has no run."""
        pending = [s for s in subjects if not RunFolder(self.run_dir(s)).is_finished()]
        failures: dict[str, str] = {}
        for resume in (True, False):
            group = [s for s in pending if (self.run_dir(s) / CONFIG_NAME).is_file() == resume]
            if not group:
                continue
            for subject in group:
                prepare_run_dir(self.run_dir(subject), resume=resume, overwrite=False)
            runs = [SubjectRun(s.name, self.subject_config(s), self.run_dir(s)) for s in group]
            ready, refused = check_subjects(runs)  # bad input: named, the others train
            engine = _RecordingEngine(self.progress, self.subjects_per_batch)
            outcomes = refused + train_many(ready, resume=resume, progress=self.progress, subjects_per_batch=self.subjects_per_batch,
                                            check_inputs=False, engine=engine)
            stopped = next((o.exception for o in outcomes if isinstance(o.exception, Stopped)), None)
            for outcome, subject in ((o, next(s for s in group if s.name == o.name)) for o in outcomes):
                if isinstance(outcome.exception, TrainingDiverged):
                    self._write_failed(subject, outcome.exception)
                elif not outcome.ok and not isinstance(outcome.exception, Stopped) and outcome.error != "not started (stopped)":
                    failures[subject.name] = outcome.error
            if stopped is not None or engine.stop_requested:
                raise stopped if stopped is not None else Stopped(0)
        return failures

    def _write_failed(self, subject: DreamBenchSubject, exc: BaseException) -> None:
        folder = self.subject_dir(subject)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FAILED_NAME).write_text(json.dumps({"subject": subject.name, "error": str(exc)}, indent=1))

    def is_done(self, subject: DreamBenchSubject) -> bool:
        """Scored, or failed: a diverged run would diverge again at the same step (same settings, same seed)."""
        return any((self.subject_dir(subject) / name).is_file() for name in ("scores.json", FAILED_NAME))

    def run_subject(self, subject: DreamBenchSubject) -> None:
        folder = self.subject_dir(subject)
        run_dir = self.run_dir(subject)
        if not RunFolder(run_dir).is_finished():
            resume = (run_dir / "config.yaml").is_file()
            prepare_run_dir(run_dir, resume=resume, overwrite=False)
            try:
                train(self.subject_config(subject), run_dir, resume=resume, progress=self.progress)
            except TrainingDiverged as exc:
                self._write_failed(subject, exc)
                return
        folder.mkdir(parents=True, exist_ok=True)  # the compute behind the evaluated weights, for equal-seconds comparisons
        # (a run trained in a batch: the batch's seconds divided by its subjects, and how they were measured)
        seconds = batch_seconds(run_dir, self.evaluated_step()) or solo_seconds(run_dir, self.evaluated_step())
        (folder / SECONDS_NAME).write_text(json.dumps(seconds))
        _, pipe = load_run_pipeline(run_dir, device=self.scorer.device, weights_dir=self.weights_dir(run_dir))
        prompts = subject.prompts(self.cfg.data.identifier)
        settings = SampleSettings(steps=self.sample_steps, guidance_scale=self.guidance_scale, seed=self.cfg.train.seed,
                                  resolution=self.cfg.data.resolution, batch_size=self.sample_batch_size)
        images_dir = folder / "images"
        if images_dir.exists():  # a half-written folder from an interrupted run: regenerate it

            shutil.rmtree(images_dir)
        images = generate(pipe, prompts, self.images_per_prompt, settings, progress=self.progress, description=subject.name)
        files = save_generated(images_dir, prompts, images, settings.seed)
        flat = [im for row in images for im in row]
        references = load_image_folder(subject.image_dir)
        scores = self.scorer.score(flat, [p for p in prompts for _ in range(self.images_per_prompt)], [f.name for f in files],
                                   Subject(subject.name, references, self.cfg.data.identifier, subject.class_noun))
        self.add_scores(subject, flat, scores)
        (folder / "scores.json").write_text(json.dumps([asdict(s) for s in scores], indent=1))

    def subject_config(self, subject: Any) -> RunConfig:
        return subject_config(self.cfg, subject)

    def run_dir(self, subject: Any) -> Path:
        """Where the subject's training run lives (suites that evaluate one run at several budgets share it)."""
        return self.subject_dir(subject) / "run"

    def weights_dir(self, run_dir: Path) -> Path | None:
        """Which of the run's weights to evaluate; None: its result."""
        return None

    def evaluated_step(self) -> int:
        """The training step of the evaluated weights (a budget's, else the run's last)."""
        return self.cfg.train.steps

    def add_scores(self, subject: Any, images: list[Image.Image], scores: list[ImageScore]) -> None:
        """Suites with more judges add their per-image numbers to `scores[i].extra` here."""


def _seconds_record(subject_dir: Path) -> dict[str, Any] | None:
    path = Path(subject_dir) / SECONDS_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def subjects_per_batch_of(subject_dir: Path) -> int:
    """How many subjects trained together behind a subject's seconds (1: alone, or not recorded)."""
    return int((_seconds_record(subject_dir) or {}).get("subjects_per_batch", 1))


def seconds_clock_of(subject_dir: Path) -> str | None:
    """The clock of a subject's seconds: "cpu" or "wall" (folders from before clocks were recorded); None: not recorded."""
    record = _seconds_record(subject_dir)
    return None if record is None or record.get("seconds") is None else record.get("clock", "wall")


def warn_mixed_clocks(bench_dirs: list[Path]) -> None:
    """Subjects trained alone and K at a time, or timed on CPU and wall clocks, in the folders compared: their seconds
    are measured differently."""
    timed = [d for bench_dir in bench_dirs for d in (Path(bench_dir) / "subjects").glob("*/") if (d / SECONDS_NAME).is_file()]
    sizes = sorted({subjects_per_batch_of(d) for d in timed})
    if len(sizes) > 1:
        warnings.warn(f"these bench folders mix subjects trained {' and '.join(map(str, sizes))} at a time (seconds.json's "
                      "subjects_per_batch): a batch's seconds are its wall time divided by its subjects, so comparisons at "
                      "equal seconds also compare how the subjects were batched; bench every method with the same "
                      "--subjects-per-batch", stacklevel=2)
    clocks = sorted({c for d in timed if (c := seconds_clock_of(d)) is not None})
    if len(clocks) > 1:
        warnings.warn(f"these bench folders mix seconds on the {' and '.join(clocks)} clocks (seconds.json's clock): CPU "
                      "seconds are a run's own compute, wall seconds also count pauses and other jobs on its cores, so "
                      "comparisons at equal seconds across them do not compare equal compute; bench every method the "
                      "same way (on the same device, with the same --subjects-per-batch)", stacklevel=2)


def subject_seconds(subject_dir: Path) -> float:
    seconds = (_seconds_record(subject_dir) or {}).get("seconds")
    return float("nan") if seconds is None else float(seconds)


def load_failures(bench_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((Path(bench_dir) / "subjects").glob(f"*/{FAILED_NAME}"))]


def load_scores(bench_dir: Path) -> list[ImageScore]:
    scores = []
    for path in sorted((Path(bench_dir) / "subjects").glob("*/scores.json")):
        scores += [ImageScore(**row) for row in json.loads(path.read_text())]
    return scores


def merge(bench_dirs: list[Path], report_dir: Path | None = None, curve_dirs: list[Path] | None = None) -> Path:
    """Write results.csv / results.json for each bench folder and one report comparing them; with two folders or
    more, paired.json beside the report: each folder minus the first on the subjects they share. `curve_dirs`: one
    method's bench folders at several budgets (DreamBooth at its best, say); each merged folder is also paired with
    that method at its own seconds (paired.json's "equal_seconds", the report's tables)."""
    bench_dirs = [Path(d) for d in bench_dirs]
    report_dir = Path(report_dir) if report_dir else bench_dirs[0]
    summarized = summarize_folders(bench_dirs)
    paired = merged_paired(summarized) if len(summarized) > 1 else {}
    curve = summarize_folders([Path(d) for d in curve_dirs]) if curve_dirs else []
    if curve:  # checked and paired before any plot is drawn
        warn_mixed_clocks([*bench_dirs, *curve_dirs])  # across the two groups, as within each
        paired["equal_seconds"] = paired_with_curve(summarized, curve)
    sections = frontier_sections(report_dir, merged_curves(summarized, curve))
    sections += [equal_seconds_section(label, table) for label, table in paired.get("equal_seconds", {}).items()]
    report = write_bench_report(report_dir, summarized, extra_sections=sections)
    if paired:
        (report_dir / PAIRED_NAME).write_text(json.dumps(paired, indent=2))
    return report


def folder_budget(folder: Path, info: dict) -> int | None:
    """A bench folder's training budget: bench.json's, else its name's `@STEPS` (a mini bench's `dpg@400`)."""
    if info.get("budget") is not None:
        return int(info["budget"])
    steps = folder.name.rpartition("@")[2]
    return int(steps) if "@" in folder.name and steps.isdigit() else None


def folder_method(folder: Path, info: dict) -> str:
    """What a bench folder benched: a mini bench's folder name before `@STEPS` (a variant such as `dpg-select`, whose
    bench.json names its base method), else bench.json's method."""
    name, at, steps = folder.name.rpartition("@")
    return name if at and steps.isdigit() and name else info["method"]


def merged_curves(methods: list[tuple[Path, dict, dict]], curve: list[tuple[Path, dict, dict]]) -> dict[str, dict[int, dict]]:
    """The merged folders and the `--curve` folders as frontier curves: per method, its overall means at each budget.
    The curve's method is named as in its pairing (parent/method); a method benched twice at one budget, by its
    folder's parent too."""
    keyed = [(d, folder_method(d, info), folder_budget(d, info), r["overall"]) for d, info, r in methods]
    seen = [(method, budget) for _, method, budget, _ in keyed]
    curves: dict[str, dict[int, dict]] = {}
    for d, method, budget, overall in keyed:
        if budget is not None:
            name = f"{d.parent.name}/{method}" if seen.count((method, budget)) > 1 else method
            curves.setdefault(name, {})[budget] = overall
    for d, info, r in curve:
        budget = folder_budget(d, info)
        if budget is not None:
            curves.setdefault(curve_name(curve), {})[budget] = r["overall"]
    return curves


def frontier_sections(report_dir: Path, curves: dict[str, dict[int, dict]]) -> list[ReportSection]:
    """The budget frontier (identity_kept against prompt_ok) and the compute frontier (each against seconds per
    subject): one line per method through its means at each budget, labelled with the steps. None unless some method
    has two budgets or more and every point has both metrics (the seconds plots: where every point has seconds)."""
    points = [overall for budgets in curves.values() for overall in budgets.values()]
    if not any(len(budgets) > 1 for budgets in curves.values()) or not all(
            {"identity_kept", "prompt_ok"} <= set(overall) for overall in points):
        return []
    assets = report_dir / "report_assets"
    ordered = {m: sorted(budgets.items()) for m, budgets in curves.items()}
    lines = {m: [(b, o["prompt_ok"], o["identity_kept"]) for b, o in budgets] for m, budgets in ordered.items()}
    path = plot_frontier(lines, assets / "frontier.png", "prompt_ok (text alignment)", "identity_kept (subject fidelity)")
    sections = [ReportSection("Budget frontier", "mean over subjects at each training budget (steps, labelled): better "
                              "means up at the same budget and the same prompt_ok",
                              images=[(str(path.relative_to(report_dir)), "identity_kept vs prompt_ok per method across budgets")])]
    if all(isinstance(o.get("seconds"), (int, float)) for o in points):
        seconds = seconds_words(combined_clock(points))
        images = []
        for metric in ("identity_kept", "prompt_ok"):
            lines = {m: [(b, o["seconds"], o[metric]) for b, o in budgets] for m, budgets in ordered.items()}
            chart = plot_frontier(lines, assets / f"seconds_{metric}.png", f"{seconds} per subject "
                                  "(set-up + training + validation)", metric)
            images.append((str(chart.relative_to(report_dir)), f"{metric} vs seconds per method across budgets"))
        sections.append(ReportSection("Compute frontier", f"mean over subjects at each budget (steps, labelled) against "
                                      f"the {seconds} spent to get there: better means up at the same seconds", images=images))
    return sections


def equal_seconds_title(what: str, table: dict[str, Any]) -> str:
    return f"{what} against {table['baseline']} at the same {seconds_words(table.get('clock'))}"


def equal_seconds_section(what: str, table: dict[str, Any]) -> ReportSection:
    """The report's table of one equal-seconds pairing (`what`: the method and budget paired)."""
    return ReportSection(equal_seconds_title(what, table), f"{table['how']}; {table['interval']}; subjects outside "
                         f"{table['baseline']}'s measured seconds (left out): {table['outside']}", table=paired_rows(table))


def curve_name(curve: list[tuple[Path, dict, dict]]) -> str:
    """The `--curve` method's name in pairings and plots: parent/method (DreamBooth at its best benched apart), the
    method named by its folders as for merged folders (a variant's bench.json names its base method)."""
    folder, info, _ = curve[0]
    method = folder_method(folder, info)
    return f"{folder.parent.name}/{method}" if folder.parent.name else method


def paired_with_curve(methods: list[tuple[Path, dict, dict]], curve: list[tuple[Path, dict, dict]]) -> dict[str, Any]:
    """Each folder minus the curve's method at the same seconds, interpolated between the curve's budgets (never
    extrapolated: a subject outside the curve's seconds is left out and counted)."""
    curve_methods = {folder_method(d, info) for d, info, _ in curve}
    if len(curve_methods) != 1 or len(curve) < 2:
        raise ConfigError(f"--curve takes one method's bench folders at two budgets or more, got {len(curve)} folder(s) of "
                          f"{', '.join(sorted(curve_methods))}")
    name = curve_name(curve)
    metrics = scored_metrics(curve[0][2]["overall"])
    rows = [r["per_subject"] for _, _, r in curve]
    labels = folder_labels(methods)
    return {labels[d]: paired_at_equal_seconds(r["per_subject"], rows, metrics, labels[d], name) for d, _, r in methods}


def folder_labels(methods: list[tuple[Path, dict, dict]]) -> dict[Path, str]:
    """Each bench folder's label: its method, else (methods repeat: variants, budgets) its folder name, else (names
    repeat too: the same method benched twice) parent/name."""
    names = [info["method"] for _, info, _ in methods]
    folders = [d.name for d, _, _ in methods]
    return {d: info["method"] if names.count(info["method"]) == 1 else d.name if folders.count(d.name) == 1
            else f"{d.parent.name}/{d.name}" for d, info, _ in methods}


def merged_paired(methods: list[tuple[Path, dict, dict]]) -> dict[str, Any]:
    """Each merged folder minus the first, subject by subject, on every metric the first reports."""
    labels = folder_labels(methods)
    return paired_differences({labels[d]: r["per_subject"] for d, _, r in methods}, scored_metrics(methods[0][2]["overall"]))


def overall_metrics(overall: dict) -> list[str]:
    """The metric keys of a results.json's overall row (not its bookkeeping, not the spreads over subjects)."""
    return [k for k in overall if k not in ("scope", "images", "seconds_clock") and not k.endswith("_std_over_subjects")]


def scored_metrics(overall: dict) -> tuple[str, ...]:
    """What a pairing compares: the overall row's metrics but seconds (a cost, not a score)."""
    return tuple(k for k in overall_metrics(overall) if k != "seconds")


def summarize_folders(bench_dirs: list[Path]) -> list[tuple[Path, dict, dict]]:
    """results.csv / results.json for each bench folder; returns (folder, bench.json, results) per folder."""
    warn_mixed_clocks(bench_dirs)
    methods = []
    for bench_dir in bench_dirs:
        if not (bench_dir / BENCH_INFO).is_file():
            raise ConfigError(f"{bench_dir} is not a bench folder (no {BENCH_INFO})")
        info = json.loads((bench_dir / BENCH_INFO).read_text())
        scores, failed = load_scores(bench_dir), load_failures(bench_dir)
        if not scores and not failed:
            raise ConfigError(f"{bench_dir} has no finished subjects yet")
        per_subject = summarize(scores, "subject")
        for row in per_subject:  # seconds of set-up and training behind the scored weights (NaN: not recorded)
            row["seconds"] = subject_seconds(bench_dir / "subjects" / row["subject"])
        overall = summarize(scores)[0] if scores else {"scope": "overall", "images": 0}
        timed = [row["seconds"] for row in per_subject if not math.isnan(row["seconds"])]
        overall["seconds"] = sum(timed) / len(timed) if timed else float("nan")
        for metric in [k for k in overall if k not in ("scope", "images")]:  # spread over subjects: subjects are the sample
            values = [row[metric] for row in per_subject if not math.isnan(row[metric])]
            overall[f"{metric}_std_over_subjects"] = pstdev(values) if len(values) > 1 else 0.0
        for row in per_subject:  # which clock: "cpu", "wall"; overall: "mixed" where the subjects' clocks differ
            row["seconds_clock"] = seconds_clock_of(bench_dir / "subjects" / row["subject"])
        overall["seconds_clock"] = combined_clock(per_subject)
        result = {"method": info["method"], "model": info["model"], "judges": info["judges"], "subjects": len(per_subject),
                  "failed": failed, "overall": overall, "per_subject": per_subject, "per_prompt": summarize(scores, "prompt")}
        (bench_dir / "results.json").write_text(json.dumps(result, indent=2))
        rows = [{k: v for k, v in asdict(s).items() if k != "extra"} | s.extra for s in scores]
        if rows:
            with (bench_dir / "results.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        methods.append((bench_dir, info, result))
    return methods


def write_bench_report(report_dir: Path, methods: list[tuple[Path, dict, dict]], title: str = "rewardbooth DreamBench results",
                       extra_sections: list[ReportSection] | None = None) -> Path:

    assets = report_dir / "report_assets"
    labels = folder_labels(methods)
    table = []
    for d, _, r in methods:
        overall = r["overall"]
        metrics = overall_metrics(overall)
        table.append({"method": labels[d], "folder": str(d), "subjects": r["subjects"], "failed": len(r.get("failed", [])),
                      "images": overall["images"], **{m: f"{overall[m]:.4f} ± {overall[m + '_std_over_subjects']:.4f}" for m in metrics},
                      "seconds_clock": overall.get("seconds_clock")})
    judges = methods[0][2]["judges"]
    text = "mean over all images ± standard deviation over subjects; judges: " + ", ".join(f"{k}={v}" for k, v in judges.items())
    sections = [ReportSection("Overall", text, table=table), *(extra_sections or [])]
    failures = [{"method": labels[d], "subject": f["subject"], "error": f["error"]} for d, _, r in methods for f in r.get("failed", [])]
    if failures:
        sections.insert(1, ReportSection("Failed subjects", "training diverged: no result, not scored (nor in the means above)",
                                         table=failures))
    names = sorted({row["subject"] for _, _, r in methods for row in r["per_subject"]})
    series = {labels[d]: {row["subject"]: row for row in r["per_subject"]} for d, _, r in methods}
    chart_images = []
    present = set(methods[0][2]["overall"])
    for x, y in (("dino", "clip_t"), ("identity_kept", "prompt_ok")):
        if {x, y} <= present:
            points = {m: [(rows[n][x], rows[n][y]) for n in names if n in rows] for m, rows in series.items()}
            path = plot_tradeoff(points, assets / f"tradeoff_{x}_{y}.png", x, y, title="subjects (dots) and mean (star)")
            chart_images.append((str(path.relative_to(report_dir)), f"{x} vs {y}: fidelity vs text alignment"))
    for metric in [*METRICS, *(m for m in ("identity_kept", "prompt_ok") if m in present)] if names else []:
        path = plot_bars(names, {m: [rows[n][metric] if n in rows else float("nan") for n in names] for m, rows in series.items()},
                         assets / f"{metric}.png", title=f"{metric} per subject")
        chart_images.append((str(path.relative_to(report_dir)), metric))
    sections.append(ReportSection("Per subject", "", images=chart_images))
    for bench_dir, info, _ in methods:
        if "references" in info:  # suites that store their own reference images (mini)
            reference_dirs = {name: Path(info["references"]) / name for name in names}
        else:
            dreambench = load_dreambench(Path(info["dreambench"]))  # once per method, not per subject
            reference_dirs = {name: s.image_dir for name, s in dreambench.subjects.items()}
        grids, without_images = [], []
        for name in names:
            subject_dir = bench_dir / "subjects" / name
            if not (subject_dir / "scores.json").is_file():
                continue
            if not (subject_dir / "images").is_dir():  # scored, its images not kept (a result restored from its records)
                without_images.append(name)
                continue
            references = load_image_folder(reference_dirs[name])
            grid = _subject_grid(subject_dir, references, info["images_per_prompt"], assets / labels[bench_dir] / f"{name}.png")
            grids.append((str(grid.relative_to(report_dir)), name))
        text = "first row: references; then one row per prompt"
        if without_images:
            text += f"; scored, images not kept: {', '.join(without_images)}"
        sections.append(ReportSection(f"Samples: {labels[bench_dir]}", text, images=grids))
    tiny = any(info["model"].startswith("tiny") or "tiny" in info["judges"].values() for _, info, _ in methods)
    notice = ("Built-in tiny models with random weights made these numbers: they test the harness, "
              "not personalization quality.") if tiny else None
    return write_report(report_dir, title, sections, notice=notice)


def _subject_grid(subject_dir: Path, references: list[Image.Image], images_per_prompt: int, path: Path) -> Path:
    files, _ = read_generated_folder(subject_dir / "images")
    generated = [load_image(f) for f in files]
    size = generated[0].size
    tiles = [r.resize(size) for r in references]
    tiles += [Image.new("RGB", size, "white")] * (-len(tiles) % images_per_prompt)  # references fill whole rows
    return save_image_grid(tiles + generated, path, cols=images_per_prompt)
