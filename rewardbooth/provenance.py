"""Which rewardbooth made a result: recorded where a run starts or resumes (history.jsonl) and where a bench starts
(bench.json), so a run or bench carried on by other code says so instead of mixing two versions' numbers silently."""

from __future__ import annotations

import subprocess
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from rewardbooth import __version__

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """{"version"}; from a git checkout (an editable install, a worktree) also {"commit", "modified"}: the commit and
    whether tracked files differ from it."""
    record: dict[str, Any] = {"version": __version__}
    if (SOURCE_ROOT / ".git").exists() and (commit := _git("rev-parse", "HEAD")):
        record.update(commit=commit, modified=bool(_git("status", "--porcelain", "--untracked-files=no")))
    return record


def same_code(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether `recorded` names the code now running (nothing recorded: results from before this was kept, taken as
    the same; a modified checkout cannot be told apart from itself, so only version and commit count)."""
    if not recorded:
        return True
    return all(recorded.get(key) == current.get(key) for key in ("version", "commit"))


def describe(code: dict[str, Any]) -> str:
    commit = code.get("commit")
    return f"rewardbooth {code.get('version')}" + (f" (commit {commit[:10]}{', modified' if code.get('modified') else ''})"
                                                   if commit else "")


def warn_other_code(recorded: dict[str, Any] | None, what: str) -> None:
    """Loud, not refused: carrying a run or bench on after an upgrade is allowed, but its numbers then come from two
    versions, and whoever reads them is told. `what`: the sentence's start, e.g. "bench folder X was started by"."""
    if not same_code(recorded, code_version()):
        warnings.warn(f"{what} {describe(recorded)}; this is {describe(code_version())}: its results will mix the two "
                      "versions' (start a new --output for results of one version)", stacklevel=2)
