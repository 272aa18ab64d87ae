"""How well the mini base model draws what it is asked for, read by the attribute judge.

    python -m rewardbooth.mini.measure --scenes 448 --out mini-base-check
    python -m rewardbooth.mini.measure --scenes 224 --steps 50 --sampler folder --guidance 7.5

`--sampler` picks the solver: dpm (DPM-Solver++, what rewardbooth samples class images, negatives
and validations with), ddim, or folder (the model folder's own scheduler, what the research scripts'
`DiffusionPipeline.from_pretrained(...)(prompt)` uses; DDPM for mini).

Random world scenes are captioned in full ("a red striped ball on the beach"), generated once
each, and the judge's reading of each attribute is compared with the caption. The same judge on
the scenes' true renders is the ceiling (its own error), 1/|values| the chance level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rewardbooth.data.images import save_image_grid
from rewardbooth.errors import ConfigError
from rewardbooth.mini.scoring import AttributeJudge
from rewardbooth.mini.world import ATTRIBUTES, DEFAULT_SPLIT, Scene, render, sample_scene
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.sampling import SampleSettings, generate

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

MEASURED = ("shape", "colour", "pattern", "context", "size")


def _accuracy(predictions: list[dict[str, str]], scenes: list[Scene]) -> dict[str, float]:
    return {a: round(float(np.mean([p[a] == getattr(s, a) for p, s in zip(predictions, scenes)])), 4) for a in MEASURED}


def measure_base_model(model: str = "mini", scenes: int = 64, steps: int = 20, guidance: float = 4.0, seed: int = 0,
                       heldout: bool = False, judge: AttributeJudge | None = None, device: str = "cpu",
                       batch_size: int = 32, progress: bool = False, sampler: str = "dpm") -> dict:
    """Per attribute: accuracy of the generated images, of the true renders, and chance.
    `heldout` draws the subjects' held-out combinations (never seen in pretraining)."""

    rng = np.random.default_rng(seed)
    drawn = [sample_scene(rng, exclude=() if heldout else None, combos=DEFAULT_SPLIT.heldout if heldout else None)
             for _ in range(scenes)]
    components = load_components(model)
    pipe = make_pipeline(components, scheduler="ddim" if sampler == "ddim" else "dpm").to(device)
    if sampler == "folder":
        pipe.scheduler = folder_scheduler(components.path)
    settings = SampleSettings(steps=steps, guidance_scale=guidance, seed=seed, batch_size=batch_size)
    captions = [s.caption() for s in drawn]
    images = [row[0] for row in generate(pipe, captions, 1, settings, progress=progress, description="base model")]
    judge = judge or AttributeJudge("mini", device=device)
    renders = [render(s, images[0].width, seed + i) for i, s in enumerate(drawn)]
    return {
        "generated": _accuracy(judge.predict(images), drawn),
        "rendered": _accuracy(judge.predict(renders), drawn),
        "chance": {a: round(1 / len(ATTRIBUTES[a]), 4) for a in MEASURED},
        "scenes": scenes, "steps": steps, "guidance": guidance, "sampler": sampler, "heldout_combinations": heldout,
        "images": images, "captions": captions,
    }


def folder_scheduler(path: str):
    """The scheduler class and settings saved in a local model folder (scheduler/scheduler_config.json)."""
    import diffusers

    name = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(path, subfolder="scheduler")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rewardbooth.mini.measure", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mini", help="the mini base model or a folder of a retrained one")
    ap.add_argument("--scenes", type=int, default=448)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", choices=("dpm", "ddim", "folder"), default="dpm")
    ap.add_argument("--heldout", action="store_true", help="draw the held-out (subject) combinations")
    ap.add_argument("--out", type=Path, default=None, help="folder for a sample grid and measure.json")
    args = ap.parse_args(argv)
    try:
        result = measure_base_model(args.model, args.scenes, args.steps, args.guidance, args.seed, args.heldout, progress=True,
                                    sampler=args.sampler)
    except ConfigError as exc:  # a model not there (mini-flow before it ships): one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images, captions = result.pop("images"), result.pop("captions")
    print(f"{'attribute':<10}{'generated':>11}{'renders':>9}{'chance':>8}")
    for a in MEASURED:
        print(f"{a:<10}{result['generated'][a]:>11.3f}{result['rendered'][a]:>9.3f}{result['chance'][a]:>8.3f}")
    if args.out:

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "measure.json").write_text(json.dumps({**result, "grid_captions": captions[:64]}, indent=2))
        save_image_grid([im.resize((96, 96), 0) for im in images[:64]], args.out / "samples.png", cols=8)
        print(f"wrote {args.out / 'measure.json'} and {args.out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
