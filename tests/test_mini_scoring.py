"""The attribute checks behind MiniBench's interpretable numbers, on hand-made predictions."""

from __future__ import annotations

import math

from rewardbooth.evaluation.metrics import ImageScore, summarize
from rewardbooth.mini.scoring import ATTRIBUTE_METRICS, attribute_checks
from rewardbooth.mini.world import MiniSubject, PromptSpec, subject_prompts


def _subject() -> MiniSubject:
    return MiniSubject("s", "cube", "red", "striped", [], "cube")


def _spec(modifier: str | None = None, context: str | None = None) -> PromptSpec:
    return next(s for s in subject_prompts(_subject()) if s.modifier == modifier and s.context == context)


def seen(shape="cube", colour="red", pattern="striped", context="beach", size="medium") -> dict[str, str]:
    return {"shape": shape, "colour": colour, "pattern": pattern, "context": context, "size": size}


def test_context_prompt_checks_identity_and_context():
    spec = _spec(context="beach")
    checks = attribute_checks(seen(), spec)
    assert {k: v for k, v in checks.items() if k != "modifier_ok"} == {
        "shape_kept": 1.0, "colour_kept": 1.0, "pattern_kept": 1.0, "identity_kept": 1.0, "context_ok": 1.0, "prompt_ok": 1.0}
    checks = attribute_checks(seen(colour="blue", context="snow"), spec)
    assert checks["colour_kept"] == 0.0 and checks["identity_kept"] == 0.0 and checks["shape_kept"] == 1.0
    assert checks["context_ok"] == 0.0 and checks["prompt_ok"] == 0.0
    assert math.isnan(checks["modifier_ok"])  # a context prompt asks for no modifier


def test_recolour_prompt_wants_the_new_colour_and_not_the_old():
    spec = _spec(modifier="recolour")
    new_colour = spec.expected_colour
    assert new_colour != "red"
    good = attribute_checks(seen(colour=new_colour, context="plain"), spec)
    assert math.isnan(good["colour_kept"]) and good["identity_kept"] == 1.0  # colour is not part of identity here
    assert good["modifier_ok"] == 1.0 and good["prompt_ok"] == 1.0 and math.isnan(good["context_ok"])
    stale = attribute_checks(seen(colour="red", context="plain"), spec)  # ignored the prompt, copied the subject
    assert stale["modifier_ok"] == 0.0 and stale["prompt_ok"] == 0.0 and stale["identity_kept"] == 1.0


def test_size_and_upside_down_prompts():
    big = _spec(modifier="big")
    assert attribute_checks(seen(size="big"), big)["modifier_ok"] == 1.0
    assert attribute_checks(seen(size="small"), big)["modifier_ok"] == 0.0
    flipped = _spec(modifier="upside down")
    checks = attribute_checks(seen(), flipped)  # the judge does not classify orientation: nothing prompted to check
    assert math.isnan(checks["prompt_ok"]) and checks["identity_kept"] == 1.0


def test_summaries_skip_checks_that_do_not_apply():
    rows = [ImageScore("s", "p", f"{i}.png", 0.5, 0.5, 0.5, attribute_checks(seen(**kw), spec))
            for i, (kw, spec) in enumerate([({}, _spec(context="beach")), ({"colour": "red"}, _spec(modifier="recolour"))])]
    overall = summarize(rows)[0]
    assert set(ATTRIBUTE_METRICS) <= set(overall)
    assert overall["context_ok"] == 1.0  # only the beach image is judged on context
    assert overall["modifier_ok"] == 0.0  # only the recolour image is judged on a modifier
    assert overall["prompt_ok"] == 0.5
    assert overall["colour_kept"] == 1.0  # the recolour image does not count against colour fidelity
