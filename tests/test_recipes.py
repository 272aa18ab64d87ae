"""The MiniBench recipes (rewardbooth.recipes): pretraining resumes with its EMA, judges save loadable checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rewardbooth.mini.scoring import AttributeJudge
from rewardbooth.recipes import mini_judges as judges
from rewardbooth.recipes import mini_pretrain as pretrain
from rewardbooth.rewards.encoders import ClipEncoder, DinoEncoder, clear_encoder_cache, load_encoder

FAST = ["--preset", "xs", "--batch", "4", "--vae-steps", "2", "--vae-batch", "4", "--warmup", "2", "--log-every", "1",
        "--sample-every", "1000", "--threads", "1"]


@pytest.mark.slow
def test_pretrain_resumes_and_saves_the_ema(tmp_path):
    out = tmp_path / "base"
    assert pretrain.main(["--out", str(out), "--steps", "4", "--save-every", "2", *FAST]) == 0
    assert pretrain.main(["--out", str(out), "--steps", "4", *FAST]) == 2  # refuses to overwrite a run
    assert pretrain.main(["--out", str(out), "--steps", "7", "--resume", *FAST]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"phase": "resume", "step": 4} in records
    steps = [r["step"] for r in records if r.get("phase") == "diffusion"]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # one log per step, continuing after the resume
    state = torch.load(out / pretrain.TRAIN_STATE, weights_only=False)
    assert state["step"] == 7
    assert all(s["step"].item() == 7 for s in state["optimizer"]["state"].values())  # Adam moments carried over
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    # save_pretrained wrote the moving average, which differs from the raw weights after training.
    n_unet = len(saved)
    raw, ema = state["params"][:n_unet], [state["ema"][f"shadow.{i}"] for i in range(n_unet)]
    assert any(not torch.equal(r, e) for r, e in zip(raw, ema))
    assert any(torch.equal(t, e) for t, e in zip(saved.values(), ema) if t.shape == e.shape)
    assert json.loads((out / "rewardbooth_mini.json").read_text())["steps_done"] == 7


def test_pretrain_resume_needs_a_state(tmp_path, capsys):
    assert pretrain.main(["--out", str(tmp_path / "none"), "--resume", *FAST]) == 2
    assert "train_state.pt does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_judges_train_save_and_load_through_from_pretrained(tmp_path):
    out = tmp_path / "judges"
    assert judges.main(["--out", str(out), "--steps", "3", "--batch", "8", "--images", "64", "--test-images", "40",
                        "--threads", "1"]) == 0
    info = json.loads((out / "attributes" / judges.JUDGE_INFO).read_text())
    assert set(info["heldout_accuracy"]) == {"shape", "colour", "pattern", "context", "size"}
    clear_encoder_cache()
    dino = load_encoder("dino", str(out / "dino"))
    align = load_encoder("align", str(out / "clip"))  # a CLIP checkpoint can play ALIGN's role
    assert isinstance(dino, DinoEncoder) and isinstance(align, ClipEncoder)
    from rewardbooth.mini.world import make_subject

    images = make_subject(seed=3).images
    assert dino.encode_images(images).shape == (5, 96)
    assert align.encode_texts(["a red ball on the beach"]).shape == (1, 64)
    predicted = AttributeJudge(out / "attributes").predict(images)
    assert len(predicted) == 5 and set(predicted[0]) == {"shape", "colour", "pattern", "context", "size"}
    clear_encoder_cache()


def test_judges_reject_unknown_names(tmp_path, capsys):
    assert judges.main(["--out", str(tmp_path), "--only", "dino,nope"]) == 2
    assert "nope" in capsys.readouterr().err
