"""Print the participant labels of one part of the IXI split (``test`` or ``trainval``).

For shell commands, e.g. ``--participant-label $(python evaluation/split_ids.py test)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPLIT = Path(__file__).resolve().parent / "ixi_split.json"


def main(argv: list[str]) -> int:
    parts = json.loads(SPLIT.read_text())
    if len(argv) != 1 or argv[0] not in ("test", "trainval"):
        print("usage: python evaluation/split_ids.py {test,trainval}", file=sys.stderr)
        return 2
    print(" ".join(parts[argv[0]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
