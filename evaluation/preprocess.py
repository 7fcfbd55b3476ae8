"""Run the participant level's preprocessing only (no model) for some participants.

The evaluation needs the test split's preprocessed images; the train level preprocesses the
training images itself. Outputs and work files are the participant level's own, so a later
``participant`` run with the same ``-w`` reuses them::

    python evaluation/preprocess.py ../shared/data/ixi-hh-t1w-2mm /work/runs/ixi \\
        -w /work/runs/work --participant-label $(python evaluation/split_ids.py test)
"""

from __future__ import annotations

import sys

from brainage_bids.cli.parser import UsageError, parse_settings
from brainage_bids.cli.run import select_images
from brainage_bids.cohort import preprocess_cohort
from brainage_bids.training import ensure_preprocessed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_settings([*argv[:2], "train", *argv[2:]])
    except UsageError as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2
    images = select_images(settings)
    done, failures = ensure_preprocessed(settings, images, preprocess_cohort)
    for name, error in failures.items():
        print(f"preprocess: {name}: {error}", file=sys.stderr)
    print(f"{len(done)} of {len(images)} image(s) preprocessed in {settings.output_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
