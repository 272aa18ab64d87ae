"""What the web UI does to the runs folder: uploads, runs and benches as separate processes.

Training and benches run as `python -m rewardbooth ...` in their own session, so the page, the
browser or even this server can go away without stopping them; their state is read back from
the run folder (lock, metrics.jsonl, result.json) and a log beside it, never from memory alone.
Training runs and benches take turns: one trains at a time (several models on one GPU run out of
memory, on a CPU they share its cores), the others wait in a queue kept in a file, which a restarted
server carries on.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from rewardbooth.data.images import IMAGE_EXTENSIONS, load_image
from rewardbooth.config import MINIBENCH_SUITES, parse_override
from rewardbooth.errors import ConfigError, ImageFolderError, RewardboothError, TrainingDiverged
from rewardbooth.methods import baseline_method, get_method, load_config, method_names, method_registry
from rewardbooth.mini.assets import MINI_NAME, MODEL_NAMES
from rewardbooth.models.export import KOHYA_WEIGHTS_NAME
from rewardbooth.models.lora import LORA_WEIGHTS_NAME
from rewardbooth.training.preflight import check_training_inputs
from rewardbooth.training.run_dir import CHECKPOINT_DIR, CONFIG_NAME, RunFolder, atomic_write_text
from rewardbooth.training.selection import SELECTION_REWARD

UPLOADS = ".uploads"
LOGS = ".ui-logs"
QUEUE = "queue.json"  # in LOGS: the runs and benches waiting for their turn, in order
REJECTED = "rejected"  # uploads that failed the checks: kept, never trained on
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
MIN_PHOTOS, MAX_PHOTOS = 3, 10
ERROR_OPENING = "rewardbooth: error: "  # how the CLI prints a RewardboothError: one line


class UIError(ConfigError):
    """A request the page made that cannot be done; its message is shown next to the control."""


def check_name(name: str, what: str = "run name") -> str:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise UIError(f"{what} {name!r} must be 1-80 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing anything that resolves outside `root` (.., absolute paths, links)."""
    root = root.resolve()
    target = (root / relative.lstrip("/")).resolve()
    if target != root and root not in target.parents:
        raise PermissionError(f"{relative!r} is outside the runs folder")
    return target


@dataclass
class Job:
    process: subprocess.Popen
    kind: str  # "train" or "bench"


class Workspace:
    """The runs folder and the processes this server started in it."""
    def __init__(self, runs_dir: Path):
        self.root = Path(runs_dir).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.command = [sys.executable, "-m", "rewardbooth"]
        self.queue_lock = threading.RLock()
        self.queue_path = self.root / LOGS / QUEUE
        self.queue: list[dict] = self._read_queue()

    # --- uploads ------------------------------------------------------------------------------
    def new_upload(self) -> str:
        upload = uuid.uuid4().hex[:12]
        (self.root / UPLOADS / upload).mkdir(parents=True)
        return upload

    def upload_dir(self, upload: str) -> Path:
        folder = self.root / UPLOADS / check_name(upload, "upload")
        if not folder.is_dir():
            raise UIError(f"upload {upload!r} does not exist; add the photos again")
        return folder

    def add_photo(self, upload: str, filename: str, data: bytes, min_size: int) -> dict:
        """Keep the file; check it as training will. A bad file is moved aside (never lost) and
        its one-line reason returned for the page to show next to it."""
        folder = self.upload_dir(upload)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(filename).name).lstrip(".") or "photo"
        target = folder / safe
        stem, n = target.stem, 1
        while target.exists() or (folder / REJECTED / target.name).exists():
            target, n = folder / f"{stem}-{n}{target.suffix}", n + 1
        target.write_bytes(data)
        try:
            if target.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ImageFolderError(f"{filename!r} is not a supported image (jpg, jpeg, png, webp)")
            load_image(target, min_size=min_size)
        except ImageFolderError as exc:
            (folder / REJECTED).mkdir(exist_ok=True)
            target.rename(folder / REJECTED / target.name)
            return {"file": filename, "ok": False, "error": " ".join(str(exc).replace(str(target), repr(filename)).split())}
        return {"file": filename, "ok": True, "stored": target.name}

    def photos(self, upload: str) -> list[Path]:
        folder = self.upload_dir(upload)
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    # --- runs ---------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def log_path(self, name: str) -> Path:
        return self.root / LOGS / f"{check_name(name)}.log"

    def _spawn(self, name: str, kind: str, args: list[str]) -> None:
        log = self.log_path(name)
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as out:
            out.write(f"$ rewardbooth {' '.join(args)}\n".encode())
            out.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            # Own session: closing the page (or this server) does not stop the run.
            process = subprocess.Popen([*self.command, *args], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=self.root, env=env, start_new_session=True)
        self.jobs[name] = Job(process, kind)

    # --- the training queue -------------------------------------------------------------------
    def _read_queue(self) -> list[dict]:
        if not self.queue_path.is_file():
            return []
        try:
            queue = json.loads(self.queue_path.read_text())
            if isinstance(queue, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("args"), list)
                                               and e["args"][:1] in (["train"], ["bench"]) for e in queue):
                return queue
        except ValueError:
            pass
        aside = self.queue_path.with_suffix(".unreadable")
        self.queue_path.rename(aside)  # kept for a person to read; the page starts with an empty queue
        print(f"rewardbooth ui: {self.queue_path} is not a queue this version reads; moved to {aside.name}, queue empty",
              file=sys.stderr)
        return []

    def _save_queue(self) -> None:
        self.queue_path.parent.mkdir(exist_ok=True)
        atomic_write_text(self.queue_path, json.dumps(self.queue, indent=1))

    def _enqueue(self, name: str, args: list[str]) -> None:
        with self.queue_lock:
            self.queue.append({"name": name, "args": args})
            self._save_queue()
        self.advance()

    def queued(self, kind: str | None = None) -> list[str]:
        """The queued jobs' names, in order (`kind`: only "train" runs or "bench"es)."""
        return [entry["name"] for entry in self.queue if kind is None or entry["args"][0] == kind]

    def training_now(self) -> bool:
        """Something trains: a run or bench this server started, or a run folder whose lock a live process holds (a
        run a previous server started, or one started from the command line)."""
        if any(job.process.poll() is None for job in self.jobs.values()):
            return True
        return any(RunFolder(p).lock_holder() for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def advance(self) -> str | None:
        """Start the first queued job once nothing trains; returns its name (called on each enqueue and by the server's
        queue thread)."""
        with self.queue_lock:
            if not self.queue or self.training_now():
                return None
            entry = self.queue.pop(0)
            self._save_queue()
            self._spawn(entry["name"], entry["args"][0], entry["args"])
            return entry["name"]

    def start_runs(self, name: str, upload: str, class_noun: str, model: str, methods: list[str], steps: int,
                   settings: dict[str, str]) -> list[str]:
        """One run per method (named NAME, or NAME-METHOD for several), queued in that order; every check before any
        is queued."""
        check_name(name)
        if not methods or any(m not in method_names() for m in methods):
            raise UIError(f"choose one or more methods of {', '.join(method_names())}")
        if not re.match(r"^[A-Za-z][A-Za-z -]{0,40}$", class_noun or ""):
            raise UIError("class noun: one or two plain words, e.g. dog or backpack")
        if not isinstance(steps, int) or not 1 <= steps <= 100_000:
            raise UIError("steps must be a whole number from 1 to 100000")
        photos = self.photos(upload)
        if not MIN_PHOTOS <= len(photos) <= MAX_PHOTOS:
            raise UIError(f"{len(photos)} good photo(s); add {MIN_PHOTOS}-{MAX_PHOTOS} (bad files are listed with their reason)")
        for key, value in settings.items():
            if not re.match(r"^[a-z_]+\.[a-z_0-9]+$", key) or "\n" in str(value):
                raise UIError(f"advanced setting {key!r}: write section.key=value, one per line")
        names = [name] if len(methods) == 1 else [f"{name}-{m}" for m in methods]
        for run in names:
            if self.run_dir(run).exists() or run in self.jobs or run in self.queued():
                raise UIError(f"a run named {run!r} exists already; pick another name")
        folder = self.upload_dir(upload)
        common = {"train.log_every": "1", "train.checkpoint_every": str(max(1, min(100, steps // 4))), **settings}
        for method in methods:  # what `train` checks first, for every run before any starts
            overrides = {"model.name": model, "train.method": method, "data.instance_dir": str(folder),
                         "data.class_noun": class_noun.strip(), "train.steps": steps}
            overrides.update(parse_override(f"{key}={value}") for key, value in common.items())
            try:
                check_training_inputs(load_config(None, overrides))
            except RewardboothError as exc:
                raise UIError(f"{method}: {' '.join(str(exc).split())}") from None
        for run, method in zip(names, methods):
            args = ["train", "--model", model, "--method", method, "--instance-dir", str(folder), "--class-noun", class_noun.strip(),
                    "--steps", str(steps), "--output", str(self.run_dir(run)), "--quiet"]
            for key, value in common.items():
                args += ["--set", f"{key}={value}"]
            self._enqueue(run, args)
        return names

    def stop(self, name: str) -> None:
        """SIGTERM: the trainer finishes its step, writes a checkpoint and exits (resumable). A queued run leaves the
        queue (a new one never started; a resume waits to be asked again)."""
        with self.queue_lock:
            if name in self.queued():
                self.queue = [entry for entry in self.queue if entry["name"] != name]
                self._save_queue()
                return
        job = self.jobs.get(name)
        if job is None or job.process.poll() is not None:
            raise UIError(f"{name!r} is not running from this page")
        os.killpg(job.process.pid, signal.SIGTERM) if job.kind == "bench" else job.process.send_signal(signal.SIGTERM)

    def resume(self, name: str) -> None:
        run_dir = self.run_dir(name)
        if not (run_dir / CONFIG_NAME).is_file():
            raise UIError(f"{name!r} is not a run folder")
        status = self.status(name)["status"]
        if status in ("running", "queued"):
            raise UIError(f"{name!r} is {status}")
        if status == "finished":
            raise UIError(f"{name!r} is finished")
        self._enqueue(name, ["train", "--resume", "--output", str(run_dir), "--quiet"])

    def start_bench(self, options: dict | None = None) -> str:
        """`bench --suite mini --quick` (or `mini-lora`: each method trains a LoRA) on MiniBench's U-Net (`mini`) or its
        flow transformer (`mini-flow`), optionally smaller for a first look (fewer subjects, steps, images); queued
        behind any training, as runs are."""
        flags = {"num_subjects": "--num-subjects", "steps": "--steps", "images_per_prompt": "-k", "sample_steps": "--sample-steps"}
        options = dict(options or {})
        suite = options.pop("suite", None) or "mini"
        if suite not in MINIBENCH_SUITES:
            raise UIError(f"bench suite must be one of {', '.join(MINIBENCH_SUITES)}, got {suite!r}")
        model = options.pop("model", None) or MINI_NAME
        if model not in MODEL_NAMES:
            raise UIError(f"bench model must be one of {', '.join(MODEL_NAMES)}, got {model!r}")
        args = ["bench", "--suite", suite, "--model", model, "--quick"]
        for key, value in options.items():
            if key not in flags:
                raise UIError(f"unknown bench option {key!r}")
            if value in (None, ""):
                continue
            if not str(value).isdigit() or int(value) < 1:
                raise UIError(f"bench {key.replace('_', ' ')} must be a positive whole number")
            args += [flags[key], str(int(value))]
        name = time.strftime("bench-%Y%m%d-%H%M%S")
        while self.run_dir(name).exists() or name in self.jobs or name in self.queued():
            name += "x"
        self._enqueue(name, [*args, "--output", str(self.run_dir(name)), "--quiet"])
        return name

    # --- what the page shows ------------------------------------------------------------------
    @staticmethod
    def methods() -> list[dict]:
        return [{"name": name, "summary": cls.summary, "baseline": cls is baseline_method()} for name, cls in method_registry().items()]

    def _log_tail(self, name: str, lines: int = 40) -> list[str]:
        """The last lines the latest command wrote (the log keeps every start and resume of the run)."""
        log = self.log_path(name)
        text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
        starts = [i for i, line in enumerate(text) if line.startswith("$ rewardbooth ")]
        return text[starts[-1] if starts else 0:][-lines:]

    def status(self, name: str) -> dict:
        run_dir = self.run_dir(name)
        folder = RunFolder(run_dir)
        job = self.jobs.get(name)
        alive = job is not None and job.process.poll() is None
        tail = self._log_tail(name)
        error = next((line for line in reversed(tail) if line.startswith("rewardbooth: error") or line.startswith("Traceback")), None)
        if error and error.startswith("Traceback"):
            error = next((line for line in reversed(tail) if line.strip() and not line.startswith(" ")), error)
        if alive or folder.lock_holder():
            state = "running"
        elif name in self.queued():
            state = "queued"
        elif folder.is_finished() or (run_dir / "results.csv").is_file():
            state = "finished"
        elif error:
            # One line: a refusal (bad input, a resume under other settings) or a diverged run; a traceback: a crash.
            one_line = error.startswith(ERROR_OPENING)
            error = error.removeprefix(ERROR_OPENING)
            state = "crashed" if not one_line else "diverged" if error.startswith(TrainingDiverged.opening) else "failed"
        elif any(line.startswith("rewardbooth: interrupted") for line in tail):
            state = "stopped"
        elif job is not None and job.process.returncode not in (None, 0):
            state, error = "crashed", (tail[-1] if tail else f"exited with code {job.process.returncode}")
        else:
            state = "stopped" if (run_dir / CHECKPOINT_DIR).is_dir() else "unknown"
        info = {"name": name, "status": state, "error": error if state in ("crashed", "failed", "diverged") else None}
        if state == "queued":
            args = next(entry["args"] for entry in self.queue if entry["name"] == name)
            info.update(queue_position=self.queued().index(name) + 1,
                        method=args[args.index("--method") + 1] if "--method" in args else None)
        if folder.config.is_file():

            cfg = yaml.safe_load(folder.config.read_text())
            records = folder.read_metrics()
            steps = [r for r in records if not r.get("validation")]
            total = int(cfg["train"]["steps"])
            step = steps[-1]["step"] if steps else 0
            seconds = steps[-1].get("seconds_per_step") if steps else None
            if state == "finished" and (result := folder.read_result()) is not None:
                step = max(step, result.last_step)
            info.update(method=cfg["train"]["method"], model=cfg["model"]["name"], class_noun=cfg["data"]["class_noun"],
                        step=step, total=total, progress=round(100 * min(step, total) / total),
                        eta_seconds=round(seconds * (total - step)) if seconds and state == "running" else None,
                        curves={key: [[r["step"], r[key]] for r in records if r.get(key) is not None]  # null: NaN
                                for key in self._curve_keys(cfg["train"]["method"]) if any(key in r for r in records)},
                        samples=[str(p.relative_to(self.root)) for p in folder.sample_grids()],
                        files={label: str(p.relative_to(self.root)) for label, p in
                               (("report", folder.report), ("LoRA (diffusers)", run_dir / LORA_WEIGHTS_NAME),
                                ("LoRA (kohya / A1111 / ComfyUI)", run_dir / KOHYA_WEIGHTS_NAME)) if p.is_file()},
                        # a diverged run resumed as it is diverges again at the same step
                        resumable=state in ("stopped", "crashed", "failed") and (run_dir / CHECKPOINT_DIR).is_dir())
        return info

    @staticmethod
    def _curve_keys(method: str) -> tuple[str, ...]:
        """The method's own curves (its registry entry) and the selection score any run may log."""
        try:
            curves = get_method(method).curves
        except ConfigError:  # a run of a plug-in method that is no longer installed
            curves = ("loss",)
        return (*curves, SELECTION_REWARD)

    def bench_status(self, name: str) -> dict:
        info = self.status(name)
        out = self.run_dir(name)
        table = out / "results.csv"
        if table.is_file():

            with table.open() as f:
                info["table"] = list(csv.DictReader(f))
        info["plots"] = [str(p.relative_to(self.root)) for p in sorted(out.rglob("*.png")) if p.parent == out or p.parent.name == "report_assets"]
        report = RunFolder(out).report
        info["report"] = str(report.relative_to(self.root)) if report.is_file() else None
        return info

    def list_runs(self) -> list[dict]:
        names = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and NAME.match(p.name)}
        names |= set(self.jobs) | set(self.queued("train"))
        training = {name for name, job in self.jobs.items() if job.kind == "train"} | set(self.queued("train"))
        return [self.status(name) for name in sorted(names) if (self.root / name / CONFIG_NAME).is_file() or name in training]
