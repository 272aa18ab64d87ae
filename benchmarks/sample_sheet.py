"""A sample sheet from a finished mini bench, for README: per subject a row of its reference images, then one row per
bench folder holding the first seed of every prompt (contexts, recolours, repattern, sizes, upside down).

    python benchmarks/sample_sheet.py runs/set2 --folders dreambooth@400,dpg@400,rpo@400 --subjects 2 --out docs/minibench-samples.png

The subjects are the set's first K in its own order (by subject seed) whose images every named folder kept; they are
chosen by that rule, never by how a method looks on them. Prints the subjects it took and the ones it passed over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from rewardbooth.data.images import list_image_files, save_labelled_rows

FIRST_SEED_SUFFIX = "_s0.png"


def subject_seed(name: str) -> int:
    """mini-<seed>-<colour>-<pattern>-<shape> -> seed (the set's order)."""
    try:
        return int(name.split("-")[1])
    except (IndexError, ValueError):
        raise SystemExit(f"sample_sheet: {name!r} is not a MiniBench subject folder (mini-<seed>-...)") from None


def first_seed_images(folder: Path, subject: str) -> list[Path]:
    images = folder / "subjects" / subject / "images"
    return sorted(images.glob("*" + FIRST_SEED_SUFFIX)) if images.is_dir() else []


def choose_subjects(bench: Path, folders: list[Path], count: int) -> tuple[list[str], list[str]]:
    """The first `count` subjects in the set's order whose images every folder kept, and those passed over."""
    chosen: list[str] = []
    passed: list[str] = []
    for subject in sorted((p.name for p in (bench / "references").iterdir() if p.is_dir()), key=subject_seed):
        if len(chosen) == count:
            break
        (chosen if all(first_seed_images(f, subject) for f in folders) else passed).append(subject)
    return chosen, passed


def sample_sheet(bench: Path, folder_names: list[str], count: int, out: Path, scale: int = 2) -> list[str]:
    folders = [bench / name for name in folder_names]
    missing = [str(f) for f in folders + [bench / "references"] if not f.is_dir()]
    if missing:
        raise SystemExit(f"sample_sheet: no such bench folder: {', '.join(missing)}")
    chosen, passed = choose_subjects(bench, folders, count)
    if not chosen:
        raise SystemExit(f"sample_sheet: no subject of {bench} has images in every folder of {', '.join(folder_names)}")
    rows: list[tuple[str, list[Image.Image]]] = []
    for subject in chosen:
        rows.append((subject.split("-", 2)[2], [Image.open(p) for p in list_image_files(bench / "references" / subject)]))
        rows += [(folder.name, [Image.open(p) for p in first_seed_images(folder, subject)]) for folder in folders]
    save_labelled_rows(rows, out, scale=scale)
    print(f"{out}: subjects {', '.join(chosen)}" + (f" (passed over, images not kept: {', '.join(passed)})" if passed else ""))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="a mini bench's output folder (holding references/ and the method folders)")
    parser.add_argument("--folders", required=True, help="comma-separated bench folders, one row each (e.g. dreambooth@400,dpg@400)")
    parser.add_argument("--subjects", type=int, default=2, help="how many subjects, the set's first (default 2)")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscale of the 32 px images (default 2)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.subjects < 1 or args.scale < 1:
        raise SystemExit("sample_sheet: --subjects and --scale must be positive")
    sample_sheet(args.bench, [f.strip() for f in args.folders.split(",") if f.strip()], args.subjects, args.out, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
