"""A MiniBench learning-rate x budget bracket as one table, and the choice its rule makes (docs/minibench.md).

    python benchmarks/bracket_table.py runs/bracket2                 # lr-*/ folders of `bench --suite mini --budgets ...`
    python benchmarks/bracket_table.py runs/bracket2 --budget 400 --json bracket.json
    python benchmarks/bracket_table.py runs/bracket2 runs/bracket2-short   # one bracket run in phases: cells merged

Every cell (method x learning rate x budget): subjects scored, mean identity_kept (I), prompt_ok (P) and
H = 2 I P / (I + P) per subject, averaged over subjects. The rule (fixed before bracket round 2 ran): a method's
learning rate is the one with the highest mean H at --budget; within --tie of the best, the smaller learning rate;
a method is decided only once its cell at every bracketed learning rate (--lrs) has every subject scored. A choice
at either end of the bracket is said to be one (the LoRA suite's rule then extends the bracket on that side).
Several folders: a cell found in more than one is taken from the first where it is finished.
`--best dreambooth` also names the method's best cell over every learning rate and budget ("DreamBooth at its best",
docs/minibench.md: the highest mean H; within --tie, the fewer steps, then the smaller rate), once every cell of its
grid is finished.
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


def merged_cells(brackets: list[Path], subjects: int) -> list[dict]:
    """Every folder's cells; a (method, lr, budget) cell in several folders from the first that has it finished
    (else the first that has it)."""
    kept: dict[tuple, dict] = {}
    for cell in (c for bracket in brackets for c in read_cells(bracket)):
        key = (cell["method"], cell["lr"], cell["budget"])
        if key not in kept or (kept[key]["subjects"] < subjects <= cell["subjects"]):
            kept[key] = cell
    return list(kept.values())


def edge(lr: float, lrs: list[float]) -> str | None:
    """'smallest' or 'largest' where `lr` is at an end of the bracket."""
    return "smallest" if math.isclose(lr, min(lrs)) else "largest" if math.isclose(lr, max(lrs)) else None


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


def best_cell(cells: list[dict], method: str, subjects: int, tie: float, lrs: list[float]) -> tuple[dict | None, list]:
    """The method's best cell over every bracketed rate and every budget it has anywhere (highest mean H; within `tie`,
    fewer steps, then the smaller rate), once each of those cells has all `subjects`; else (None, the cells missing)."""
    mine = [c for c in cells if c["method"] == method]
    grid = [(lr, b) for lr in lrs for b in sorted({c["budget"] for c in mine})]
    finished = {(c["lr"], c["budget"]): c for c in mine if c["subjects"] == subjects}
    missing = [(lr, b) for lr, b in grid if not any(math.isclose(lr, l) and b == bb for l, bb in finished)]
    if missing or not mine:
        return None, missing
    top = max(c["harmonic"] for c in finished.values())
    return min((c for c in finished.values() if c["harmonic"] >= top - tie), key=lambda c: (c["budget"], c["lr"])), []


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
    parser.add_argument("brackets", type=Path, nargs="+", help="folder(s) holding lr-<value>/ bench folders")
    parser.add_argument("--budget", type=int, default=400, help="the budget the rule compares at (default 400)")
    parser.add_argument("--subjects", type=int, default=8, help="subjects a finished cell has (default 8)")
    parser.add_argument("--lrs", default="1e-4,2e-4,4e-4,8e-4", help="the bracketed learning rates (default: round 2's)")
    parser.add_argument("--tie", type=float, default=0.005, help="within this of the best H, the smaller learning rate wins")
    parser.add_argument("--best", default="", help="comma-separated methods whose best cell over every rate and budget "
                        "is named (e.g. dreambooth: DreamBooth at its best)")
    parser.add_argument("--json", type=Path, help="also write the cells and the choices here")
    args = parser.parse_args(argv)
    missing = [str(b) for b in args.brackets if not b.is_dir()]
    if missing:
        print(f"bracket_table: {', '.join(missing)} is not a folder", file=sys.stderr)
        return 2
    cells = merged_cells(args.brackets, args.subjects)
    if not cells:
        print(f"bracket_table: no lr-*/METHOD@BUDGET folders under {', '.join(map(str, args.brackets))}", file=sys.stderr)
        return 2
    lrs = [float(v) for v in args.lrs.split(",")]
    chosen, waiting = choose(cells, args.budget, args.subjects, args.tie, lrs)
    print(table(cells, chosen, args.subjects))
    for method, cell in chosen.items():
        at_edge = edge(cell["lr"], lrs)
        print(f"{method}: learning rate {cell['lr']:g} (H {cell['harmonic']:.3f} at {args.budget} steps)"
              + (f"; the bracket's {at_edge} rate: its edge" if at_edge else ""))
    for method, missing in waiting.items():
        print(f"{method}: undecided, waiting for learning rate {', '.join(f'{lr:g}' for lr in missing)} at {args.budget} steps")
    best = {}
    for method in filter(None, (m.strip() for m in args.best.split(","))):
        cell, missing_cells = best_cell(cells, method, args.subjects, args.tie, lrs)
        if cell is None:
            print(f"{method} at its best: waiting for {', '.join(f'lr {lr:g} at {b}' for lr, b in missing_cells) or 'any cell'}")
            continue
        best[method] = {"lr": cell["lr"], "budget": cell["budget"]}
        print(f"{method} at its best: learning rate {cell['lr']:g} at {cell['budget']} steps (H {cell['harmonic']:.3f}, "
              f"identity_kept {cell['identity_kept']:.3f}, prompt_ok {cell['prompt_ok']:.3f})")
    if args.json:
        args.json.write_text(json.dumps({"cells": cells, "chosen": {m: c["lr"] for m, c in chosen.items()},
                                           "at_edge": {m: edge(c["lr"], lrs) for m, c in chosen.items() if edge(c["lr"], lrs)},
                                           "waiting": waiting, "best": best}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
