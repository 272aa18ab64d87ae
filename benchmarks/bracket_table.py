"""A MiniBench learning-rate x budget bracket as one table, and the choice its rule makes (docs/minibench.md).

    python benchmarks/bracket_table.py runs/bracket2                 # lr-*/ folders of `bench --suite mini --budgets ...`
    python benchmarks/bracket_table.py runs/bracket2 --budget 400 --json bracket.json

Every cell (method x learning rate x budget): subjects scored, mean identity_kept (I), prompt_ok (P) and
H = 2 I P / (I + P) per subject, averaged over subjects. The rule (fixed before bracket round 2 ran): a method's
learning rate is the one with the highest mean H at --budget; within --tie of the best, the smaller learning rate;
a method is decided only once its cell at every bracketed learning rate (--lrs) has every subject scored.
Reads the subjects' scores (it writes nothing into the bracket's folders, which a running bench may own).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from rewardbooth.evaluation.bench import load_scores
from rewardbooth.evaluation.metrics import summarize
from rewardbooth.rewards.base import harmonic_reward

LR_FOLDER = re.compile(r"^lr-(?P<lr>[0-9.eE+-]+)$")
CELL_FOLDER = re.compile(r"^(?P<method>.+)@(?P<budget>\d+)$")


def harmonic(identity: float, prompt: float) -> float:
    """lambda-Harmonic at lambda 0.5: 2 I P / (I + P), 0 where either is 0."""
    return harmonic_reward(torch.tensor(identity, dtype=torch.float64), torch.tensor(prompt, dtype=torch.float64), 0.5).item()


def read_cells(bracket: Path) -> list[dict]:
    """One row per (method, learning rate, budget) cell found under bracket/lr-*/method@budget/."""
    cells = []
    for lr_dir in sorted(p for p in bracket.iterdir() if p.is_dir() and LR_FOLDER.match(p.name)):
        lr = float(LR_FOLDER.match(lr_dir.name)["lr"])
        for cell_dir in sorted(p for p in lr_dir.iterdir() if p.is_dir() and CELL_FOLDER.match(p.name)):
            match = CELL_FOLDER.match(cell_dir.name)
            rows = summarize(load_scores(cell_dir), "subject") if (cell_dir / "subjects").is_dir() else []
            rows = [r for r in rows if not (math.isnan(r["identity_kept"]) or math.isnan(r["prompt_ok"]))]
            n = len(rows)
            mean = (lambda values: sum(values) / n) if n else (lambda values: float("nan"))
            cells.append({"method": match["method"], "lr": lr, "budget": int(match["budget"]), "subjects": n,
                          "identity_kept": mean([r["identity_kept"] for r in rows]), "prompt_ok": mean([r["prompt_ok"] for r in rows]),
                          "harmonic": mean([harmonic(r["identity_kept"], r["prompt_ok"]) for r in rows])})
    return cells


def choose(cells: list[dict], budget: int, subjects: int, tie: float, lrs: list[float]) -> tuple[dict[str, dict], dict[str, list]]:
    """Per method: the rule's learning rate at `budget` once every one of `lrs` has all `subjects` scored there;
    else the learning rates it still waits for."""
    chosen, waiting = {}, {}
    for method in dict.fromkeys(c["method"] for c in cells):
        complete = {c["lr"]: c for c in cells if c["method"] == method and c["budget"] == budget and c["subjects"] == subjects}
        missing = [lr for lr in lrs if not any(math.isclose(lr, done) for done in complete)]
        if missing:
            waiting[method] = missing
            continue
        best = max(c["harmonic"] for c in complete.values())
        chosen[method] = min((c for c in complete.values() if c["harmonic"] >= best - tie), key=lambda c: c["lr"])
    return chosen, waiting


def table(cells: list[dict], chosen: dict[str, dict], subjects: int) -> str:
    lines = ["| method | lr | budget | subjects | identity_kept | prompt_ok | H (mean over subjects) | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in sorted(cells, key=lambda c: (c["method"], c["lr"], c["budget"])):
        mark = "**chosen**" if chosen.get(c["method"]) is c else ("unfinished" if c["subjects"] < subjects else "")
        lines.append(f"| {c['method']} | {c['lr']:g} | {c['budget']} | {c['subjects']}/{subjects} | {c['identity_kept']:.3f} | "
                     f"{c['prompt_ok']:.3f} | {c['harmonic']:.3f} | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bracket", type=Path, help="folder holding lr-<value>/ bench folders")
    parser.add_argument("--budget", type=int, default=400, help="the budget the rule compares at (default 400)")
    parser.add_argument("--subjects", type=int, default=8, help="subjects a finished cell has (default 8)")
    parser.add_argument("--lrs", default="1e-4,2e-4,4e-4,8e-4", help="the bracketed learning rates (default: round 2's)")
    parser.add_argument("--tie", type=float, default=0.005, help="within this of the best H, the smaller learning rate wins")
    parser.add_argument("--json", type=Path, help="also write the cells and the choices here")
    args = parser.parse_args(argv)
    if not args.bracket.is_dir():
        print(f"bracket_table: {args.bracket} is not a folder", file=sys.stderr)
        return 2
    cells = read_cells(args.bracket)
    if not cells:
        print(f"bracket_table: no lr-*/METHOD@BUDGET folders under {args.bracket}", file=sys.stderr)
        return 2
    chosen, waiting = choose(cells, args.budget, args.subjects, args.tie, [float(v) for v in args.lrs.split(",")])
    print(table(cells, chosen, args.subjects))
    for method, cell in chosen.items():
        print(f"{method}: learning rate {cell['lr']:g} (H {cell['harmonic']:.3f} at {args.budget} steps)")
    for method, missing in waiting.items():
        print(f"{method}: undecided, waiting for learning rate {', '.join(f'{lr:g}' for lr in missing)} at {args.budget} steps")
    if args.json:
        args.json.write_text(json.dumps({"cells": cells, "chosen": {m: c["lr"] for m, c in chosen.items()}, "waiting": waiting}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
