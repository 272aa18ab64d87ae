"""benchmarks/bracket_table.py: every cell of a learning-rate x budget bracket, and the rule's choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script


def load_bracket():
    return load_script("benchmarks/bracket_table.py")


def write_cell(root: Path, lr: str, cell: str, subjects: dict[str, list[tuple[float, float]]]) -> None:
    """subjects: name -> per image (identity_kept, prompt_ok)."""
    for name, images in subjects.items():
        folder = root / f"lr-{lr}" / cell / "subjects" / name
        folder.mkdir(parents=True)
        rows = [{"subject": name, "prompt": f"p{i}", "file": f"{i}.png", "dino": 0.5, "clip_i": 0.5, "clip_t": 0.5,
                 "extra": {"identity_kept": ik, "prompt_ok": ok}} for i, (ik, ok) in enumerate(images)]
        (folder / "scores.json").write_text(json.dumps(rows))


def test_rule_takes_the_best_mean_harmonic_and_the_smaller_rate_on_a_tie(tmp_path, capsys):
    bracket = load_bracket()
    # H per subject, averaged: a = mean of H(1, 1) = 1 and H(0, 1) = 0 -> 0.5; the mean-of-means H would be 0.667.
    write_cell(tmp_path, "1e-4", "dpg@400", {"a": [(1, 1)], "b": [(0, 1)]})
    write_cell(tmp_path, "2e-4", "dpg@400", {"a": [(1, 1)], "b": [(0.5, 1)]})  # H 0.833: better
    write_cell(tmp_path, "1e-4", "dreambooth@400", {"a": [(1, 1)], "b": [(0.5, 1)]})
    write_cell(tmp_path, "2e-4", "dreambooth@400", {"a": [(1, 1)], "b": [(0.5, 0.999)]})  # within the tie: the smaller wins
    write_cell(tmp_path, "1e-4", "rpo@400", {"a": [(1, 1)], "b": [(1, 1)]})  # 2e-4 unfinished: 1 of 2 subjects
    write_cell(tmp_path, "2e-4", "rpo@400", {"a": [(1, 1)]})
    write_cell(tmp_path, "2e-4", "dpg@800", {"a": [(1, 1)], "b": [(1, 1)]})  # another budget: shown, not compared
    out_json = tmp_path / "bracket.json"
    assert bracket.main([str(tmp_path), "--subjects", "2", "--lrs", "1e-4,2e-4", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    chosen = json.loads(out_json.read_text())["chosen"]
    assert chosen == {"dpg": 2e-4, "dreambooth": 1e-4}
    assert "rpo: undecided, waiting for learning rate 0.0002" in out
    cells = {(c["method"], c["lr"], c["budget"]): c for c in json.loads(out_json.read_text())["cells"]}
    assert abs(cells[("dpg", 1e-4, 400)]["harmonic"] - 0.5) < 1e-9
    assert "| dpg | 0.0002 | 800 | 2/2 |" in out


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    assert load_bracket().main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err


def test_a_bracket_run_in_phases_is_read_as_one_and_an_edge_is_named(tmp_path, capsys):
    long, short = tmp_path / "long", tmp_path / "short"
    write_cell(long, "1e-4", "dpg@400", {"a": [(0.2, 1)], "b": [(0.2, 1)]})
    write_cell(long, "1e-4", "dpg@1600", {"a": [(0.9, 1)], "b": [(0.9, 1)]})
    write_cell(long, "2e-4", "dpg@400", {"a": [(1, 1)]})  # unfinished here (a killed phase) ...
    write_cell(short, "2e-4", "dpg@400", {"a": [(0.5, 1)], "b": [(0.5, 1)]})  # ... finished in the other folder
    write_cell(short, "1e-4", "dpg@400", {"a": [(0, 1)], "b": [(0, 1)]})  # also finished in the first: the first's kept
    out_json = tmp_path / "bracket.json"
    assert load_bracket().main([str(long), str(short), "--subjects", "2", "--lrs", "1e-4,2e-4", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    cells = {(c["method"], c["lr"], c["budget"]): c for c in result["cells"]}
    assert cells[("dpg", 2e-4, 400)]["subjects"] == 2 and abs(cells[("dpg", 2e-4, 400)]["identity_kept"] - 0.5) < 1e-9
    assert abs(cells[("dpg", 1e-4, 400)]["identity_kept"] - 0.2) < 1e-9 and ("dpg", 1e-4, 1600) in cells
    assert result["chosen"] == {"dpg": 2e-4} and result["at_edge"] == {"dpg": "largest"}
    assert "the bracket's largest rate: its edge" in capsys.readouterr().out


def test_a_methods_best_cell_over_rates_and_budgets_waits_for_its_whole_grid(tmp_path, capsys):
    for lr, budget, identity in (("1e-4", 400, 0.2), ("2e-4", 400, 0.4), ("1e-4", 1600, 0.8), ("2e-4", 1600, 0.6)):
        write_cell(tmp_path, lr, f"dreambooth@{budget}", {"a": [(identity, 1)], "b": [(identity, 1)]})
    write_cell(tmp_path, "1e-4", "dreambooth@800", {"a": [(0.8, 1)], "b": [(0.8, 1)]})  # ties the 1600 cell: fewer steps
    out_json = tmp_path / "bracket.json"
    args = [str(tmp_path), "--subjects", "2", "--lrs", "1e-4,2e-4", "--best", "dreambooth", "--json", str(out_json)]
    assert load_bracket().main(args) == 0
    assert "dreambooth at its best: waiting for lr 0.0002 at 800" in capsys.readouterr().out
    write_cell(tmp_path, "2e-4", "dreambooth@800", {"a": [(0.5, 1)], "b": [(0.5, 1)]})
    assert load_bracket().main(args) == 0
    assert "dreambooth at its best: learning rate 0.0001 at 800 steps" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["best"] == {"dreambooth": {"lr": 1e-4, "budget": 800}}


def chosen_rates(doc: str, section: str) -> dict[str, float]:
    """The "**Chosen**" table of a bracket's section in a doc: method -> learning rate."""
    text = doc.split(section, 1)[1].split("\n## ", 1)[0]
    table = text.split("**Chosen**", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    return {method.strip(): float(rate) for method, rate in rows}


@pytest.mark.parametrize("doc, section, model, methods", [
    ("minibench.md", "## Bracket round 2", "mini", {"dreambooth", "dreambooth-select", "dpg", "rpo"}),
    ("minibench.md", "## mini-flow: tuning", "mini-flow", {"dreambooth", "dreambooth-select", "dpg", "rpo"}),
])
def test_the_minibench_rates_are_the_ones_the_bracket_chose(doc, section, model, methods):
    """Each method's (and a variant's) MiniBench learning rate on each model is the one its bracket's record names as
    chosen: code and the record of its evidence cannot drift apart."""
    from rewardbooth.mini.bench import method_config

    chosen = chosen_rates((Path(__file__).parents[1] / "docs" / doc).read_text(), section)
    assert set(chosen) == methods
    for method, rate in chosen.items():
        assert method_config(method, None, {"model.name": model}).train.learning_rate == rate, method
