"""The BIDS side: pybids queries for T1w images, ages, and the derivatives' description.

The input dataset is only ever read: pybids is asked not to write a database into it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainage_bids import __version__
from brainage_bids.io import atomic_write_json

#: The order in which BIDS entities appear in a file name (the subset a T1w can carry).
ENTITY_ORDER = ("subject", "session", "task", "acquisition", "ceagent", "reconstruction",
                "run", "echo", "part", "space", "res", "desc", "from", "to", "mode")
ENTITY_KEYS = {"subject": "sub", "session": "ses", "task": "task", "acquisition": "acq",
               "ceagent": "ce", "reconstruction": "rec", "run": "run", "echo": "echo",
               "part": "part", "space": "space", "res": "res", "desc": "desc",
               "from": "from", "to": "to", "mode": "mode"}
#: Entities that describe a derivative, never taken from the source image's name.
OUTPUT_ENTITIES = ("space", "res", "desc", "from", "to", "mode")
AGE_COLUMNS = ("age", "Age", "AGE", "age_years")
MISSING = {"", "n/a", "na", "nan", "none", "null"}


class BIDSError(Exception):
    """The dataset cannot serve the request (no T1w, unknown label, bad ages)."""


@dataclass(frozen=True)
class T1wImage:
    """One T1w image to process, with the entities that name its derivatives."""

    path: Path
    entities: dict[str, Any] = field(hash=False)
    age: float | None = None

    @property
    def subject(self) -> str:
        return str(self.entities["subject"])

    @property
    def session(self) -> str | None:
        ses = self.entities.get("session")
        return None if ses is None else str(ses)

    @property
    def name(self) -> str:
        """A stem unique per image, e.g. ``sub-01_ses-02_run-1`` (also a valid node name)."""
        return "_".join(f"{ENTITY_KEYS[k]}-{self.entities[k]}" for k in ENTITY_ORDER
                        if k in self.entities and k not in OUTPUT_ENTITIES)

    @property
    def node_name(self) -> str:
        return self.name.replace("-", "").replace(".", "")


def load_layout(bids_dir: Path, *, validate: bool = True, index_metadata: bool = True):
    """Index the dataset with pybids, writing nothing into it.

    ``index_metadata=False`` skips reading every JSON sidecar: the T1w selection needs only
    file-name entities, and on thousands of participants the sidecars cost a third of the
    indexing time (docs/performance.md).
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    try:
        return BIDSLayout(str(bids_dir), validate=validate, derivatives=False,
                          indexer=BIDSLayoutIndexer(validate=validate,
                                                    index_metadata=index_metadata))
    except Exception as err:  # pybids raises several types for a malformed dataset
        raise BIDSError(f"pybids cannot index {bids_dir}: {err}") from None


def parse_age(value: Any, *, where: str) -> float | None:
    """``None`` for a missing age (n/a, empty); a clear error for anything non-numeric."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    if text.lower() in MISSING:
        return None
    try:
        age = float(text)
    except ValueError:
        raise BIDSError(f"{where}: age {text!r} is not a number") from None
    if not math.isfinite(age) or age < 0:
        raise BIDSError(f"{where}: age {text!r} is not a valid age in years")
    return age


def _read_tsv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _age_column(columns: list[str] | None) -> str | None:
    for name in AGE_COLUMNS:
        if columns and name in columns:
            return name
    return None


def _ages_from_tsv(path: Path, id_column: str, prefix: str) -> dict[str, float | None]:
    """``{label: age}`` from one TSV (labels without their ``sub-``/``ses-`` prefix)."""
    rows = _read_tsv(path)
    column = _age_column(list(rows[0]) if rows else None)
    ages: dict[str, float | None] = {}
    for line, row in enumerate(rows, start=2):
        label = (row.get(id_column) or "").removeprefix(prefix)
        if label and column:
            ages[label] = parse_age(row.get(column), where=f"{path.name} line {line}")
    return ages


def read_ages(bids_dir: Path) -> dict[tuple[str, str | None], float | None]:
    """Ages keyed by ``(subject, session)``; session ``None`` holds participants.tsv's age.

    ``sessions.tsv`` ages (for longitudinal data) take precedence for their session.
    """
    ages: dict[tuple[str, str | None], float | None] = {}
    participants = bids_dir / "participants.tsv"
    if participants.is_file():
        for sub, age in _ages_from_tsv(participants, "participant_id", "sub-").items():
            ages[(sub, None)] = age
    for sessions in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv")):
        sub = sessions.parent.name.removeprefix("sub-")
        for ses, age in _ages_from_tsv(sessions, "session_id", "ses-").items():
            ages[(sub, ses)] = age
    return ages


def age_for(ages: dict[tuple[str, str | None], float | None], subject: str,
            session: str | None) -> float | None:
    if session is not None and ages.get((subject, session)) is not None:
        return ages[(subject, session)]
    return ages.get((subject, None))


def collect_t1w(layout, *, participant_label: tuple[str, ...] = (),
                session_label: tuple[str, ...] = (),
                filters: dict[str, Any] | None = None) -> list[T1wImage]:
    """Every T1w image selected by labels and filters, each with its age when known."""
    subjects = layout.get_subjects()
    unknown = sorted(set(participant_label) - set(subjects))
    if unknown:
        raise BIDSError("participant label(s) not found in the dataset: "
                        + ", ".join(f"sub-{s}" for s in unknown))
    query: dict[str, Any] = {"datatype": "anat", "suffix": "T1w",
                             "extension": [".nii", ".nii.gz"]}
    query.update((filters or {}).get("t1w", {}))
    if participant_label:
        query["subject"] = list(participant_label)
    if session_label:
        sessions = layout.get_sessions()
        missing = sorted(set(session_label) - set(sessions))
        if missing:
            raise BIDSError("session label(s) not found in the dataset: "
                            + ", ".join(f"ses-{s}" for s in missing))
        query["session"] = list(session_label)
    # file names, not BIDSFile objects: reading each object's entities back from pybids'
    # database costs more than indexing the dataset; the names hold the same entities
    files = layout.get(return_type="filename", **query)
    if not files:
        who = (" for " + ", ".join(f"sub-{s}" for s in participant_label)
               if participant_label else "")
        raise BIDSError(f"no T1w images found{who} in {layout.root}")
    ages = read_ages(Path(layout.root))
    images = []
    from bids.layout import parse_file_entities

    for path in sorted(files):
        entities = {k: v for k, v in parse_file_entities(path).items() if k in ENTITY_KEYS}
        age = age_for(ages, str(entities["subject"]), entities.get("session"))
        images.append(T1wImage(path=Path(path), entities=entities, age=age))
    return images


def participants_table(bids_dir: Path) -> list[dict[str, str]]:
    """participants.tsv rows as strings (for the group table), or ``[]`` when absent."""
    path = bids_dir / "participants.tsv"
    return _read_tsv(path) if path.is_file() else []


def write_dataset_description(output_dir: Path, bids_dir: Path) -> Path:
    """The derivatives' ``dataset_description.json`` (DatasetType derivative, provenance)."""
    source: dict[str, Any] = {"URL": bids_dir.as_uri()}
    desc_file = bids_dir / "dataset_description.json"
    if desc_file.is_file():
        try:
            raw = json.loads(desc_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = {}
        for key in ("Name", "DatasetDOI", "License"):
            if key in raw:
                source[key if key != "DatasetDOI" else "DOI"] = raw[key]
    description = {
        "Name": "brainage-bids derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "brainage-bids",
            "Version": __version__,
            "Description": "Brain age with a weight-shared spatial-attention 3D CNN "
                           "(Kancharla & Sinha, 2024)",
            "CodeURL": "https://github.com/brainage-bids/brainage-bids",
        }],
        "SourceDatasets": [source],
    }
    container = os.environ.get("BRAINAGE_BIDS_CONTAINER")  # set by the Dockerfile
    if container:
        description["GeneratedBy"][0]["Container"] = {"Type": "docker", "Tag": container}
    target = output_dir / "dataset_description.json"
    atomic_write_json(target, description)
    return target
