"""`rewardbooth ui`: the page driven in headless Chromium as a person would, and its safety rules."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rewardbooth.ui.jobs import UIError, Workspace
from rewardbooth.ui.server import check_bind, serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    from rewardbooth.mini.world import make_subject

    subject = make_subject(seed=5, num_images=3)
    subject.save(tmp_path / "photos")
    broken = tmp_path / "photos-bad" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return sorted((tmp_path / "photos").glob("*.png")) + [broken]


@pytest.fixture
def app(tmp_path):
    """The server on a free port in a thread; yields (base url, workspace)."""
    servers = []

    def start(auth=None):
        server = serve(tmp_path / "runs", "127.0.0.1", 0, auth)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.workspace

    yield start
    for server in servers:
        for job in server.workspace.jobs.values():
            if job.process.poll() is None:
                job.process.kill()
        server.shutdown()
        server.server_close()


def _request(url: str, data=None, headers=None, raw=False) -> tuple[int, dict | bytes]:
    body = None if data is None else (data if raw else json.dumps(data).encode())
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


def _upload(base: str, files: list[Path]) -> tuple[str, list[dict]]:
    upload = _request(base + "/api/uploads", {})[1]["upload"]
    return upload, [_request(f"{base}/api/uploads/{upload}?filename={p.name}&model=mini", p.read_bytes(), raw=True)[1] for p in files]


def _wait(base: str, run: str, until, timeout: float = 150) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _request(f"{base}/api/runs/{run}")[1]
        if until(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"{run} did not get there in {timeout} s: {status}")


# --- as a person uses it -----------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None and os.environ.get("REWARDBOOTH_REQUIRE_BROWSER") != "1",
                    reason="Chromium not installed (CI installs Debian's chromium and sets REWARDBOOTH_REQUIRE_BROWSER=1)")
@pytest.mark.slow
def test_the_page_trains_watches_and_generates(app, photos, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, workspace = app()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(base)
        page.set_input_files("#photos", [str(p) for p in photos])
        # The corrupt upload shows its one-line error beside it; the good ones say ok.
        expect(page.locator("li.photo", has_text="broken.png").locator(".check")).to_contain_text("not a readable image")
        expect(page.locator("li.photo .check.ok")).to_have_count(3)
        page.fill("#name", "my-vase")
        page.fill("#class-noun", "vase")
        page.fill("#steps", "10")
        page.fill("#settings", "prior.num_class_images=4\nvalidation.every=5")
        page.click("#start")
        expect(page.locator("#detail-name")).to_have_text("my-vase")
        expect(page.locator("#progress")).to_contain_text("100 %", timeout=150_000)
        expect(page.locator("#detail-status")).to_contain_text("finished", timeout=60_000)
        expect(page.locator("#samples img")).to_have_count(2)  # validation at steps 5 and 10
        expect(page.locator("#downloads a", has_text="kohya")).to_have_count(1)
        expect(page.locator("input[name=compare][value=my-vase]")).to_be_checked()
        page.click("#generate")
        image = page.locator("#generated img.generated")
        expect(image).to_have_count(1, timeout=60_000)
        page.wait_for_function("() => document.querySelector('#generated img.generated').naturalWidth > 0")
        expect(page.locator("#generated")).to_contain_text("CLIP-T")
        page.screenshot(path=os.environ.get("REWARDBOOTH_UI_SCREENSHOT", str(tmp_path / "ui.png")), full_page=True)
        # A path outside the runs folder is refused, however it is spelled.
        (tmp_path / "outside.txt").write_text("not yours")
        for path in ("/files/..%2Foutside.txt", "/files/%2E%2E%2Foutside.txt"):  # browsers fold a plain ../ before sending
            response = page.request.get(base + path)
            assert response.status == 403 and "not yours" not in response.text(), path
        browser.close()
    # The uploads are kept, the bad one aside (never trained on, never lost).
    upload = next((workspace.root / ".uploads").iterdir())
    assert sorted(p.name for p in upload.glob("*.png")) == ["00.png", "01.png", "02.png"]
    assert (upload / "rejected" / "broken.png").is_file()


# --- safe by default ---------------------------------------------------------------------------
@pytest.mark.slow
def test_other_hosts_need_a_password(tmp_path):
    with pytest.raises(UIError, match="--auth"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "me:secret")
    check_bind("127.0.0.1", None)
    out = subprocess.run([sys.executable, "-m", "rewardbooth", "ui", "--host", "0.0.0.0", "--runs-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "--auth" in out.stderr
    assert not (tmp_path / "r").exists()


def test_a_password_guards_every_route(app):
    base, _ = app(auth="me:secret")
    assert _request(base + "/")[0] == 401
    assert _request(base + "/api/runs")[0] == 401
    assert _request(base + "/api/uploads", {})[0] == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"me:secret").decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"me:guess").decode()}
    assert _request(base + "/api/runs", headers=wrong)[0] == 401
    assert _request(base + "/api/runs", headers=good) == (200, [])


def test_paths_typed_in_the_page_cannot_escape_the_runs_folder(app, tmp_path):
    base, workspace = app()
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (workspace.root / "link").symlink_to(secret)
    (workspace.root / "mine.txt").write_text("yours")
    assert _request(base + "/files/mine.txt") == (200, b"yours")
    import http.client

    for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files//" + str(secret).lstrip("/"), "/files/link"):
        connection = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]))
        connection.request("GET", path)  # sent as typed: no client-side normalisation of ".."
        response = connection.getresponse()
        assert response.status in (403, 404) and b"not yours" not in response.read(), path
    assert _request(base + "/api/runs/..")[0] in (400, 404)
    status, reply = _request(base + "/api/train", {"name": "../escape", "upload": "x", "class_noun": "vase", "methods": ["dreambooth"], "steps": 5})
    assert status == 400 and "run name" in reply["error"]


def test_uploads_are_checked_against_the_size_the_model_trains_at(app, tmp_path):
    """tiny-flux trains at its preset's 64 px: a 48 px photo is enough (FLUX's native 1024 px would ask for 512), 24 px is not."""
    from PIL import Image

    base, _ = app()
    upload = _request(base + "/api/uploads", {})[1]["upload"]
    answers = {}
    for side in (48, 24):
        photo = tmp_path / f"photo-{side}.png"
        Image.new("RGB", (side, side), (200, 40, 40)).save(photo)
        answers[side] = _request(f"{base}/api/uploads/{upload}?filename={photo.name}&model=tiny-flux", photo.read_bytes(), raw=True)
    assert answers[48][0] == 200 and "error" not in answers[48][1], answers[48]
    assert "error" in json.dumps(answers[24][1]) and "24" in json.dumps(answers[24][1]), answers[24]


def test_two_runs_cannot_write_the_same_folder(app, photos):
    base, workspace = app()
    upload, checks = _upload(base, photos[:3])
    form = {"name": "same", "upload": upload, "class_noun": "vase", "methods": ["dreambooth"], "steps": 400}
    assert _request(base + "/api/train", form) == (200, {"runs": ["same"]})
    status, reply = _request(base + "/api/train", form)
    assert status == 400 and "exists already" in reply["error"]
    workspace.stop("same")
    _wait(base, "same", lambda s: s["status"] != "running", timeout=120)


def test_a_run_the_trainer_would_refuse_is_refused_before_any_starts(app, photos):
    base, workspace = app()
    upload, _ = _upload(base, photos[:3])
    form = {"name": "bad", "upload": upload, "class_noun": "vase", "methods": ["dreambooth", "dpg"], "steps": 5,
            "settings": "dpg.critic_lr=0"}
    status, reply = _request(base + "/api/train", form)
    assert status == 400 and reply["error"].startswith("dpg: ") and "dpg.critic_lr" in reply["error"]
    assert not workspace.run_dir("bad-dreambooth").exists() and workspace.jobs == {}  # the valid one did not start either


CRASHING_REWARD = '''
import os, torch
calls = 0
def flaky(images, prompts, subject):
    global calls
    calls += 1
    if os.environ.get("RB_CRASH") and calls > 4:
        raise RuntimeError("judge server went away")
    return images.float().mean(dim=(1, 2, 3))
'''


@pytest.mark.slow
def test_a_crash_shows_its_error_and_the_run_resumes(app, photos, tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "flaky_reward.py").write_text(CRASHING_REWARD)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'plugins'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("RB_CRASH", "1")
    base, workspace = app()
    upload, _ = _upload(base, photos[:3])
    form = {"name": "flaky", "upload": upload, "class_noun": "vase", "methods": ["dpg"], "steps": 12,
            "settings": "dpg.reward=flaky_reward:flaky\ndpg.critic_input=latent\nprior.num_class_images=2\nvalidation.every=0"}
    assert _request(base + "/api/train", form)[0] == 200
    crashed = _wait(base, "flaky", lambda s: s["status"] not in ("running", "unknown"))
    assert crashed["status"] == "crashed" and "judge server went away" in crashed["error"]
    assert crashed["resumable"] and 0 < crashed["step"] < 12
    monkeypatch.delenv("RB_CRASH")
    assert _request(base + "/api/runs/flaky/resume", {})[0] == 200
    finished = _wait(base, "flaky", lambda s: s["status"] == "finished")
    assert finished["step"] == 12 and finished["error"] is None


@pytest.mark.slow
def test_stop_checkpoints_where_it_stopped_and_resume_finishes(app, photos):
    base, workspace = app()
    upload, _ = _upload(base, photos[:3])
    form = {"name": "long", "upload": upload, "class_noun": "vase", "methods": ["dreambooth"], "steps": 300,
            "settings": "prior.num_class_images=2\nvalidation.every=0"}
    assert _request(base + "/api/train", form)[0] == 200
    _wait(base, "long", lambda s: s.get("step", 0) >= 3)
    assert _request(base + "/api/runs/long/stop", {})[0] == 200
    stopped = _wait(base, "long", lambda s: s["status"] != "running")
    assert stopped["status"] == "stopped" and stopped["resumable"]
    from rewardbooth.training.run_dir import list_checkpoints

    assert list_checkpoints(workspace.run_dir("long"))[-1][0] == stopped["step"]  # checkpointed where it stopped
    assert _request(base + "/api/runs/long/resume", {})[0] == 200
    assert _wait(base, "long", lambda s: s["status"] == "finished")["step"] == 300


@pytest.mark.slow
def test_the_bench_runs_from_the_page_and_shows_its_table(app):
    base, workspace = app()
    status, reply = _request(base + "/api/bench", {"num_subjects": "x"})
    assert status == 400 and "positive whole number" in reply["error"]
    bench = _request(base + "/api/bench", {"num_subjects": 1, "steps": 3, "images_per_prompt": 1, "sample_steps": 4})[1]["bench"]
    deadline = time.time() + 600
    while (info := _request(f"{base}/api/bench/{bench}")[1])["status"] == "running" and time.time() < deadline:
        time.sleep(1)
    assert info["status"] == "finished", info
    assert {row["method"] for row in info["table"]} == {"dreambooth", "dpg", "rpo"}
    assert info["report"] and info["plots"]
    assert _request(f"{base}/files/{info['plots'][0]}")[0] == 200


def test_the_page_benches_either_suite_on_either_model_and_refuses_another(app):
    base, workspace = app()
    status, reply = _request(base + "/api/bench", {"suite": "dreambench"})
    assert status == 400 and "mini, mini-lora" in reply["error"] and not workspace.jobs
    status, reply = _request(base + "/api/bench", {"model": "tiny"})
    assert status == 400 and "one of mini, mini-flow" in reply["error"] and not workspace.jobs
    bench = _request(base + "/api/bench", {"suite": "mini-lora", "model": "mini-flow", "num_subjects": 1, "steps": 1})[1]["bench"]
    command = workspace.log_path(bench).read_text().splitlines()[0]
    workspace.stop(bench)  # what was started is the point here, not the bench itself
    workspace.jobs[bench].process.wait(timeout=60)
    assert command.startswith("$ rewardbooth bench --suite mini-lora --model mini-flow --quick --num-subjects 1 --steps 1 ")
    html = _request(base + "/")[1]
    html = html if isinstance(html, bytes) else html.encode()
    assert b'<option value="mini-lora">' in html and b'<option value="mini-flow">' in html


# --- a run that ends in a one-line error: a status, not a stack trace ------------------------------------
@pytest.mark.slow
def test_a_diverged_run_shows_a_one_line_status(app, photos):
    base, _ = app()
    upload, _ = _upload(base, photos[:3])
    form = {"name": "hot", "upload": upload, "class_noun": "vase", "model": "tiny", "methods": ["dreambooth"], "steps": 20,
            "settings": "train.learning_rate=1e6\nadapter.kind=full\nprior.num_class_images=2\nprior.generation_steps=2\nvalidation.every=0"}
    assert _request(base + "/api/train", form)[0] == 200
    status = _wait(base, "hot", lambda s: s["status"] not in ("running", "unknown"))
    assert status["status"] == "diverged", status
    assert status["error"].startswith("training diverged at step ") and "\n" not in status["error"]
    assert not status["resumable"] and not status["files"]  # the same settings diverge again; no weights to download
    assert all(value is not None for points in status["curves"].values() for _, value in points)  # NaN steps left out


def fake_run(workspace: Workspace, name: str, log: list[str]) -> None:
    """A run folder with a checkpoint and a NaN metrics line, and the web app's log of the commands run on it."""
    from rewardbooth.methods import load_config

    run = workspace.run_dir(name)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(load_config(overrides={"model.name": "tiny", "data.class_noun": "vase", "train.steps": 8}).to_yaml())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": null, "nonfinite": ["loss"]}\n')
    workspace.log_path(name).parent.mkdir(exist_ok=True)
    workspace.log_path(name).write_text("\n".join(log) + "\n")


def test_status_is_read_from_the_latest_command_in_the_log(tmp_path):
    workspace = Workspace(tmp_path / "runs")
    diverged = "rewardbooth: error: training diverged at step 2: loss is nan (grad_norm nan); no checkpoint was saved before it; ..."
    refused = "rewardbooth: error: --resume: the run was trained with other settings: train.learning_rate 1 -> 0.1 (...)"
    fake_run(workspace, "a", ["$ rewardbooth train --output a", diverged])
    fake_run(workspace, "b", ["$ rewardbooth train --output b", diverged, "$ rewardbooth train --resume --output b", refused])
    fake_run(workspace, "c", ["$ rewardbooth train --output c", diverged, "$ rewardbooth train --resume --output c",
                              "rewardbooth: interrupted: stopped at step 5; continue with --resume"])
    a, b, c = (workspace.status(name) for name in "abc")
    assert (a["status"], a["error"]) == ("diverged", diverged.removeprefix("rewardbooth: error: "))
    assert (b["status"], b["error"]) == ("failed", refused.removeprefix("rewardbooth: error: ")) and b["resumable"]
    assert (c["status"], c["error"]) == ("stopped", None)
    assert a["curves"]["loss"] == [[1, 0.5]]


# --- training runs take turns ------------------------------------------------------------------
FAKE_TRAINER = """
import pathlib, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("--output") + 1])
while not out.with_name(out.name + ".release").exists():  # trains until the test lets it finish
    time.sleep(0.02)
"""


def _queue_workspace(root: Path, script: Path) -> Workspace:
    workspace = Workspace(root)
    workspace.command = [sys.executable, str(script)]
    return workspace


def _finish(workspace: Workspace, name: str) -> None:
    workspace.run_dir(name).with_name(name + ".release").touch()
    workspace.jobs[name].process.wait(timeout=30)


def test_runs_and_benches_train_one_at_a_time_in_the_order_asked(tmp_path, photos):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    workspace = _queue_workspace(tmp_path / "runs", script)
    upload = workspace.new_upload()
    for photo in photos[:3]:
        workspace.add_photo(upload, photo.name, photo.read_bytes(), 16)
    try:
        names = workspace.start_runs("vase", upload, "vase", "mini", ["dreambooth", "dpg", "rpo"], 10, {})
        assert names == ["vase-dreambooth", "vase-dpg", "vase-rpo"]
        assert list(workspace.jobs) == ["vase-dreambooth"]  # the first trains, the others wait
        rows = {r["name"]: r for r in workspace.list_runs()}
        assert [rows[n]["status"] for n in names] == ["running", "queued", "queued"]
        assert (rows["vase-dpg"]["queue_position"], rows["vase-dpg"]["method"]) == (1, "dpg")
        assert workspace.advance() is None and list(workspace.jobs) == ["vase-dreambooth"]  # not while one trains
        with pytest.raises(UIError, match="'vase-dpg' exists already"):
            workspace.start_runs("vase-dpg", upload, "vase", "mini", ["dpg"], 10, {})
        workspace.stop("vase-rpo")  # a queued run leaves the queue, never started
        assert "vase-rpo" not in {r["name"] for r in workspace.list_runs()}
        assert [e["name"] for e in json.loads((workspace.root / ".ui-logs" / "queue.json").read_text())] == ["vase-dpg"]
        _finish(workspace, "vase-dreambooth")
        assert workspace.advance() == "vase-dpg" and workspace.jobs["vase-dpg"].process.poll() is None
        assert "--method dpg" in " ".join(workspace.jobs["vase-dpg"].process.args)
        bench = workspace.start_bench({"num_subjects": 1})  # a bench trains too: it waits its turn, outside the runs list
        assert workspace.bench_status(bench)["status"] == "queued" and bench not in {r["name"] for r in workspace.list_runs()}
        _finish(workspace, "vase-dpg")
        assert workspace.advance() == bench and workspace.jobs[bench].kind == "bench"
        _finish(workspace, bench)
        assert workspace.advance() is None and "vase-rpo" not in workspace.jobs
    finally:
        for job in workspace.jobs.values():
            job.process.kill()


def test_a_restarted_server_carries_on_the_queue_and_waits_for_a_run_it_did_not_start(tmp_path, photos):
    from rewardbooth.training.run_dir import run_lock

    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    first = again = _queue_workspace(tmp_path / "runs", script)
    upload = first.new_upload()
    for photo in photos[:3]:
        first.add_photo(upload, photo.name, photo.read_bytes(), 16)
    try:
        first.start_runs("cube", upload, "cube", "mini", ["dreambooth", "dpg"], 10, {})
        _finish(first, "cube-dreambooth")
        elsewhere = first.run_dir("from-the-cli")
        elsewhere.mkdir()
        with run_lock(elsewhere):  # a run this server did not start holds its folder's lock
            again = _queue_workspace(tmp_path / "runs", script)  # the server restarted: the queue is read back
            assert again.queued() == ["cube-dpg"] and again.status("cube-dpg")["status"] == "queued"
            assert again.advance() is None
        assert again.advance() == "cube-dpg"
        (again.root / ".ui-logs" / "queue.json").write_text("{not json")
        assert Workspace(tmp_path / "runs").queued() == []  # an unreadable queue is moved aside, not lost
        assert (again.root / ".ui-logs" / "queue.unreadable").read_text() == "{not json"
    finally:
        for workspace in (first, again):
            for job in workspace.jobs.values():
                job.process.kill()
