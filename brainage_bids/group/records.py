"""The group level's inputs: the brain-age records, participants.tsv and the model card.

A record that cannot be read is named, never silently left out of the table.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_bids.config import Settings
from brainage_bids.derivatives import derivative_path

LOG = logging.getLogger(__name__)


class GroupError(Exception):
    """A group-level request that cannot be served; the message is shown as one line."""


def load_card(spec: str) -> dict[str, Any]:
    """The model card for ``spec``: a ``.json`` card read directly, else via ``load_model``.

    Only the card is needed at group level (its bias-correction coefficients, name and
    checksum); reading a card file directly avoids loading the weights.
    """
    path = Path(spec).expanduser()
    from brainage_bids.model.weights import ModelError, load_model, parse_card

    if path.suffix == ".json" and path.is_file():
        try:
            return parse_card(path)
        except ModelError as err:
            raise GroupError(str(err)) from None

    try:
        return load_model(str(path.resolve()) if path.exists() else spec, device="cpu")[1]
    except Exception as err:  # the loader raises several types for a bad spec
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GroupError(f"cannot load the model card of --model {spec}: {message}") from None


def record_path(output_dir: Path, image: Any) -> Path:
    """Where the participant level writes an image's brain-age record."""
    return derivative_path(output_dir, image.entities, suffix="brainage", extension=".json")


def find_records(settings: Settings) -> tuple[list[Any], list[str]]:
    """The selected T1w images that have a brain-age record (:func:`record_path`), and the
    names of the selected images that have none."""
    from brainage_bids.bids import collect_t1w, load_layout

    layout = load_layout(settings.bids_dir, validate=not settings.skip_bids_validation,
                         index_metadata=bool(settings.bids_filters))
    images = collect_t1w(layout, participant_label=settings.participant_label,
                         session_label=settings.session_label, filters=settings.bids_filters)
    has_record = [record_path(settings.output_dir, image).is_file() for image in images]
    found = [image for image, has in zip(images, has_record, strict=True) if has]
    missing = [image.name for image, has in zip(images, has_record, strict=True) if not has]
    if missing:
        LOG.info("%d of %d selected T1w image(s) have no brain-age record (not processed, "
                 "or failed)", len(missing), len(images))
    return found, missing


def record_problem(record: Any) -> str | None:
    """What makes a parsed record unusable for the table (``None`` when it is usable)."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    participant = record.get("participant_id")
    if not isinstance(participant, str) or not participant.startswith("sub-"):
        return f"participant_id {participant!r} is not a 'sub-<label>' string"
    predicted = record.get("predicted_age")
    if isinstance(predicted, bool) or not isinstance(predicted, (int, float)) or not (
            math.isfinite(predicted)):
        return f"predicted_age {predicted!r} is not a number"
    age = record.get("chronological_age")
    if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float))):
        return f"chronological_age {age!r} is neither a number nor null"
    run = record.get("run")
    if run is not None and (isinstance(run, bool) or not isinstance(run, int)):
        return f"run {run!r} is neither an integer nor null"
    session = record.get("session_id")
    if session is not None and not isinstance(session, str):
        return f"session_id {session!r} is neither a string nor null"
    for section in ("qc", "model", "uncertainty"):
        if record.get(section) is not None and not isinstance(record[section], dict):
            return f"{section!r} is not a JSON object"
    return None


def read_records(paths: list[Path], *, skip_unreadable: bool = False) -> list[dict[str, Any]]:
    """Parse every record; each one that cannot be read is named.

    A record that cannot be read (truncated JSON, the wrong schema) would leave its image out
    of the table without a word, so it is an error (:class:`GroupError`) after every such
    record has been named in the log; with ``skip_unreadable`` the table is written without
    them (each still named as a warning).
    """
    records: list[dict[str, Any]] = []
    problems: list[tuple[Path, str]] = []
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            problems.append((path, f"not valid JSON (truncated?): {err}"))
            continue
        except (OSError, UnicodeDecodeError) as err:
            problems.append((path, f"cannot be read: {err}"))
            continue
        problem = record_problem(record)
        if problem is not None:
            problems.append((path, f"not a brain-age record: {problem}"))
            continue
        records.append(record)
    for path, problem in problems:
        LOG.log(logging.WARNING if skip_unreadable else logging.ERROR, "%s: %s", path, problem)
    if problems and not skip_unreadable:
        raise GroupError(f"{len(problems)} brain-age record(s) cannot be read (each named "
                         f"above; the first: {problems[0][0]}); rerun the participant level "
                         "for them, or pass --skip-unreadable to write the table without "
                         "them")
    if problems:
        LOG.warning("the group table leaves out %d unreadable record(s) (--skip-unreadable)",
                    len(problems))
    return records


def read_participants(bids_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """participants.tsv as strings (kept exactly as written) and participants.json.

    Read by the BIDS TSV rules (:func:`brainage_bids.bids.read_tsv`: tabs, no quoting), so a
    malformed file is an error naming the file and the line, never a silently shifted row.
    """
    from brainage_bids.bids import BIDSError, read_tsv

    tsv, sidecar = bids_dir / "participants.tsv", bids_dir / "participants.json"
    table = pd.DataFrame(columns=["participant_id"], dtype=object)
    if tsv.exists():
        try:
            parsed = read_tsv(tsv, id_column="participant_id")
        except BIDSError as err:
            raise GroupError(str(err)) from None
        table = pd.DataFrame(parsed.rows, columns=parsed.columns, dtype=object)
    described: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            described = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            LOG.warning("ignoring unreadable %s", sidecar)
    table["participant_id"] = [p if p.startswith("sub-") else f"sub-{p}"
                               for p in table["participant_id"].str.strip()]
    duplicated = table["participant_id"].duplicated(keep=False)
    if duplicated.any():  # "sub-01" and "01" in one file
        raise GroupError(f"{tsv}: participant_id {table['participant_id'][duplicated].iloc[0]} "
                         "appears twice")
    return table, described if isinstance(described, dict) else {}
