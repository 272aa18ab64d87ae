"""`rewardbooth ui`: a local web app over the runs folder (standard library HTTP server, one page).

Routes (JSON unless noted):
    GET  /                          the page
    GET  /files/PATH                a file inside the runs folder (images, report.html, LoRA files)
    GET  /api/runs                  every run with its status and progress
    GET  /api/methods               the methods a run can use (name, one-line summary, baseline)
    GET  /api/runs/NAME             one run: progress, ETA, curves, samples, files, error
    POST /api/uploads               a new upload folder -> {"upload": ID}
    POST /api/uploads/ID?filename=F&model=M   one photo (raw body), checked as training checks it
    POST /api/train                 {name, upload, class_noun, model, methods, steps, settings}
    POST /api/runs/NAME/stop|resume       (stop on a queued run takes it out of the queue)
    POST /api/generate              {runs, prompt, seed} -> one image per run, with judge scores
    POST /api/bench, GET /api/bench/NAME
"""

from __future__ import annotations

import base64
import hmac
import json
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import torch

from rewardbooth.data.images import load_image_folder
from rewardbooth.errors import RewardboothError
from rewardbooth.evaluation.metrics import Scorer
from rewardbooth.methods import load_config
from rewardbooth.models.loading import default_device, model_native_resolution
from rewardbooth.rewards import Subject
from rewardbooth.sampling import generate, run_sample_settings, save_generated
from rewardbooth.training.finished_run import load_run_pipeline
from rewardbooth.training.run_dir import RunFolder
from rewardbooth.ui.jobs import UIError, Workspace, check_name, inside

PAGE = Path(__file__).with_name("page.html")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_UPLOAD = 50 * 1024**2


def check_bind(host: str, auth: str | None) -> None:
    """Only this machine may reach the app unless a password protects it."""
    if host not in LOCAL_HOSTS and not auth:
        raise UIError(f"--host {host} would let other machines start jobs here; add --auth user:password (or keep 127.0.0.1)")
    if auth is not None and (":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]):
        raise UIError("--auth must be user:password")


class Generator:
    """Sampling with finished runs' weights in this process; pipelines and judges are kept."""
    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.pipelines: dict[str, tuple] = {}
        self.scorers: dict[tuple, object] = {}
        self.lock = threading.Lock()  # one sampling at a time: torch uses every core anyway

    def _pipeline(self, name: str):
        run_dir = self.workspace.run_dir(name)
        key = f"{name}:{RunFolder(run_dir).result.stat().st_mtime_ns}"
        if key not in self.pipelines:
            device = default_device()
            self.pipelines[key] = load_run_pipeline(run_dir, device=device, dtype=torch.float16 if device == "cuda" else None)
        return self.pipelines[key]

    def _score(self, cfg, image, prompt: str, file: str) -> dict:
        key = (cfg.evaluation.dino_model, cfg.evaluation.clip_model)
        if key not in self.scorers:
            self.scorers[key] = Scorer.from_config(cfg.evaluation)
        subject = Subject("subject", load_image_folder(cfg.data.instance_dir), cfg.data.identifier, cfg.data.class_noun)
        score = self.scorers[key].score([image], [prompt], [file], subject)[0]
        return {"dino": round(score.dino, 3), "clip_i": round(score.clip_i, 3), "clip_t": round(score.clip_t, 3)}

    def generate(self, runs: list[str], prompt: str, seed: int) -> list[dict]:
        if not runs:
            raise UIError("choose at least one finished run")
        if not prompt or len(prompt) > 300:
            raise UIError("write a prompt (up to 300 characters); {identifier} and {class_noun} name your subject")
        results = []
        with self.lock:
            for name in runs:
                if self.workspace.status(name)["status"] != "finished":
                    raise UIError(f"run {name!r} has not finished training")
                cfg, pipe = self._pipeline(name)
                text = cfg.format_prompt(prompt)
                image = generate(pipe, [text], 1, run_sample_settings(cfg, seed, batch_size=1))[0][0]
                path = save_generated(self.workspace.run_dir(name) / "generated", [text], [[image]], seed)[0]
                results.append({"run": name, "prompt": text, "seed": seed, "image": str(path.relative_to(self.workspace.root)),
                                "scores": self._score(cfg, image, text, path.name)})
        return results


def make_handler(workspace: Workspace, generator: Generator, auth: str | None):
    expected = "Basic " + base64.b64encode(auth.encode()).decode() if auth else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "rewardbooth-ui"

        def log_message(self, format, *args):  # quiet: the page polls every second
            pass

        # --- plumbing -------------------------------------------------------------------------
        def _authorised(self) -> bool:
            if expected is None or hmac.compare_digest(self.headers.get("Authorization", ""), expected):
                return True
            self.send_response(HTTPStatus.UNAUTHORIZED)
            self.send_header("WWW-Authenticate", 'Basic realm="rewardbooth"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value, status: int = 200) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD:
                raise UIError(f"request of {length} bytes is larger than {MAX_UPLOAD // 1024**2} MB")
            return self.rfile.read(length)

        def _dispatch(self, routes: dict) -> None:
            if not self._authorised():
                return
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")] if url.path.strip("/") else []
            try:
                for pattern, handler in routes.items():
                    if len(pattern) == len(parts) and all(p == "*" or p == q for p, q in zip(pattern, parts)):
                        return handler(parts, parse_qs(url.query))
                self._json({"error": f"no such page: {url.path}"}, 404)
            except PermissionError as exc:
                self._json({"error": str(exc)}, 403)
            except (UIError, RewardboothError, ValueError, KeyError, TypeError) as exc:
                self._json({"error": " ".join(str(exc).split())}, 400)

        # --- routes ---------------------------------------------------------------------------
        def do_GET(self):
            if self.path.startswith("/files/"):
                return self._file()
            self._dispatch({
                (): lambda p, q: self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8"),
                ("api", "runs"): lambda p, q: self._json(workspace.list_runs()),
                ("api", "methods"): lambda p, q: self._json(workspace.methods()),
                ("api", "runs", "*"): lambda p, q: self._json(workspace.status(check_name(p[2]))),
                ("api", "bench", "*"): lambda p, q: self._json(workspace.bench_status(check_name(p[2]))),
            })

        def do_POST(self):
            self._dispatch({
                ("api", "uploads"): lambda p, q: self._json({"upload": workspace.new_upload()}),
                ("api", "uploads", "*"): self._upload,
                ("api", "train"): self._train,
                ("api", "runs", "*", "stop"): lambda p, q: (workspace.stop(check_name(p[2])), self._json({"ok": True})),
                ("api", "runs", "*", "resume"): lambda p, q: (workspace.resume(check_name(p[2])), self._json({"ok": True})),
                ("api", "generate"): self._generate,
                ("api", "bench"): lambda p, q: self._json({"bench": workspace.start_bench(json.loads(self._body() or b"{}"))}),
            })

        def _file(self):
            if not self._authorised():
                return
            try:
                path = inside(workspace.root, unquote(urlparse(self.path).path[len("/files/"):]))
            except PermissionError as exc:
                return self._json({"error": str(exc)}, 403)
            if not path.is_file():
                return self._json({"error": "no such file"}, 404)
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self._send(200, path.read_bytes(), kind)

        def _upload(self, parts, query):
            model = query.get("model", ["mini"])[0]
            resolution = load_config(overrides={"model.name": model}).data.resolution  # a preset's own size (tiny-flux: 64)
            min_size = (resolution or model_native_resolution(model)) // 2  # what `rewardbooth train` demands by default
            self._json(workspace.add_photo(parts[2], query.get("filename", ["photo"])[0], self._body(), min_size))

        def _train(self, parts, query):
            form = json.loads(self._body() or b"{}")
            settings = dict(line.split("=", 1) for line in str(form.get("settings", "")).splitlines() if line.strip() and "=" in line)
            bad = [line for line in str(form.get("settings", "")).splitlines() if line.strip() and "=" not in line]
            if bad:
                raise UIError(f"advanced setting {bad[0]!r}: write section.key=value, one per line")
            names = workspace.start_runs(form.get("name", ""), form.get("upload", ""), form.get("class_noun", ""),
                                         form.get("model") or "mini", list(form.get("methods") or []), int(form.get("steps", 0)),
                                         {k.strip(): v.strip() for k, v in settings.items()})
            self._json({"runs": names})

        def _generate(self, parts, query):
            form = json.loads(self._body() or b"{}")
            runs = [check_name(r) for r in form.get("runs") or []]
            self._json(generator.generate(runs, str(form.get("prompt", "")), int(form.get("seed", 0))))

    return Handler


class UIServer(ThreadingHTTPServer):
    """The HTTP server and a thread that starts queued training runs in turn, page open or not."""
    daemon_threads = True
    queue_poll_seconds = 2.0

    def __init__(self, address, handler, workspace: Workspace):
        super().__init__(address, handler)
        self.workspace = workspace
        self.closing = threading.Event()
        threading.Thread(target=self._run_queue, daemon=True).start()

    def _run_queue(self) -> None:
        while not self.closing.wait(self.queue_poll_seconds):
            self.workspace.advance()

    def server_close(self) -> None:
        self.closing.set()
        super().server_close()


def serve(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None) -> UIServer:
    """Build the server (port 0: any free port); call .serve_forever() on it."""
    check_bind(host, auth)
    workspace = Workspace(runs_dir)
    return UIServer((host, port), make_handler(workspace, Generator(workspace), auth), workspace)
