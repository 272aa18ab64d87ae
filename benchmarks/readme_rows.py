"""README's MiniBench tables from the benches' paired.json files, so the published rows are read, not retyped.

    python benchmarks/readme_rows.py 0=runs/set0-final 1=runs/set1-final                  # paired at 400 steps
    python benchmarks/readme_rows.py 2=runs/set2 --budget 800
    python benchmarks/readme_rows.py 0=runs/set0-final 1=runs/set1-final --equal-seconds  # at DreamBooth's seconds
    python benchmarks/readme_rows.py 2=runs/set2-merged --equal-seconds                   # a `bench --merge ... --curve` folder

Each SET=FOLDER names a bench folder (or its paired.json); rows go method by method, set by set, each cell the mean
difference from the baseline, its 95% interval, subjects won/lost and the verdict (the mean in bold where the verdict
is not "no detectable difference"). --equal-seconds reads the pairing at equal seconds instead (the method at --budget
steps against the baseline interpolated at its seconds; a mini bench's `equal_seconds`, or every pairing a
`--merge ... --curve` wrote) and adds the subjects left out as outside the baseline's measured seconds.

    python benchmarks/readme_rows.py 2=runs/set2-vs-best --sentences "the best-tuned DreamBooth"

--sentences prints, per method, README's sentence from the equal-seconds pairing, by the rule fixed in
docs/minibench.md before the runs: it beats the baseline if at some budget identity_kept is better and prompt_ok not
worse; it loses if identity_kept is better only where prompt_ok is worse, or worse at every budget; else it ties (a
budget with more subjects outside the baseline's seconds than inside is not judged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rewardbooth.evaluation.paired import NO_DIFFERENCE, difference_cells


def cell(d: dict, with_counts: bool) -> str:
    """One difference in one README cell, formatted as the bench prints it."""
    printed = difference_cells(d)
    mean = printed["mean diff"] if d["verdict"] == NO_DIFFERENCE else f"**{printed['mean diff']}**"
    counts = f", {printed['won/lost']}" if with_counts else ""
    return f"{mean} {printed['95% CI']}{counts}: {printed['verdict']}"


def pairings(paired: dict, budget: str, equal_seconds: bool) -> list[tuple[str, str, dict]]:
    """(row label, method, table): the table holds `baseline` and `differences` {method: {metric: difference}}."""
    if not equal_seconds:
        tables = paired["budgets"] if "budgets" in paired else {"final": paired}
        if budget not in tables:
            raise SystemExit(f"no pairing at {budget} steps (it has {', '.join(tables)})")
        table = tables[budget]
        return [(method, method, table) for method in table["differences"]]
    seconds = paired.get("equal_seconds") or {}
    if "budgets" in seconds and budget not in seconds["budgets"]:
        raise SystemExit(f"no equal-seconds pairing at {budget} steps (it has {', '.join(seconds['budgets'])})")
    return [row for row in equal_seconds_tables(paired) if "budgets" not in seconds or row[0] == f"{row[1]}@{budget}"]


def equal_seconds_tables(paired: dict) -> list[tuple[str, str, dict]]:
    """Every equal-seconds pairing as (label METHOD@BUDGET, the method's key in the table, the table)."""
    seconds = paired.get("equal_seconds")
    if not seconds:
        raise SystemExit("no equal-seconds pairing in this paired.json")
    if "budgets" in seconds:  # a mini bench: {budgets: {budget: {method: table}}}
        return [(f"{method}@{budget}", method, table) for budget, tables in seconds["budgets"].items()
                for method, table in tables.items()]
    return [(label, label, table) for label, table in seconds.items()]  # a --merge ... --curve: {label: table}


def read_paired(name: str, folder: Path) -> dict:
    """Set `name`'s paired.json: FOLDER/paired.json, or FOLDER itself where it is the file."""
    path = folder / "paired.json" if folder.is_dir() else folder
    if not path.is_file():
        raise SystemExit(f"{path} does not exist (set {name})")
    return json.loads(path.read_text())


def rows(sets: list[tuple[str, Path]], budget: str, equal_seconds: bool, metrics: list[str]) -> list[str]:
    by_method: dict[str, list[str]] = {}
    for name, folder in sets:
        for label, method, table in pairings(read_paired(name, folder), budget, equal_seconds):
            differences = table["differences"][method]
            missing = [m for m in metrics if m not in differences]
            if missing:
                raise SystemExit(f"{folder} (set {name}): {method} has no {', '.join(missing)}")
            cells = [cell(differences[m], with_counts=i == 0) for i, m in enumerate(metrics)]
            if equal_seconds:  # subjects outside the baseline's measured seconds are left out, never extrapolated
                cells.append(str(table["outside"]))
            by_method.setdefault(label, []).append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return [row for method_rows in by_method.values() for row in method_rows]


def split_label(label: str) -> tuple[str, str]:
    """"dpg@400" -> ("dpg", "400"); a label without a budget is its method at its only budget."""
    method, _, budget = label.partition("@")
    return method, budget or "final"


def verdicts(paired: dict) -> dict[str, tuple[str, list[tuple[str, dict]]]]:
    """README's sentence per method, by the rule in docs/minibench.md ("README's sentence per method"), from an
    equal-seconds pairing: {method: (beats | ties | loses | not judged, the deciding budgets' (budget, differences))}.
    A budget with more subjects outside the baseline's seconds than inside is not judged."""
    per_method: dict[str, list[tuple[str, dict]]] = {}
    for label, method_label, table in equal_seconds_tables(paired):
        differences = table["differences"][method_label]
        method, budget = split_label(label)
        judged = per_method.setdefault(method, [])
        if table["outside"] <= differences["identity_kept"]["subjects"]:
            judged.append((budget, differences))
    result: dict[str, tuple[str, list[tuple[str, dict]]]] = {}
    for method, judged in per_method.items():
        if not judged:
            result[method] = ("not judged", [])
            continue
        identity = {b: d["identity_kept"]["verdict"] for b, d in judged}
        prompt = {b: d["prompt_ok"]["verdict"] for b, d in judged}
        wins = [(b, d) for b, d in judged if identity[b] == "better" and prompt[b] != "worse"]
        traded = [(b, d) for b, d in judged if identity[b] == "better"]  # here prompt_ok is worse at each (no win)
        if wins:
            result[method] = ("beats", wins)
        elif traded:
            result[method] = ("loses", traded)
        elif all(v == "worse" for v in identity.values()):
            result[method] = ("loses", judged)
        else:
            result[method] = ("ties", judged)
    return result


VERBS = {"beats": "beats", "ties": "ties with", "loses": "loses to"}


def sentence(method: str, verdict: str, deciding: list[tuple[str, dict]], baseline: str) -> str:
    if not deciding:
        return (f"{method} is not judged against {baseline} at equal compute (at each budget, more subjects lie outside "
                "its measured seconds than inside).")
    printed = [(b, difference_cells(d["identity_kept"]), d["prompt_ok"]["verdict"]) for b, d in deciding]
    cells = "; ".join(f"at {b} steps identity_kept {identity['mean diff']} {identity['95% CI']}, prompt_ok {prompt}"
                      for b, identity, prompt in printed)
    return f"{method} {VERBS[verdict]} {baseline} at equal compute ({cells})."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", help="SET=FOLDER: a bench folder or its paired.json, named by its subject set")
    parser.add_argument("--budget", default="400", help="the steps paired (default 400)")
    parser.add_argument("--equal-seconds", action="store_true", help="the pairing at equal seconds instead of equal steps")
    parser.add_argument("--metrics", default="identity_kept,prompt_ok")
    parser.add_argument("--sentences", metavar="BASELINE", help="instead of rows: per method whether it beats, ties or "
                        "loses BASELINE (e.g. 'the best-tuned DreamBooth') at equal seconds, by docs/minibench.md's rule")
    args = parser.parse_args(argv)
    sets = []
    for item in args.sets:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"{item!r}: give SET=FOLDER, e.g. 0=runs/set0")
        sets.append((name, Path(folder)))
    if args.sentences:
        for name, folder in sets:
            for method, (verdict, deciding) in verdicts(read_paired(name, folder)).items():
                print(f"set {name}: " + sentence(method, verdict, deciding, args.sentences))
        return 0
    metrics = args.metrics.split(",")
    body = rows(sets, args.budget, args.equal_seconds, metrics)
    what = "at equal seconds" if args.equal_seconds else f"at {args.budget} steps"
    columns = [f"{m} (95% CI{', subjects won/lost' if i == 0 else ''})" for i, m in enumerate(metrics)]
    columns += ["subjects left out"] if args.equal_seconds else []
    print(f"| paired with DreamBooth {what} | set | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
