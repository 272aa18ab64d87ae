"""README.md and docs/*.md checked against the code, so the documents cannot drift from it.

`check_document(text)` reads a Markdown text and returns one line per mismatch:
- every `rewardbooth ...` command line (indented or fenced code, and inline `code`; `\\` continuations, `&&` chains,
  `# comments`, `[optional]` brackets and `...` / DIR / N placeholders understood): each flag against the real argparse
  parser of its subcommand, each value against the flag's type and choices, each `--set key=value` against the config
  (an unknown key or a value that fails validation is a mismatch: the command's settings are built through
  `rewardbooth.methods.load_config`), each `--model NAME` that is not a hub id, path or placeholder against the preset
  registry, each `--method` / `--methods` name against the method and variant registry;
- `python benchmarks/X.py ...` (and `bash benchmarks/gpu_check.sh`) against that script's own `build_parser()`, and
  `python -m rewardbooth.<module> ...` against that module's parser;
- inline `--flag` spans against the flags some parser has, inline `section.key[=value]` spans against the config;
- each cited test (`test_...`) against the test suite, each cited `tests/`, `benchmarks/`, `rewardbooth/` ... path
  against the checkout, each relative link and its #anchor against the files and their headings;
- headings: unique within a file, and none printed twice on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
from conftest import load_script

from rewardbooth.cli import TRAIN_FLAGS, TRAIN_SWITCHES, build_parser
from rewardbooth.config import RunConfig, parse_override
from rewardbooth.errors import ConfigError, RewardboothError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
PLACEHOLDER_WORDS = {"...", "section.key=value", "KEY=VALUE", "FILE+BASE"}
CITED_PATH = re.compile(r"(?<![\w/])((?:rewardbooth|benchmarks|tests|scripts|docs)/[\w./-]*\w)")  # a path in the checkout


# --- reading Markdown -------------------------------------------------------------------------------------------


def split_code_and_prose(text: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(code lines as (line number, text), prose lines with the code lines blanked, so line numbers stay).
    Code: fenced blocks, and lines indented by 4 after a blank line or another code line."""
    code, prose = [], []
    fenced = False
    code_may_start = True  # the previous line was blank or code
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
            code_may_start = False
            continue
        is_code = fenced or (line.startswith(("    ", "\t")) and bool(line.strip()) and code_may_start)
        if is_code:
            code.append((number, line))
        prose.append("" if is_code else line)
        code_may_start = is_code or not line.strip()
    return code, prose


def logical_lines(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Code lines with `\\` continuations joined, each tagged with its first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    last = None
    for number, line in code:
        if pending is not None and last is not None and number != last + 1:
            out.append(pending)
            pending = None
        last = number
        stripped = line.strip()
        joined = stripped if pending is None else pending[1] + " " + stripped
        start = number if pending is None else pending[0]
        if joined.endswith("\\"):
            pending = (start, joined[:-1].rstrip())
        else:
            out.append((start, joined))
            pending = None
    if pending is not None:
        out.append(pending)
    return out


def inline_spans(prose: list[str]) -> list[tuple[int, str]]:
    """Inline `code` spans of the prose (a span may run over a line break), with their line numbers."""
    text = "\n".join(prose)
    spans = []
    for match in re.finditer(r"(`+)(.+?)\1", text, flags=re.DOTALL):
        if "\n\n" in match.group(2):
            continue
        spans.append((text.count("\n", 0, match.start()) + 1, " ".join(match.group(2).split())))
    return spans


def tokenize(line: str) -> list[str]:
    """Shell words of a command line, without its `# comment`; `[optional]` brackets dropped."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: words up to the comment
        words = line.split(" #")[0].split()
    unbracketed = []
    for word in words:
        if word.startswith("[") and "]" not in word:  # `[--flag VALUE]`: an optional part, not a YAML list
            word = word[1:]
        if word.endswith("]") and "[" not in word:
            word = word[:-1]
        if word:
            unbracketed.append(word)
    return unbracketed


def segments(words: list[str]) -> list[list[str]]:
    """A chain (`a && b; c | d`) as its commands, each without leading VAR=value assignments."""
    out, current = [], []
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";", "|"):
            while current and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", current[0]):
                current.pop(0)
            if current:
                out.append(current)
            current = []
        else:
            current.append(word)
    return out


def is_placeholder(word: str) -> bool:
    return (word in PLACEHOLDER_WORDS or "..." in word or word.startswith(("<", "$"))  # $lr: a shell loop's variable
            or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?", word)))


def heading_slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(prose: list[str]) -> list[tuple[int, str]]:
    return [(n, m.group(1).strip()) for n, line in enumerate(prose, 1) if (m := re.match(r"#{1,6} (.+)", line))]


# --- what the code says ---------------------------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def module_parser(module) -> argparse.ArgumentParser:
    """A script's or module's ArgumentParser: its build_parser(), else the one its main() builds (caught at parse)."""
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            module.main([])
        except _Captured as caught:
            return caught.parser
    raise AssertionError(f"{module.__name__} parses no arguments in main()")


@functools.cache
def script_parser(path: str) -> argparse.ArgumentParser:
    return module_parser(load_script(path, f"_doc_checked_{Path(path).stem}"))


@functools.cache
def python_module_parser(name: str) -> argparse.ArgumentParser:
    return module_parser(importlib.import_module(name))


@functools.cache
def rewardbooth_parser() -> argparse.ArgumentParser:
    return build_parser()


@functools.cache
def preset_names() -> frozenset[str]:
    from rewardbooth.models.presets import preset_names as names

    return frozenset(names())


@functools.cache
def method_and_variant_names() -> frozenset[str]:
    from rewardbooth.methods import method_names, variant_names

    return frozenset([*method_names(), *variant_names()])


@functools.cache
def suite_test_names() -> frozenset[str]:
    return frozenset(re.findall(r"def (test_\w+)", "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))))


@functools.cache
def all_flags() -> frozenset[str]:
    """Every option string of the rewardbooth commands, the benchmark scripts and the modules the docs run."""
    parsers = [rewardbooth_parser(), *(script_parser(f"benchmarks/{p.name}") for p in (ROOT / "benchmarks").glob("*.py")),
               *(python_module_parser(m) for m in ("rewardbooth.mini.measure", "rewardbooth.mini.sheet",
                                                   "rewardbooth.recipes.mini_pretrain", "rewardbooth.recipes.mini_judges"))]
    flags: set[str] = set()
    while parsers:
        parser = parsers.pop()
        flags.update(parser._option_string_actions)
        parsers.extend(sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                       for sub in action.choices.values())
    for shim in (ROOT / "benchmarks" / "official_shims").glob("*.py"):  # parses its few options by hand
        flags.update(re.findall(r'"(--[a-z][a-z0-9-]*)"', shim.read_text()))
    return frozenset(flags)


def setting_problem(key: str, value=None, method: str | None = None) -> str | None:
    """Why `key` (= value) is not a setting: unknown, or a value the config refuses; None if it is fine."""
    section, _, name = key.partition(".")
    if section not in CONFIG_SECTIONS:
        return f"unknown setting {key} (no config section {section!r})"
    fields = {f.name for f in dataclasses.fields(getattr(RunConfig(), section))}
    if name not in fields:
        return f"unknown setting {key}"
    if value is None:
        return None
    overrides = {key: value, **({"train.method": method} if method else {})}
    try:
        from rewardbooth.methods import load_config

        load_config(None, overrides)
    except ConfigError as exc:
        return f"{key}={value}: {exc}"
    return None


# --- checking one command -------------------------------------------------------------------------------------------


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def value_problem(action: argparse.Action, flag: str, value: str) -> str | None:
    for alternative in value.replace("\\|", "|").split("|"):
        if is_placeholder(alternative):
            continue
        try:
            converted = action.type(alternative) if callable(action.type) else alternative
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            return f"{flag} {alternative}: {exc}"
        if action.choices is not None and converted not in action.choices:
            return f"{flag} {alternative}: not one of {', '.join(map(str, action.choices))}"
    return None


def parse_words(parser: argparse.ArgumentParser, words: list[str], prog: str) -> tuple[list[str], list[tuple[str, list[str]]], list[str]]:
    """Walk `words` like argparse would, leniently: (problems, [(flag, values)], positionals). Subcommands descend."""
    problems, given, positionals = [], [], []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if is_placeholder(word):
            continue
        if word.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", word):
            flag, has_value, inline = word.partition("=")
            action = parser._option_string_actions.get(flag)
            if action is None:
                problems.append(f"{prog}: no flag {flag}")
                continue
            if has_value:
                values = [inline]
            elif action.nargs == 0:
                values = []
            elif action.nargs in (None, "?") or isinstance(action.nargs, int):
                count = action.nargs if isinstance(action.nargs, int) else 1
                values = [w for w in words[i:i + count] if not (action.nargs == "?" and w.startswith("-"))]
                i += len(values)
            else:  # +, *: up to the next flag
                values = []
                while i < len(words) and not words[i].startswith("-"):
                    values.append(words[i])
                    i += 1
            given.append((flag, values))
            if flag != "--set":
                problems.extend(p for v in values if (p := value_problem(action, flag, v)))
            continue
        subcommands = subparsers_of(parser)
        if subcommands and not positionals:
            if word not in subcommands:
                problems.append(f"{prog}: no subcommand {word!r} (has {', '.join(subcommands)})")
                return problems, given, positionals
            parser, prog = subcommands[word], f"{prog} {word}"
        positionals.append(word)
    return problems, given, positionals


def check_rewardbooth(words: list[str]) -> list[str]:
    if not words:
        return []
    problems, given, positionals = parse_words(rewardbooth_parser(), words, "rewardbooth")
    if problems or not positionals:
        return problems
    command = positionals[0]
    overrides: dict = {}
    flag_keys = {flag: (key, kind) for flag, key, kind, _ in TRAIN_FLAGS}
    switch_keys = {flag: (key, value) for flag, key, value, _ in TRAIN_SWITCHES}
    for flag, values in given:
        for value in values:
            if flag == "--set":
                if is_placeholder(value):
                    continue
                try:
                    key, setting = parse_override(value)
                except ConfigError as exc:
                    problems.append(str(exc))
                    continue
                if problem := setting_problem(key):
                    problems.append(f"--set {value}: {problem}")
                elif not is_placeholder(str(setting)):
                    overrides[key] = setting
            elif flag == "--model" and not is_placeholder(value):
                hub_or_path = "/" in value or value.startswith(("~", ".")) or value.endswith(".safetensors") or "+" in value
                if not hub_or_path and value not in preset_names():
                    problems.append(f"--model {value}: not a hub id, a path or a preset ({', '.join(sorted(preset_names()))})")
            elif flag in ("--method", "--methods") and not is_placeholder(value):
                unknown = [m for m in value.split(",") if m and m not in method_and_variant_names()]
                if unknown:
                    problems.append(f"{flag} {value}: no method or variant {', '.join(unknown)}")
                elif command == "train":
                    overrides["train.method"] = value
            elif command == "train" and flag in flag_keys and flag != "--model" and not is_placeholder(value) and "|" not in value:
                key, kind = flag_keys[flag]
                overrides[key] = kind(value)
        if command == "train" and flag in switch_keys:
            overrides[switch_keys[flag][0]] = switch_keys[flag][1]
    if command in ("train", "bench") and overrides and not problems:
        try:
            from rewardbooth.methods import load_config

            load_config(None, overrides)
        except RewardboothError as exc:
            problems.append(f"settings {overrides} are refused: {exc}")
    return problems


def check_command(words: list[str]) -> list[str]:
    """Problems of one command (shell words); commands of other tools are not checked."""
    head, rest = words[0], words[1:]
    if head == "accelerate" and rest[:3] == ["launch", "-m", "rewardbooth.cli"]:
        return check_rewardbooth(rest[3:])
    if head == "rewardbooth":
        return check_rewardbooth(rest)
    if head == "bash" and rest[:1] == ["benchmarks/gpu_check.sh"]:
        return parse_words(script_parser("benchmarks/gpu_check.py"), rest[1:], "benchmarks/gpu_check.sh")[0]
    if head in ("python", "python3") and rest:
        if rest[0].startswith("benchmarks/") and rest[0].endswith(".py"):
            if not (ROOT / rest[0]).is_file():
                return [f"no script {rest[0]}"]
            return parse_words(script_parser(rest[0]), rest[1:], rest[0])[0]
        if rest[0] == "-m" and len(rest) > 1 and rest[1].split(".")[0] == "rewardbooth":
            if rest[1] in ("rewardbooth", "rewardbooth.cli"):
                return check_rewardbooth(rest[2:])
            if importlib.util.find_spec(rest[1]) is None:
                return [f"no module {rest[1]}"]
            return parse_words(python_module_parser(rest[1]), rest[2:], f"python -m {rest[1]}")[0]
    return []


# --- checking a document ------------------------------------------------------------------------------------------


def check_document(text: str, path: Path = ROOT / "README.md") -> list[str]:
    """Every mismatch between a Markdown document (at `path`, for its relative links) and the code."""
    code, prose = split_code_and_prose(text)
    spans = inline_spans(prose)
    problems: list[str] = []

    def report(line: int, what: str, found: list[str]) -> None:
        problems.extend(f"{path.name}:{line}: {what}: {problem}" for problem in found)

    commands = [*logical_lines(code), *spans]
    for line, fragment in commands:
        for words in segments(tokenize(fragment)):
            report(line, " ".join(words), check_command(words))
    for line, span in spans:
        words = tokenize(span)
        if not words:
            continue
        first = words[0]
        if re.fullmatch(r"--[a-z][a-z0-9-]*", first.partition("=")[0]) and first.partition("=")[0] not in all_flags():
            report(line, span, [f"no command or script has a flag {first.partition('=')[0]}"])
        for word in words if len(words) == 1 or "=" in span else []:
            setting = re.fullmatch(r"([a-z_]+)\.([a-z_0-9]+)(=(.+))?", word)
            if setting and setting.group(1) in CONFIG_SECTIONS:
                key, raw = f"{setting.group(1)}.{setting.group(2)}", setting.group(4)
                values = [None] if raw is None or is_placeholder(raw) else raw.replace("\\|", "|").split("|")
                method = setting.group(1) if setting.group(1) in ("dpg", "rpo") else None
                for value in values:
                    parsed = None if value is None else parse_override(f"{key}={value}")[1]
                    if problem := setting_problem(key, parsed, method):
                        report(line, span, [problem])
        for name in re.findall(r"(?<![\w/])(test_\w+)(?![\w.])", span):
            if name not in suite_test_names() and not name.endswith(".py"):
                report(line, span, [f"no test named {name} in tests/"])
        for cited in re.findall(CITED_PATH, span):
            if not (ROOT / cited).exists() and "*" not in cited:
                report(line, span, [f"{cited} does not exist"])
    for line, span in logical_lines(code):
        for name in re.findall(r"\b(test_\w+)\b", span.split("#", 1)[-1] if "#" in span else ""):
            if name not in suite_test_names():
                report(line, span, [f"no test named {name} in tests/"])

    # links and their anchors
    prose_text = "\n".join(prose)
    for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose_text):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        line = prose_text.count("\n", 0, match.start()) + 1
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            report(line, target, [f"{file_part} does not exist"])
        elif anchor and linked.suffix == ".md":
            linked_text = text if linked == path else linked.read_text()
            slugs = {heading_slug(h) for _, h in headings(split_code_and_prose(linked_text)[1])}
            if anchor not in slugs:
                report(line, target, [f"no heading #{anchor} in {linked.name}"])

    # headings: unique, each printed once
    seen: dict[str, int] = {}
    for line, heading in headings(prose):
        if re.search(r"#{2,}", heading):
            report(line, heading, ["two headings on one line"])
        slug = heading_slug(heading)
        if slug in seen:
            report(line, heading, [f"the same heading as line {seen[slug]}"])
        seen.setdefault(slug, line)
    return problems


# --- the tests --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_document_matches_the_code(doc):
    problems = check_document(doc.read_text(), doc)
    assert not problems, "\n".join(problems)


def test_the_checker_reads_every_command_of_the_readme():
    """The extraction itself: the README's commands are found (chains, continuations, inline spans), not silently skipped."""
    text = (ROOT / "README.md").read_text()
    code, prose = split_code_and_prose(text)
    found = [words[0] for _, fragment in [*logical_lines(code), *inline_spans(prose)] for words in segments(tokenize(fragment))]
    assert found.count("rewardbooth") >= 15
    assert any(w == "python" for w in found) and "OMP_NUM_THREADS=1" not in found


PLANTED = [  # (a line added to the README, what the checker must say)
    ("    rewardbooth train --no-such-flag --output runs/x", "no flag --no-such-flag"),
    ("    rewardbooth traim --output runs/x", "no subcommand 'traim'"),
    ("    rewardbooth train --output runs/x --set train.stepz=3", "unknown setting train.stepz"),
    ("    rewardbooth train --output runs/x --set nosection.steps=3", "no config section"),
    ("    rewardbooth train --output runs/x --set train.steps=0", "train.steps"),
    ("    rewardbooth train --method dpg --cache-latents --random-crop --output runs/x", "center crops"),
    ("    rewardbooth train --model tiny-bogus --output runs/x", "--model tiny-bogus"),
    ("    rewardbooth bench --suite mini --methods dreambooth,dpg-bogus", "dpg-bogus"),
    ("    rewardbooth export runs/x --format onnx", "--format onnx"),
    ("    rewardbooth train \\\n        --steps many --output runs/x", "--steps many"),
    ("`rewardbooth generate --run RUN --promt a`", "no flag --promt"),
    ("    python benchmarks/bench_memory.py table --no-such-flag", "no flag --no-such-flag"),
    ("    python benchmarks/bench_memory.py tabel", "no subcommand 'tabel'"),
    ("    python benchmarks/bench_nothing.py --n 3", "no script"),
    ("    python -m rewardbooth.mini.measure --scenez 3", "no flag --scenez"),
    ("    OMP_NUM_THREADS=1 python benchmarks/bench_steps.py --stepz 1", "no flag --stepz"),
    ("Tested by `test_this_test_does_not_exist`.", "no test named test_this_test_does_not_exist"),
    ("Set `dpg.look_forwards=false`.", "unknown setting dpg.look_forwards"),
    ("Set `rpo.labels=sharp`.", "rpo.labels"),
    ("Pass `--quik`.", "flag --quik"),
    ("See `tests/test_nothing_here.py`.", "tests/test_nothing_here.py does not exist"),
    ("See [memory](#no-such-heading).", "no heading #no-such-heading"),
    ("See [notes](docs/no-such-page.md).", "docs/no-such-page.md does not exist"),
    ("## Layout", "the same heading"),
    ("### Sampling### Sampling", "two headings on one line"),
]


@pytest.mark.parametrize("planted, expected", PLANTED, ids=[p[1] for p in PLANTED])
def test_a_planted_mismatch_is_reported(planted, expected):
    readme = (ROOT / "README.md").read_text()
    problems = check_document(readme + "\n\n" + planted + "\n", ROOT / "README.md")
    assert any(expected in p for p in problems), f"{planted!r} not reported as {expected!r}; reported: {problems}"
