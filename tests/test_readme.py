"""README.md stays a short reference whose settings table is the code's.

The settings table is generated from app/settings.py (`KEYS`, printed by
`.venv/bin/python -m app.settings`), so a key added, removed or re-documented without
regenerating the README fails here rather than leaving users with a stale table. The length
limit keeps the README a reference: history and figures belong in docs/.
"""
from __future__ import annotations

import re
from pathlib import Path

from app import settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"
MAX_LINES = 300
REGENERATE = (f"regenerate the table between {BEGIN} and {END} in README.md with the output of "
              "`.venv/bin/python -m app.settings`")


def _block(text: str) -> str:
    """The text between the marker lines (both on lines of their own, once each)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], (
        f"README.md must hold {BEGIN} and {END} once each, on lines of their own; {REGENERATE}")
    return "".join(lines[starts[0] + 1:ends[0]])


def test_settings_table_is_the_generated_one():
    block = _block(README.read_text(encoding="utf-8"))
    assert block == settings.markdown_table(), f"README.md's settings table is out of date: {REGENERATE}"


def test_every_setting_is_in_the_table():
    block = _block(README.read_text(encoding="utf-8"))
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \|", block, flags=re.M))
    missing = [k.name for k in settings.KEYS if k.name not in listed]
    assert not missing, f"settings missing from README.md: {', '.join(missing)}; {REGENERATE}"


def test_readme_is_at_most_300_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, (f"README.md has {n} lines (at most {MAX_LINES}): move detail to docs/ "
                            "(operations.md, performance.md, data.md)")
