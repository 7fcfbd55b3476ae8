"""Run benchmark variants in fresh subprocesses, round-robin, and collect their JSON lines.

Each variant runs as ``python SCRIPT --one VARIANT ARGS...`` in its own process, so that its
peak memory (``ru_maxrss``) is its own. Repeats go round-robin: on a shared machine the load
drifts over minutes, and interleaving keeps that drift from favouring whichever variant ran
in a quiet spell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_env(**extra: str) -> dict[str, str]:
    """The environment with the checkout first on ``PYTHONPATH`` (plus ``extra``)."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_rounds(script: str, variants: Sequence[str], repeats: int, args: Sequence[str],
               report: Callable[[int, str, dict], None]) -> dict[str, list[dict]] | int:
    """Every variant ``repeats`` times; ``report(repeat, variant, result)`` after each run.

    Returns the results per variant, or the exit code of the first run that failed (its
    stderr is printed).
    """
    env = repo_env()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants:
            done = subprocess.run([sys.executable, script, "--one", variant, *args], env=env,
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[variant].append(result)
            report(repeat, variant, result)
    return runs


def use_textbook_blocks() -> None:
    """Make this process's BrainAgeNet the textbook one (each variant runs in its own process).

    The package's blocks take their fast paths only without autograd; these are the plain
    ``nn.Module`` forwards they replace, so "textbook" against "fast" is what they buy.
    """
    from torch import nn

    from brainage_bids.model.blocks import ConvBlock3d, DepthTapConv3d

    ConvBlock3d.forward = lambda self, x: self.pool(self.act(self.conv(x)))
    DepthTapConv3d.forward = nn.Conv3d.forward
