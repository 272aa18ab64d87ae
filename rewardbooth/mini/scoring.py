"""The attribute judge: which shape, colour, pattern, context and size an image shows, and
whether that is what a MiniBench prompt asked for.

Per image, each check is 1.0 (right), 0.0 (wrong) or NaN (the prompt does not constrain it),
so means over images are accuracies over the prompts where the check applies:

- shape_kept, colour_kept, pattern_kept: the subject's own attribute survived (colour_kept is
  NaN for a recolour prompt, pattern_kept for a repattern prompt);
- identity_kept: all of the kept attributes at once (the strict subject-fidelity number);
- context_ok: the prompted context is drawn (context prompts only);
- modifier_ok: the prompted new colour / new pattern / size is drawn (modifier prompts only);
- prompt_ok: every attribute the prompt asked for is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from rewardbooth.mini.assets import MINI_NAME, mini_judge_path
from rewardbooth.mini.world import PromptSpec

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

ATTRIBUTE_METRICS = ("shape_kept", "colour_kept", "pattern_kept", "identity_kept", "context_ok", "modifier_ok", "prompt_ok")
NAN = float("nan")


class AttributeJudge:
    """An image classifier whose labels are "attribute=value", one softmax per attribute."""
    def __init__(self, model: str | Path = "mini", device: str = "cpu", batch_size: int = 128):
        from transformers import AutoImageProcessor, AutoModelForImageClassification


        path = mini_judge_path("attributes") if str(model) == MINI_NAME else Path(model)
        self.name = str(model)
        self.model = AutoModelForImageClassification.from_pretrained(path).eval().requires_grad_(False).to(device)
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.device, self.batch_size = device, batch_size
        self.groups: dict[str, list[tuple[int, str]]] = {}
        for index, label in sorted(self.model.config.id2label.items(), key=lambda kv: int(kv[0])):
            name, value = label.split("=", 1)
            self.groups.setdefault(name, []).append((int(index), value))

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """One {attribute: value} per image (the most likely value of each attribute)."""
        predictions: list[dict[str, str]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            logits = self.model(pixel_values=pixels).logits.float().cpu()
            for row in logits:
                predictions.append({name: max(options, key=lambda o: row[o[0]].item())[1] for name, options in self.groups.items()})
        return predictions


def _check(predicted: dict[str, str], attribute: str, expected: str | None) -> float:
    return NAN if expected is None else float(predicted[attribute] == expected)


def _all(values: list[float]) -> float:
    applicable = [v for v in values if not math.isnan(v)]
    return float(all(v == 1.0 for v in applicable)) if applicable else NAN


def attribute_checks(predicted: dict[str, str], spec: PromptSpec) -> dict[str, float]:
    """The ATTRIBUTE_METRICS of one image judged against the prompt it was generated for."""
    kept = {a: _check(predicted, a, getattr(spec, f"expected_{a}")) if a in spec.kept else NAN
            for a in ("shape", "colour", "pattern")}
    asked = spec.prompted
    context_ok = _check(predicted, "context", asked.get("context"))
    modifiers = [_check(predicted, a, v) for a, v in asked.items() if a != "context"]
    return {
        "shape_kept": kept["shape"],
        "colour_kept": kept["colour"],
        "pattern_kept": kept["pattern"],
        "identity_kept": _all(list(kept.values())),
        "context_ok": context_ok,
        "modifier_ok": _all(modifiers),
        "prompt_ok": _all([context_ok, *modifiers]),
    }
