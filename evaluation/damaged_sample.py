"""Damaged copies of real heads, for measuring what the intensity QC catches.

Each head of a BIDS dataset (the shipped sample by default) is rescaled to 0-255 and
written four times into a new BIDS dataset:

- ``sub-X``: the head itself (uint8);
- ``sub-Xgamma2``: another contrast, ``255 * (x / max)**2``: white matter brighter relative
  to grey matter, as on some other scanners;
- ``sub-Xpost8``: posterised to 8 grey levels, as a careless export would;
- ``sub-Xspeckle``: 1 % of the voxels (seeded) set to the maximum, bright speckle.

Then run the participant level on it and compare::

    python evaluation/damaged_sample.py /work/runs/damaged-bids
    brainage-bids /work/runs/damaged-bids /work/runs/damaged-out participant --no-reports
    python evaluation/input_reference.py --derivatives /work/runs/ixi3 \\
        --check /work/runs/damaged-bids /work/runs/damaged-out \\
        --json docs/evaluation/input-reference-v2.json
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from brainage_bids.bids import BIDSError, collect_t1w, load_layout
from brainage_bids.derivatives import derivative_path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "examples" / "ixi-sample"


def damaged(values: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The head (0-255) and its three damaged copies, as uint8 arrays by label suffix."""
    low, high = float(values.min()), float(values.max())
    head = np.round((values - low) / (high - low) * 255)  # negative stored values too
    speckle = head.copy()
    speckle[np.random.default_rng(seed).random(head.shape) < 0.01] = 255
    copies = {"": head, "gamma2": np.round(255 * (head / 255) ** 2),
              "post8": np.floor(head / 32) * 32 + 16, "speckle": speckle}
    return {k: v.astype(np.uint8) for k, v in copies.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the new BIDS dataset (must not exist)")
    parser.add_argument("--bids", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"damaged_sample: {args.out} exists", file=sys.stderr)
        return 1
    rows = ["participant_id\tage"]
    try:
        with open(args.bids / "participants.tsv", newline="") as table:
            ages = {row["participant_id"]: row.get("age", "n/a")
                    for row in csv.DictReader(table, delimiter="\t")}
        images = collect_t1w(load_layout(args.bids, validate=False, index_metadata=False))
    except (BIDSError, OSError, ValueError, KeyError) as exc:
        print(f"damaged_sample: {args.bids}: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True)
    shutil.copy(args.bids / "dataset_description.json", args.out)
    labels: dict[str, str] = {}  # new participant label -> its source's
    for image in images:  # sessions and runs keep their entities under the new label
        img = nib.load(image.path)
        for suffix, data in damaged(np.asanyarray(img.dataobj, dtype=np.float64)).items():
            label = f"{image.subject}{suffix}"
            target = derivative_path(args.out, {**image.entities, "subject": label},
                                     suffix="T1w", extension=".nii.gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, img.affine, img.header), target)
            labels[label] = image.subject
    for label, subject in labels.items():
        rows.append(f"sub-{label}\t{ages.get(f'sub-{subject}', 'n/a')}")
        sessions = args.bids / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
        if sessions.is_file():  # session ages
            shutil.copy(sessions, args.out / f"sub-{label}" / f"sub-{label}_sessions.tsv")
    (args.out / "participants.tsv").write_text("\n".join(rows) + "\n")
    print(f"wrote {len(images) * 4} images of {len(labels)} participants to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
