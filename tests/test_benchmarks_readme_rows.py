"""benchmarks/readme_rows.py: README's MiniBench rows read from paired.json, at equal steps and at equal seconds."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


def difference(mean: float, low: float, high: float, won: int, lost: int, verdict: str) -> dict:
    return {"mean": mean, "ci95_low": low, "ci95_high": high, "stderr": 0.01, "won": won, "lost": lost, "subjects": won + lost,
            "verdict": verdict}


def table(**methods) -> dict:
    return {"baseline": "dreambooth", "interval": "95%", "differences": methods}


def write_set(folder, shift: float) -> None:
    at = lambda m: {"identity_kept": difference(m, m - 0.05, m + 0.05, 15, 8, "better" if m - 0.05 > 0 else "no detectable difference"),
                    "prompt_ok": difference(-0.01, -0.03, 0.01, 10, 12, "no detectable difference")}
    folder.mkdir()
    paired = {"baseline": "dreambooth", "budgets": {"400": table(dpg=at(0.1 + shift), rpo=at(0.02 + shift))},
              "equal_seconds": {"baseline": "dreambooth", "budgets": {"400": {
                  "dpg": {**table(dpg=at(0.03 + shift)), "how": "interpolated", "outside": 2, "clock": "cpu"}}}}}
    (folder / "paired.json").write_text(json.dumps(paired))


def test_rows_go_method_by_method_and_say_the_verdict(tmp_path, capsys):
    write_set(tmp_path / "s0", 0.0)
    write_set(tmp_path / "s1", 0.2)
    assert load_script("benchmarks/readme_rows.py").main([f"0={tmp_path / 's0'}", f"1={tmp_path / 's1'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [
        "| dpg | 0 | **+0.100** [+0.050, +0.150], 15/8: better | -0.010 [-0.030, +0.010]: no detectable difference |",
        "| dpg | 1 | **+0.300** [+0.250, +0.350], 15/8: better | -0.010 [-0.030, +0.010]: no detectable difference |",
        "| rpo | 0 | +0.020 [-0.030, +0.070], 15/8: no detectable difference | -0.010 [-0.030, +0.010]: no detectable difference |",
        "| rpo | 1 | **+0.220** [+0.170, +0.270], 15/8: better | -0.010 [-0.030, +0.010]: no detectable difference |"]


def test_equal_seconds_rows_name_the_budget_and_the_subjects_left_out(tmp_path, capsys):
    write_set(tmp_path / "s0", 0.0)
    merged = tmp_path / "merged"
    merged.mkdir()  # what `bench --merge A B --curve C@*` writes: one table per merged folder's label
    (merged / "paired.json").write_text(json.dumps({"equal_seconds": {"dpg@800": {
        **table(**{"dpg@800": {"identity_kept": difference(-0.2, -0.3, -0.1, 3, 20, "worse"),
                               "prompt_ok": difference(0.0, -0.1, 0.1, 11, 11, "no detectable difference")}}),
        "how": "interpolated", "outside": 1, "clock": "cpu"}}}))
    assert load_script("benchmarks/readme_rows.py").main([f"0={tmp_path / 's0'}", f"2={merged}", "--equal-seconds"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("| subjects left out |")
    assert out[2:] == [
        "| dpg@400 | 0 | +0.030 [-0.020, +0.080], 15/8: no detectable difference | -0.010 [-0.030, +0.010]: no detectable difference | 2 |",
        "| dpg@800 | 2 | **-0.200** [-0.300, -0.100], 3/20: worse | +0.000 [-0.100, +0.100]: no detectable difference | 1 |"]


def test_a_missing_budget_or_folder_is_one_line(tmp_path, capsys):
    write_set(tmp_path / "s0", 0.0)
    script = load_script("benchmarks/readme_rows.py")
    with pytest.raises(SystemExit, match=r"no pairing at 800 steps \(it has 400\)"):
        script.main([f"0={tmp_path / 's0'}", "--budget", "800"])
    with pytest.raises(SystemExit, match="nowhere/paired.json does not exist"):
        script.main([f"0={tmp_path / 'nowhere'}/paired.json"])
    with pytest.raises(SystemExit, match=r"s0 \(set 0\): dpg has no dino"):
        script.main([f"0={tmp_path / 's0'}", "--metrics", "identity_kept,dino"])
    assert capsys.readouterr().out == ""  # nothing half-printed before the error


def test_each_methods_sentence_follows_the_rule_fixed_before_the_runs(tmp_path, capsys):
    """beats: identity better with prompt not worse at some budget; loses: identity better only where prompt is worse,
    or worse everywhere; else ties; a budget with more subjects outside the baseline's seconds than inside is not judged."""
    cells = {"better": (0.1, 0.05, 0.15), "worse": (-0.15, -0.2, -0.1), NO: (0.0, -0.05, 0.05)}

    def at(identity: str, prompt: str, outside: int = 0) -> dict:
        return {**table(x={"identity_kept": difference(*cells[identity], 15, 5, identity),
                           "prompt_ok": difference(*cells[prompt], 10, 10, prompt)}),
                "how": "interpolated", "outside": outside, "clock": "cpu"}

    labels = {"dpg@200": at(NO, NO), "dpg@400": at("better", NO),  # beats at 400
              "rpo@400": at("better", "worse"), "rpo@800": at(NO, NO),  # identity bought with the prompt: loses
              "sel@400": at("worse", NO), "sel@800": at("worse", NO),  # worse everywhere: loses
              "mix@400": at("worse", NO), "mix@800": at(NO, "better"),  # ties
              "far@800": at("better", NO, outside=21)}  # 21 outside, 20 inside: not judged
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "paired.json").write_text(json.dumps({"equal_seconds": {
        label: {**t, "differences": {label: t["differences"]["x"]}} for label, t in labels.items()}}))
    assert load_script("benchmarks/readme_rows.py").main([f"2={merged}", "--sentences", "the best-tuned DreamBooth"]) == 0
    better, worse, tie = "+0.100 [+0.050, +0.150]", "-0.150 [-0.200, -0.100]", "+0.000 [-0.050, +0.050]"
    assert capsys.readouterr().out.splitlines() == [
        f"set 2: dpg beats the best-tuned DreamBooth at equal compute (at 400 steps identity_kept {better}, prompt_ok {NO}).",
        f"set 2: rpo loses to the best-tuned DreamBooth at equal compute (at 400 steps identity_kept {better}, prompt_ok worse).",
        f"set 2: sel loses to the best-tuned DreamBooth at equal compute (at 400 steps identity_kept {worse}, prompt_ok {NO}; "
        f"at 800 steps identity_kept {worse}, prompt_ok {NO}).",
        f"set 2: mix ties with the best-tuned DreamBooth at equal compute (at 400 steps identity_kept {worse}, prompt_ok {NO}; "
        f"at 800 steps identity_kept {tie}, prompt_ok better).",
        "set 2: far is not judged against the best-tuned DreamBooth at equal compute (at each budget, more subjects lie "
        "outside its measured seconds than inside)."]


NO = "no detectable difference"
