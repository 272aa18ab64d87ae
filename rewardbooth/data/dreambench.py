"""Loader for the DreamBench (DreamBooth paper) evaluation set.

Layout: one folder of reference photos per subject next to ``prompts_and_classes.txt``.
That file is not machine-oriented: it has a "Classes" section of ``name,class`` CSV
lines, then "Object Prompts" and "Live Subject Prompts" sections written as Python
snippets (``'a {0} {1} in the snow'.format(unique_token, class_token),``). It does
not say which subjects are live, so, as in the paper, live = class dog or cat.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from rewardbooth.data.images import _show
from rewardbooth.errors import ConfigError, ImageFolderError

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"dog", "cat"})

# Section headers (lower-cased) -> section key; "prompts" only groups the two lists.
_HEADERS = {
    "classes": "classes",
    "prompts": None,
    "object prompts": "object",
    "live subject prompts": "live",
}
_PROMPT_LINE = re.compile(
    r"""(?P<literal>'[^'\\]*'|"[^"\\]*")\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?"""
)
_LIST_START = re.compile(r"prompt_list\s*=\s*\[")
_MAX_LISTED = 30


@dataclass(frozen=True)
class DreamBenchSubject:
    name: str
    class_noun: str
    image_dir: Path
    is_live: bool
    # The object or live template list ("{0}" = identifier, "{1}" = class noun);
    # filled in by load_dreambench.
    templates: tuple[str, ...] = field(default=(), repr=False)

    def prompts(self, identifier: str = "sks") -> list[str]:
        """The evaluation prompts for this subject, e.g. "a sks dog in the snow"."""
        if not self.templates:
            raise ValueError(f"DreamBench subject {self.name!r} has no prompt templates")
        return [template.format(identifier, self.class_noun) for template in self.templates]


@dataclass
class DreamBench:
    root: Path
    subjects: dict[str, DreamBenchSubject]
    object_prompts: list[str]
    live_prompts: list[str]

    def select(self, names: list[str]) -> list[DreamBenchSubject]:
        """Subjects by name, in the given order (duplicates dropped)."""
        unknown = [name for name in names if name not in self.subjects]
        if unknown:
            valid = sorted(self.subjects)
            # DreamBench's 30 names fit on a line; only a larger custom set is cut.
            shown = ", ".join(valid[:_MAX_LISTED])
            if len(valid) > _MAX_LISTED:
                shown += f" and {len(valid) - _MAX_LISTED} more"
            close = difflib.get_close_matches(unknown[0], valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown DreamBench subject(s) {', '.join(map(repr, unknown))}{hint}; "
                f"valid subjects in {_show(self.root)}: {shown}"
            )
        return [self.subjects[name] for name in dict.fromkeys(names)]


def _parse_error(path: Path, lineno: int, line: str, expected: str) -> ConfigError:
    snippet = line if len(line) <= 60 else line[:57] + "..."
    return ConfigError(f"{_show(path)} line {lineno}: cannot parse {snippet!r} (expected {expected})")


def _parse_prompts_file(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Returns ({subject: class noun}, object templates, live templates)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{_show(path)} is not UTF-8 text") from None
    except OSError as exc:
        raise ImageFolderError(f"cannot read {_show(path)}: {' '.join(str(exc).split())}") from None

    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    seen_headers: set[str] = set()
    section: str | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        key = line.lower()
        if not line:
            continue
        if key in _HEADERS:
            if key in seen_headers:
                raise ConfigError(f"{_show(path)} line {lineno}: section {line!r} appears twice")
            seen_headers.add(key)
            section = _HEADERS[key]
            continue
        if section == "classes":
            if key.replace(" ", "") == "subject_name,class":
                continue
            name, comma, noun = (part.strip() for part in line.partition(","))
            if not comma or not name or not noun:
                raise _parse_error(path, lineno, line, "'subject_name,class'")
            if name in classes:
                raise ConfigError(f"{_show(path)} line {lineno}: subject {name!r} is listed twice")
            classes[name] = noun
        elif section in lists:
            if _LIST_START.fullmatch(line) or line == "]":
                continue
            match = _PROMPT_LINE.fullmatch(line)
            if not match:
                raise _parse_error(path, lineno, line, "'<prompt>'.format(unique_token, class_token),")
            template = ast.literal_eval(match["literal"])
            # Both placeholders must be present and nothing else may use braces.
            try:
                filled = template.format("\0id", "\0cls")
            except (IndexError, KeyError, ValueError):
                filled = ""
            if "\0id" not in filled or "\0cls" not in filled:
                raise _parse_error(path, lineno, line, "a prompt using {0} and {1}")
            lists[section].append(template)
        else:
            raise _parse_error(path, lineno, line, "a 'Classes' or 'Prompts' section header")

    if not classes:
        raise ConfigError(f"{_show(path)} lists no subjects (missing 'Classes' section)")
    for key, header in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        if not lists[key]:
            raise ConfigError(f"{_show(path)} has no {header!r} prompt list")
    return classes, lists["object"], lists["live"]


def load_dreambench(root: Path | str) -> DreamBench:
    """Read the subject list and prompt templates; check every subject has a folder."""
    root = Path(root)
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise ImageFolderError(f"DreamBench folder {_show(root)} {state}")
    prompts_path = root / PROMPTS_FILE
    if not prompts_path.is_file():
        raise ImageFolderError(f"DreamBench folder {_show(root)} has no {PROMPTS_FILE}")

    classes, object_prompts, live_prompts = _parse_prompts_file(prompts_path)
    subjects: dict[str, DreamBenchSubject] = {}
    for name, noun in classes.items():
        image_dir = root / name
        if not image_dir.is_dir():
            raise ImageFolderError(
                f"DreamBench subject folder {_show(image_dir)} (listed in {PROMPTS_FILE}) does not exist"
            )
        is_live = noun.lower() in LIVE_CLASSES
        templates = tuple(live_prompts if is_live else object_prompts)
        subjects[name] = DreamBenchSubject(name, noun, image_dir, is_live, templates)
    return DreamBench(root, subjects, object_prompts, live_prompts)
