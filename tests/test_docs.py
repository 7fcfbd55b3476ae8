"""The documentation's commands use options that exist.

The site itself is built with ``mkdocs build --strict`` by scripts/test.sh and CI; here every
brainage-bids command line in the docs' code blocks is checked against the real parser, so
that a renamed or invented option fails a test rather than a user.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from brainage_bids.cli.parser import build_parser

from .conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
# the app: its console script, python -m brainage_bids (torchrun), or the image's entry point
APP = re.compile(r"(brainage-bids|-m brainage_bids|brainage\.sif)(?=\s)")
ENGINE = re.compile(r"-m brainage_bids\.model\.train(?=\s)")
LEVEL = re.compile(r"(?<!\S)(participant|group|train)(?![\w-])")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _command_lines(path: Path) -> list[str]:
    """Logical lines (backslash continuations joined) of the page's code blocks."""
    lines = []
    for block in FENCE.findall(path.read_text()):
        lines.extend(block.replace("\\\n", " ").splitlines())
    return lines


def _app_options(line: str) -> list[str]:
    """Options after the analysis level of a brainage-bids command line."""
    app = APP.search(line)
    if not app or ENGINE.search(line):
        return []
    level = LEVEL.search(line, app.end())
    return OPTION.findall(line, level.end()) if level else []


def _documented() -> list[tuple[str, str]]:
    return [(path.name, option) for path in DOCS for line in _command_lines(path)
            for option in _app_options(line)]


def test_docs_have_commands_to_check():
    documented = _documented()
    pages = {page for page, _ in documented}
    assert {"hpc.md", "installation.md"} <= pages
    assert ("hpc.md", "--mem-gb") in documented


@pytest.mark.parametrize(("page", "option"), sorted(set(_documented())))
def test_documented_option_exists(page, option):
    known = build_parser()._option_string_actions
    assert option in known, f"docs/{page} uses {option}, which brainage-bids does not have"


def test_option_finder_sees_an_invented_option():
    line = "apptainer run -B a:b brainage.sif /data /out participant -w /work --nprocz 2"
    assert _app_options(line) == ["-w", "--nprocz"]
    assert "--nprocz" not in build_parser()._option_string_actions


def test_training_engine_options_exist():
    text = subprocess.run([sys.executable, "-m", "brainage_bids.model.train", "--help"],
                          capture_output=True, text=True, check=True).stdout
    lines = [line for path in DOCS for line in _command_lines(path) if ENGINE.search(line)]
    assert lines, "the docs show the training engine under torchrun"
    for line in lines:
        for option in OPTION.findall(line, ENGINE.search(line).end()):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
