"""The BIDS side: pybids queries for T1w images, ages, and the derivatives' description.

The input dataset is only ever read: pybids is asked not to write a database into it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainage_bids import __version__
from brainage_bids.config import MAX_AGE, MIN_AGE
from brainage_bids.io import atomic_write_json

LOG = logging.getLogger(__name__)

#: The order in which BIDS entities appear in a file name (the subset a T1w can carry).
ENTITY_ORDER = ("subject", "session", "task", "acquisition", "ceagent", "reconstruction",
                "run", "echo", "part", "space", "chunk", "res", "desc", "from", "to", "mode")
ENTITY_KEYS = {"subject": "sub", "session": "ses", "task": "task", "acquisition": "acq",
               "ceagent": "ce", "reconstruction": "rec", "run": "run", "echo": "echo",
               "part": "part", "space": "space", "chunk": "chunk", "res": "res", "desc": "desc",
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
    #: Why participants.tsv/sessions.tsv gives no usable age (file, line, value), if so.
    age_problem: str | None = None

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


#: A number as BIDS writes one: digits with an optional point and exponent (not ``45,5``,
#: not ``1_000``, not ``inf``; Python's ``float`` accepts the last two).
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")


def parse_age(value: Any, *, where: str) -> float | None:
    """``None`` for a missing age (n/a, empty); a clear error for anything else not an age.

    An age is a number of years from :data:`MIN_AGE` to :data:`MAX_AGE`; the message names
    ``where`` (file and line) and the value as written.
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    if text.lower() in MISSING:
        return None
    if not _NUMBER.match(text):
        hint = (f" (write decimals with a point: {text.replace(',', '.')})"
                if _NUMBER.match(text.replace(",", ".", 1)) else "")
        raise BIDSError(f"{where}: age {text!r} is not a number{hint}")
    age = float(text)
    if not MIN_AGE <= age <= MAX_AGE:
        raise BIDSError(f"{where}: age {text!r} is not a valid age in years (expected "
                        f"{MIN_AGE:g} to {MAX_AGE:g}, or n/a when unknown)")
    return age


@dataclass(frozen=True)
class TSVTable:
    """A BIDS TSV file: its column names and its rows, each with its line number."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]


def read_tsv(path: Path, *, id_column: str | None = None) -> TSVTable:
    """Read a BIDS TSV file, strictly, with every error naming the file and the line.

    BIDS TSV rules: UTF-8, the first line names the columns, cells are separated by tabs and
    are never quoted (a double quote is an ordinary character, so a stray one cannot swallow
    the next row as it would with CSV quoting). Each row has as many cells as the header has
    columns; blank lines are ignored. With ``id_column`` that column must exist and each
    value appear once (two rows for one participant would give two ages).
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = Path(path).read_bytes()[: err.start].count(b"\n") + 1
        raise BIDSError(f"{path} line {line}: not UTF-8 text (BIDS TSV files are UTF-8)"
                        ) from None
    except OSError as err:
        raise BIDSError(f"cannot read {path}: {err.strerror or err}") from None
    lines = text.split("\n")
    if not lines[0].strip("\r"):
        raise BIDSError(f"{path} line 1: empty; the first line must name the columns")
    columns = lines[0].rstrip("\r").split("\t")
    seen = [c for i, c in enumerate(columns) if c in columns[:i]]
    if seen:
        raise BIDSError(f"{path} line 1: column {seen[0]!r} appears twice")
    if id_column is not None and id_column not in columns:
        raise BIDSError(f"{path} has no {id_column!r} column (line 1 names: "
                        f"{', '.join(repr(c) for c in columns)}; cells are separated by tabs)")
    rows, numbers = [], []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(columns):
            raise BIDSError(f"{path} line {number}: {len(cells)} cell(s), but line 1 names "
                            f"{len(columns)} column(s) (cells are separated by tabs)")
        row = dict(zip(columns, cells, strict=True))
        if id_column is not None:
            key = row[id_column].strip()
            if not key:
                raise BIDSError(f"{path} line {number}: empty {id_column}")
            if key in first_line:
                raise BIDSError(f"{path} lines {first_line[key]} and {number}: {id_column} "
                                f"{key} appears twice (one row per {id_column} only)")
            first_line[key] = number
        rows.append(row)
        numbers.append(number)
    return TSVTable(Path(path), columns, rows, numbers)


def _age_column(columns: list[str]) -> str | None:
    for name in AGE_COLUMNS:
        if name in columns:
            return name
    return None


def _labels(table: TSVTable, id_column: str, prefix: str) -> dict[str, int]:
    """``{label: row index}``, labels without their ``sub-``/``ses-`` prefix, checked unique."""
    labels: dict[str, int] = {}
    for index, row in enumerate(table.rows):
        label = row[id_column].strip().removeprefix(prefix)
        if label in labels:  # "sub-01" and "01" are the same participant
            raise BIDSError(f"{table.path} lines {table.lines[labels[label]]} and "
                            f"{table.lines[index]}: {id_column} {prefix}{label} appears twice")
        labels[label] = index
    return labels


@dataclass
class AgeTable:
    """Ages by ``(subject, session)`` (session ``None``: participants.tsv), and the problems.

    A bad age (not a number, outside 0-120) belongs to its participant or session alone: its
    age is ``None`` and ``problems`` says why, naming the file, the line and the value, so
    each level decides what to do with the participants it selected.
    """

    ages: dict[tuple[str, str | None], float | None] = field(default_factory=dict)
    problems: dict[tuple[str, str | None], str] = field(default_factory=dict)
    #: Why a participant's sessions.tsv cannot be read at all: that participant's images
    #: with a session lose their age, nobody else's.
    session_files: dict[str, str] = field(default_factory=dict)

    def _read(self, path: Path, id_column: str, prefix: str, subject: str | None) -> None:
        table = read_tsv(path, id_column=id_column)
        column = _age_column(table.columns)
        if column is None and subject is None:  # sessions.tsv often has no age: no warning
            LOG.warning("%s has no age column (one of %s; its columns: %s): images without "
                        "an age in their sessions.tsv get chronological age n/a", path,
                        ", ".join(AGE_COLUMNS),
                        ", ".join(repr(c) for c in table.columns))
        for label, index in _labels(table, id_column, prefix).items():
            key = (label, None) if subject is None else (subject, label)
            if column is None:
                continue
            where = f"{path} line {table.lines[index]}"
            try:
                self.ages[key] = parse_age(table.rows[index][column], where=where)
            except BIDSError as err:
                self.ages[key] = None
                self.problems[key] = str(err)

    def age_of(self, subject: str, session: str | None) -> tuple[float | None, str | None]:
        """``(age, problem)`` of one image: its session's age when sessions.tsv has one."""
        if session is not None and subject in self.session_files:
            return None, self.session_files[subject]
        if session is not None and (subject, session) in self.problems:
            return None, self.problems[(subject, session)]
        if session is not None and (subject, session) in self.ages:
            # its own row, n/a included: participants.tsv's age may be another session's
            return self.ages[(subject, session)], None
        return self.ages.get((subject, None)), self.problems.get((subject, None))


def read_age_table(bids_dir: Path) -> AgeTable:
    """Ages from participants.tsv and every ``sub-X/sub-X_sessions.tsv``.

    Errors that make a file unusable (no id column, a row with the wrong number of cells, two
    rows for one participant or session) raise :class:`BIDSError` naming the file and line
    for participants.tsv; for a participant's sessions.tsv they are that participant's
    problem alone (``session_files``). A bad age is only recorded (:class:`AgeTable`).
    """
    table = AgeTable()
    participants = bids_dir / "participants.tsv"
    if participants.exists():
        table._read(participants, "participant_id", "sub-", None)
    for sessions in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv")):
        subject = sessions.parent.name.removeprefix("sub-")
        try:
            table._read(sessions, "session_id", "ses-", subject)
        except BIDSError as err:
            table.session_files[subject] = str(err)
    return table


def read_ages(bids_dir: Path) -> dict[tuple[str, str | None], float | None]:
    """Ages keyed by ``(subject, session)``; a bad age is ``None`` (see :class:`AgeTable`).

    For evaluations, which need every age: a sessions.tsv that cannot be read raises.
    """
    table = read_age_table(bids_dir)
    if table.session_files:
        raise BIDSError(next(iter(table.session_files.values())))
    return table.ages


#: A T1w file name, for entries pybids does not index (a directory named like an image).
_T1W_NAME = re.compile(r"^sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*_T1w\.nii(?:\.gz)?$")


def _unindexed_t1w(root: Path, indexed: set[str]) -> list[str]:
    """T1w-named entries under ``sub-*/[ses-*/]anat/`` that pybids left out.

    pybids indexes files only, so a directory (or a link to one) named ``sub-X_T1w.nii.gz``
    would vanish from the run without a word; listing such entries here makes them fail
    by name instead. Regular files that pybids rejected (an invalid name) stay out.
    """
    found = []
    for anat in [*sorted(root.glob("sub-*/anat")), *sorted(root.glob("sub-*/ses-*/anat"))]:
        try:
            entries = sorted(os.scandir(anat), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if (_T1W_NAME.match(entry.name) and entry.path not in indexed
                    and not entry.is_file(follow_symlinks=False)):
                found.append(entry.path)
    return found


def _matches(entities: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Whether an unindexed entry matches the ``t1w`` filters of a filter file (plain values)."""
    for key, want in filters.items():
        if key in ("datatype", "suffix", "extension"):
            continue
        have = entities.get(key)
        if want is None:
            if have is not None:
                return False
        elif isinstance(want, list):
            if str(have) not in {str(w) for w in want}:
                return False
        elif want != "*" and str(have) != str(want):
            return False
    return True


def collect_t1w(layout, *, participant_label: tuple[str, ...] = (),
                session_label: tuple[str, ...] = (),
                filters: dict[str, Any] | None = None) -> list[T1wImage]:
    """Every T1w image selected by labels and filters, each with its age when known.

    An image whose age in participants.tsv (or sessions.tsv) is not valid gets age ``None``
    and the problem in ``age_problem``; participants that are not selected are never read
    for anything but the file's structure.
    """
    from bids.layout import parse_file_entities

    root = Path(layout.root)
    t1w_filters = (filters or {}).get("t1w", {})
    query: dict[str, Any] = {"datatype": "anat", "suffix": "T1w",
                             "extension": [".nii", ".nii.gz"], **t1w_filters}
    everything = layout.get(return_type="filename", datatype="anat", suffix="T1w",
                            extension=[".nii", ".nii.gz"])
    unindexed = [(path, {k: v for k, v in parse_file_entities(path).items()
                         if k in ENTITY_KEYS})
                 for path in _unindexed_t1w(root, set(everything))]
    subjects = set(layout.get_subjects()) | {str(e["subject"]) for _, e in unindexed}
    unknown = sorted(set(participant_label) - subjects)
    if unknown:
        known = sorted(subjects)
        some = ", ".join(f"sub-{s}" for s in known[:5]) + (
            f" ... ({len(known)} in all)" if len(known) > 5 else "")
        raise BIDSError("participant label(s) not found in the dataset: "
                        + ", ".join(f"sub-{s}" for s in unknown)
                        + f" (it has {some or 'none'})")
    if participant_label:
        query["subject"] = list(participant_label)
    if session_label:
        sessions = set(layout.get_sessions()) | {str(e["session"]) for _, e in unindexed
                                                 if "session" in e}
        missing = sorted(set(session_label) - sessions)
        if missing:
            raise BIDSError("session label(s) not found in the dataset: "
                            + ", ".join(f"ses-{s}" for s in missing))
        query["session"] = list(session_label)
    # file names, not BIDSFile objects: reading each object's entities back from pybids'
    # database costs more than indexing the dataset; the names hold the same entities
    files = {path: {k: v for k, v in parse_file_entities(path).items() if k in ENTITY_KEYS}
             for path in layout.get(return_type="filename", **query)}
    for path, entities in unindexed:
        if ((not participant_label or str(entities["subject"]) in participant_label)
                and (not session_label or str(entities.get("session")) in session_label)
                and _matches(entities, t1w_filters)):
            files[path] = entities
    if not files:
        who = (" for " + ", ".join(f"sub-{s}" for s in participant_label)
               if participant_label else "")
        raise BIDSError(f"no T1w images found{who} in {layout.root}")
    ages = read_age_table(root)
    images = []
    for path in sorted(files):
        entities = files[path]
        age, problem = ages.age_of(str(entities["subject"]), entities.get("session"))
        images.append(T1wImage(path=Path(path), entities=entities, age=age,
                               age_problem=problem))
    _refuse_shared_names(images)
    return images


def _refuse_shared_names(images: list[T1wImage]) -> None:
    """Two images whose names differ only in entities a derivative does not carry (``desc``
    of an unvalidated dataset, say) would write the same derivatives: refuse before any work.
    """
    by_name: dict[str, list[Path]] = {}
    for image in images:
        by_name.setdefault(image.name, []).append(image.path)
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if clashes:
        name, paths = next(iter(clashes.items()))
        more = f" (and {len(clashes) - 1} more such name(s))" if len(clashes) > 1 else ""
        raise BIDSError(
            f"{', '.join(p.name for p in paths)} would all write the derivatives of {name}"
            f"{more}: select one of them with --bids-filter-file")


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
