"""Contact sheets of mini-world images, for eyeballing the world and for reports."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from rewardbooth.data.images import tile_rows
from rewardbooth.mini.world import make_subject, pretraining_batch, render, subject_prompts


def contact_sheet(
    rows: Sequence[Sequence[Image.Image]],
    *,
    scale: int = 2,
    pad: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Rows of equally sized images, each upscaled `scale` x (nearest), on one canvas."""
    rows = [list(row) for row in rows if len(row)]
    if not rows:
        raise ValueError("contact_sheet needs at least one image")
    side = rows[0][0].width * scale
    return tile_rows(rows, cell=(side, side), pad=pad, background=background, resample=Image.Resampling.NEAREST)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewardbooth.mini",
        description="Draw a contact sheet of the mini world: 8 rows of pretraining scenes, "
        "one subject's references, and that subject as each evaluation prompt expects it.",
    )
    parser.add_argument("--out", type=Path, default=Path("mini_world.png"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the pretraining scenes")
    parser.add_argument("--subject-seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args(argv)

    images, captions, _ = pretraining_batch(args.seed, 64, args.size, drop_prob=0.0)
    subject = make_subject(args.subject_seed, size=args.size)
    specs = subject_prompts(subject)
    oracle = [render(spec.oracle_scene(i), args.size, i) for i, spec in enumerate(specs)]
    rows = [images[i : i + 8] for i in range(0, 64, 8)] + [subject.images]
    rows += [oracle[i : i + 8] for i in range(0, len(oracle), 8)]
    contact_sheet(rows, scale=args.scale).save(args.out)
    for i, caption in enumerate(captions):
        print(f"scene {i // 8},{i % 8}: {caption}")
    print(f"subject {subject.name}: {subject.prompt()}")
    for spec in specs:
        print(f"prompt: {spec.prompt}")
    print(f"wrote {args.out}")
    return 0
