"""Where the shipped MiniBench weights live inside the package, and how names map to them.

`--model mini` and the judge name `mini` (for `--dino-model`, `--clip-model`,
`evaluation.align_model`) resolve to these folders; everything downstream is the ordinary
`from_pretrained` path that a hub id or a local folder takes.
"""

from __future__ import annotations

from pathlib import Path

from rewardbooth.errors import ConfigError

MINI_NAME = "mini"
FLOW_NAME = "mini-flow"
MODEL_NAMES = (MINI_NAME, FLOW_NAME)  # the shipped models MiniBench's judges know
ASSETS_DIR = Path(__file__).parent / "assets"
BASE_DIR = ASSETS_DIR / "base"
FLOW_DIR = ASSETS_DIR / "flow"
JUDGES_DIR = ASSETS_DIR / "judges"
# ALIGN's role (RPO's reward) is played by the same image-text model as CLIP's.
JUDGE_FOLDERS = {"dino": "dino", "clip": "clip", "align": "clip", "attributes": "attributes"}


def _require(folder: Path, marker: str, how: str) -> Path:
    if not (folder / marker).is_file():
        raise ConfigError(f"the mini weights are missing from this install ({folder}); {how}")
    return folder


def mini_model_path() -> Path:
    """The shipped mini base pipeline (a diffusers folder)."""
    return _require(BASE_DIR, "model_index.json", "rebuild them with `python -m rewardbooth.recipes.mini_pretrain --out DIR` and pass --model DIR")


def mini_flow_model_path() -> Path:
    """The shipped mini-flow pipeline (SD3-style flow-matching transformer on the same world)."""
    if not (FLOW_DIR / "model_index.json").is_file():
        raise ConfigError("mini-flow is not pretrained yet: python -m rewardbooth.recipes.mini_flow_pretrain --out runs/mini-flow "
                          "--ship (docs/mini-flow.md), or pass --model FOLDER of a run")
    return FLOW_DIR


def mini_judge_path(kind: str) -> Path:
    """The shipped mini judge for `kind` (dino, clip, align or attributes)."""
    if kind not in JUDGE_FOLDERS:
        raise ConfigError(f"there is no mini judge for {kind!r}; choose from {', '.join(JUDGE_FOLDERS)}")
    return _require(JUDGES_DIR / JUDGE_FOLDERS[kind], "config.json", "retrain them with `python -m rewardbooth.recipes.mini_judges --out DIR`")
