"""A bench's record: the small files that hold its results, kept apart from its weights and images, so a long bench
survives the machine it runs on (commit the record; restore it on a fresh machine and the same command carries on).

    python benchmarks/bench_records.py save runs/set2 docs/measurements/minibench/set2      # after each finished subject
    python benchmarks/bench_records.py restore docs/measurements/minibench/set2 runs/set2   # then rerun the bench command

The record of a bench (a mini bench's output folder, or one bench folder) is every bench folder's bench.json and, for
each subject finished in *every* bench folder (scored, or failed.json), its scores.json, seconds.json, failed.json and
run.batch.json, plus the results and pairings written at the top. A subject some folder has not finished yet is left
out whole: restored without its run's weights, a half-finished subject would train again anyway. `restore` never
overwrites a file the bench folder already holds (restored to another path, a mini bench's bench.json names its
references there). A restored subject counts as finished (the bench skips it); its
images are not in the record, so the report shows its numbers and says its images were not kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rewardbooth.evaluation.bench import BATCH_SUFFIX, BENCH_INFO, FAILED_NAME, PAIRED_NAME, SECONDS_NAME

SUBJECT_FILES = ("scores.json", SECONDS_NAME, FAILED_NAME, "run" + BATCH_SUFFIX)
TOP_FILES = ("results.json", "results.csv", PAIRED_NAME)


def bench_folders(root: Path) -> list[Path]:
    """The bench folders under `root` (those holding bench.json): root itself, or its children."""
    if (root / BENCH_INFO).is_file():
        return [root]
    return sorted(p for p in root.iterdir() if (p / BENCH_INFO).is_file())


def finished_everywhere(folders: list[Path]) -> list[str]:
    """Subjects scored (or failed) in every bench folder."""
    def finished(folder: Path) -> set[str]:
        return {p.name for p in (folder / "subjects").glob("*")
                if (p / "scores.json").is_file() or (p / FAILED_NAME).is_file()}
    sets = [finished(f) for f in folders]
    return sorted(set.intersection(*sets)) if sets else []


def record_files(root: Path, folders: list[Path], subjects: list[str]) -> list[Path]:
    """The record's files (the bench `folders` under `root`, `subjects` finished in all of them), relative to `root`."""
    files = [root / name for name in TOP_FILES]
    for folder in folders:
        files += [folder / BENCH_INFO, folder / "results.json", folder / "results.csv"]
        for subject in subjects:
            files += [folder / "subjects" / subject / name for name in SUBJECT_FILES]
    return [f.relative_to(root) for f in files if f.is_file()]


def copy_files(files: list[Path], source: Path, target: Path, overwrite: bool) -> int:
    copied = 0
    for rel in files:
        destination = target / rel
        if destination.exists() and not overwrite:
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, destination)
        copied += 1
    return copied


def save(root: Path, record: Path) -> str:
    """Copy the record of the bench at `root` to `record` (the record's older copies replaced)."""
    folders = bench_folders(root)
    if not folders:
        raise SystemExit(f"{root}: no bench folder (bench.json) here or one level down")
    subjects = finished_everywhere(folders)
    copied = copy_files(record_files(root, folders, subjects), root, record, overwrite=True)
    return f"{len(subjects)} subjects finished in all {len(folders)} bench folders; {copied} files to {record}"


def restore(record: Path, root: Path) -> str:
    """Copy a saved record into the bench at `root`, keeping every file already there."""
    if not record.is_dir() or not bench_folders(record):
        raise SystemExit(f"{record}: no saved record (bench.json) here or one level down")
    files = [p.relative_to(record) for p in sorted(record.rglob("*")) if p.is_file()]
    copied = copy_files(files, record, root, overwrite=False)
    for folder in bench_folders(root):
        relocate_references(folder)
    return f"{copied} of {len(files)} files restored to {root} (the others were there already)"


def relocate_references(folder: Path) -> None:
    """A mini bench folder's bench.json names its references by absolute path (out/references, which the bench draws
    again from the seed): restored elsewhere, it names the new place, or the bench would refuse the folder."""
    info_path = folder / BENCH_INFO
    info = json.loads(info_path.read_text())
    if "references" in info and Path(info["references"]).name == "references":
        here = str(folder.resolve().parent / "references")
        if info["references"] != here:
            info_path.write_text(json.dumps({**info, "references": here}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("source", type=Path, help="save: the bench's output folder; restore: the record")
    parser.add_argument("target", type=Path, help="save: where the record goes; restore: the bench's output folder")
    args = parser.parse_args(argv)
    if args.action == "save" and not args.source.is_dir():
        raise SystemExit(f"{args.source}: no such bench folder")
    print(save(args.source, args.target) if args.action == "save" else restore(args.source, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
