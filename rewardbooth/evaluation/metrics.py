"""DreamBench metrics (DreamBooth paper protocol; README "Measure"): DINO, CLIP-I, CLIP-T.

- DINO: cosine of DINO CLS features of each generated image with each reference, averaged.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: cosine of the CLIP image embedding with the prompt, identifier token removed.
Scores are kept per image; per prompt, per subject and overall means are computed from them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from PIL import Image

from rewardbooth.data.images import list_image_files, load_image, load_image_folder
from rewardbooth.errors import ConfigError
from rewardbooth.rewards import Subject, build_reward
from rewardbooth.sampling import METADATA_NAME

METRICS = ("dino", "clip_i", "clip_t")
DEFAULT_EVAL_MODELS = {"dino": "facebook/dino-vits16", "clip": "openai/clip-vit-base-patch16"}


@dataclass
class ImageScore:
    subject: str
    prompt: str
    file: str
    dino: float
    clip_i: float
    clip_t: float
    extra: dict[str, float] = field(default_factory=dict)  # user-configured rewards

    def value(self, metric: str) -> float:
        return getattr(self, metric) if metric in METRICS else self.extra[metric]


@dataclass
class Scorer:
    """Loads the judges once and scores batches of images against a subject."""
    models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_EVAL_MODELS))
    device: str = "cpu"
    batch_size: int = 32
    extra_rewards: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.rewards = {name: build_reward(name, models=self.models, device=self.device) for name in METRICS}
        for spec in self.extra_rewards:
            reward = build_reward(spec, models=self.models, device=self.device)
            self.rewards[reward.name] = reward

    @classmethod
    def from_config(cls, evaluation, device: str = "cpu") -> Scorer:
        return cls({"dino": evaluation.dino_model, "clip": evaluation.clip_model}, device, extra_rewards=list(evaluation.extra_rewards))

    @property
    def metric_names(self) -> list[str]:
        return list(self.rewards)

    def checkpoints(self) -> dict[str, str]:
        return {"dino": self.models["dino"], "clip_i": self.models["clip"], "clip_t": self.models["clip"]}

    def score(self, images: list[Image.Image], prompts: list[str], files: list[str], subject: Subject) -> list[ImageScore]:
        columns: dict[str, list[float]] = {name: [] for name in self.rewards}
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]  # one list for every reward: encoders reuse their features
            for name, reward in self.rewards.items():
                columns[name].extend(reward(chunk, prompts[start : start + self.batch_size], subject).detach().float().cpu().tolist())
        extra = [name for name in columns if name not in METRICS]
        return [ImageScore(subject.name, p, f, columns["dino"][i], columns["clip_i"][i], columns["clip_t"][i],
                           {name: columns[name][i] for name in extra})
                for i, (p, f) in enumerate(zip(prompts, files))]


def summarize(scores: list[ImageScore], by: str | None = None) -> list[dict]:
    """Mean of each metric over all images, or per value of `by` ("subject" or "prompt")."""
    groups: dict[str, list[ImageScore]] = {}
    for s in scores:
        groups.setdefault(getattr(s, by) if by else "overall", []).append(s)
    rows = []
    for key, members in groups.items():
        row = {by or "scope": key, "images": len(members)}
        for metric in [*METRICS, *members[0].extra]:
            # NaN marks "does not apply to this image" (e.g. a context check on a prompt naming no context)
            applicable = [v for s in members if not math.isnan(v := s.value(metric))]
            row[metric] = fmean(applicable) if applicable else float("nan")
        rows.append(row)
    return rows


def read_generated_folder(folder: Path, prompt: str | None = None) -> tuple[list[Path], list[str]]:
    """Generated images and their prompts, from metadata.jsonl or one prompt for all images."""
    folder = Path(folder)
    metadata = folder / METADATA_NAME
    if metadata.is_file():
        entries = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        files = [folder / e["file"] for e in entries]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{metadata} lists {missing[0].name}, which is not in {folder}")
        return files, [prompt or e["prompt"] for e in entries]
    if prompt is None:
        raise ConfigError(f"{folder} has no {METADATA_NAME}; pass --prompt to give the prompt of its images")
    files = list_image_files(folder, role="images folder")
    return files, [prompt] * len(files)


def evaluate_folder(images_dir: Path, references_dir: Path, identifier: str = "sks", prompt: str | None = None,
                    scorer: Scorer | None = None, subject_name: str | None = None) -> list[ImageScore]:
    files, prompts = read_generated_folder(images_dir, prompt)
    references = load_image_folder(references_dir)
    subject = Subject(subject_name or Path(references_dir).name, references, identifier=identifier)
    scorer = scorer or Scorer()
    return scorer.score([load_image(f) for f in files], prompts, [f.name for f in files], subject)


def format_table(rows: list[dict]) -> str:
    """A plain-text table for the terminal."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r))  # rows may lack a column (a bench method with no scored subject)
    cells = [[f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
