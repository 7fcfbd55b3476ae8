"""The ``group`` analysis level: records in, table, sidecar, report and methods text out."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_bids import __version__
from brainage_bids.config import BIAS_METHODS, Settings
from brainage_bids.derivatives import QC_FALSE, derivative_path
from brainage_bids.group.correction import (
    apply_corrections,
    bias_coefficients,
    group_metrics,
    reference_rows,
)
from brainage_bids.group.records import (
    GroupError,
    find_records,
    load_card,
    read_participants,
    read_records,
    record_path,
)
from brainage_bids.group.table import (
    TABLE_NAME,
    describe_columns,
    merge_participants,
    records_table,
    write_table,
)
from brainage_bids.io import atomic_write_json

LOG = logging.getLogger(__name__)


def build_group(settings: Settings, *, card: dict[str, Any] | None = None,
                ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The group table and its sidecar (nothing written): the testable core of the level.

    ``card`` is ``--model``'s card when the caller has loaded it already (else it is loaded
    here, unless ``--bias-reference`` makes it unnecessary).
    """
    from brainage_bids.templates import TEMPLATE

    images, without_record = find_records(settings)
    records = read_records([record_path(settings.output_dir, image) for image in images],
                           skip_unreadable=settings.skip_unreadable)
    if not records:
        who = (" for " + ", ".join(f"sub-{s}" for s in settings.participant_label)
               if settings.participant_label else "")
        raise GroupError(f"no brain-age records{who} in {settings.output_dir}: run the "
                         "participant level first")
    table, qc_names = records_table(records)
    participants, described = read_participants(settings.bids_dir)

    models = sorted({(str(n), str(s)) for n, s in zip(table["model_name"],
                                                     table["model_sha256"], strict=True)})
    if len(models) > 1:
        LOG.warning("the records come from %d different models: %s", len(models),
                    ", ".join(n for n, _ in models))
    reference = None
    if settings.bias_reference:
        card = None
        if participants.columns.tolist() == ["participant_id"]:
            raise GroupError(f"--bias-reference {settings.bias_reference} needs a "
                             f"participants.tsv in {settings.bids_dir}")
        reference = reference_rows(table, participants, settings.bias_reference)
    else:
        card = card if card is not None else load_card(settings.model)
        card_sha = card.get("sha256")
        mismatched = sorted(n for n, s in models if card_sha and s not in (card_sha, "None"))
        if mismatched:
            raise GroupError(f"the records were made with model(s) {', '.join(mismatched)}, "
                             f"not with --model {settings.model} ({card.get('name')}): pass "
                             "the participant level's --model, or --bias-reference")
    coefficients = bias_coefficients(table, card=card, reference=reference,
                                     reference_spec=settings.bias_reference,
                                     model_spec=settings.model)
    table = apply_corrections(table, coefficients)
    metrics = group_metrics(table)

    order = ["participant_id", "session_id", "run", "age", "predicted_age", "brain_age_gap",
             *[f"brain_age_gap_{m}" for m in BIAS_METHODS], "predicted_age_cole",
             "uncertainty_sd", "qc_pass", *[f"qc_{n}" for n in qc_names], "model_name",
             "model_sha256"]
    table = table[order]
    table, participant_columns = merge_participants(table, participants, described)
    sidecar = describe_columns(list(table.columns), qc_names, participant_columns)
    with_age = np.isfinite(table["age"].to_numpy(float))
    sidecar["BrainAge"] = {
        "Description": "Summary of the group level: accuracy metrics over images with a known "
                       "age (uncorrected and after each bias correction) and the "
                       "bias-correction coefficients with their origin",
        "N": {"images": len(table), "participants": int(table["participant_id"].nunique()),
              "images_with_age": int(with_age.sum()),
              "images_qc_fail": int((table["qc_pass"] == QC_FALSE).sum()),
              "images_without_record": len(without_record)},
        "WithoutRecord": without_record,
        "Metrics": metrics,
        "MetricsDescription": {
            "N": "number of images with a known age", "MAE": "mean absolute error (years)",
            "RMSE": "root-mean-square error (years)",
            "r": "Pearson correlation of (corrected) predicted age with age",
            "R2": "coefficient of determination of (corrected) predicted age for age",
            "r_gap_age": "Pearson correlation of the (corrected) gap with age: the age bias",
            "mean_gap": "mean (corrected) brain-age gap (years)"},
        "PrimaryBiasCorrection": settings.bias_method,
        "BiasCorrection": coefficients,
        "BiasReference": settings.bias_reference,
        "Models": [{"Name": n, "SHA256": s} for n, s in models],
        # for the methods text (logs/CITATION.md): what the participant level ran
        "PreprocessingBackends": sorted({str((r.get("preprocessing") or {}).get("backend"))
                                         for r in records}),
        "UncertaintySamples": max((int((r.get("uncertainty") or {}).get("samples") or 0)
                                   for r in records), default=0),
        "SaliencyMaps": any(
            derivative_path(settings.output_dir, image.entities, suffix="saliency",
                            extension=".nii.gz", space=TEMPLATE, res="2",
                            desc="gradcam").is_file() for image in images),
        "GeneratedBy": {"Name": "brainage-bids", "Version": __version__},
    }
    return table, sidecar


def group_errors(settings: Settings,
                 without_record: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Images whose latest participant-level run failed (reason and crash file), and the
    other selected images that have no record yet."""
    from brainage_bids.cohort import last_failures

    errors, crashes = last_failures(settings.logs_dir)
    for name in without_record:
        errors.setdefault(name, "no brain-age record: not processed yet (run the participant "
                                "level for it), or its record was removed")
    return [{"image": name, "error": error, "crash": crashes.get(name)}
            for name, error in sorted(errors.items())]


def group_methods_text(settings: Settings, sidecar: dict[str, Any],
                       card: dict[str, Any] | None = None):
    """The methods of the whole analysis (participant level, then this bias correction);
    ``card`` is ``--model``'s card when the caller has loaded it."""
    from brainage_bids.citation import group_methods

    summary = sidecar["BrainAge"]
    primary = summary["BiasCorrection"].get(settings.bias_method) or {}
    backends = summary.get("PreprocessingBackends") or ["ants"]
    return group_methods(backend=backends[0],
                         card=records_card(settings, summary["Models"], card),
                         mc_samples=summary.get("UncertaintySamples") or 0,
                         bias_method=settings.bias_method,
                         bias_source=primary.get("Source"),
                         saliency=bool(summary.get("SaliencyMaps")),
                         corrections=summary["BiasCorrection"], group=summary["N"])


def records_card(settings: Settings, models: list[dict[str, Any]],
                 card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of the model that made the records, for the methods text: ``card`` or
    ``--model``'s, or (with ``--bias-reference``, where ``--model`` may be left at its
    default) the shipped model the records name; else what the records say of it (name and
    checksum)."""
    shas = {m.get("SHA256") for m in models}
    if card is not None and card.get("sha256") in shas:
        return card
    for spec in dict.fromkeys([settings.model, *(str(m.get("Name")) for m in models)]):
        try:
            card = load_card(spec)
        except GroupError:
            continue
        if card.get("sha256") in shas:
            return card
    return {"name": models[0].get("Name"), "sha256": models[0].get("SHA256")} if len(
        models) == 1 else {}


def run_group(settings: Settings) -> int:
    """The ``group`` analysis level: table, sidecar and HTML report under OUTPUT_DIR."""
    from brainage_bids.citation import write_citation

    card = None if settings.bias_reference else load_card(settings.model)  # loaded once
    table, sidecar = build_group(settings, card=card)
    out = Path(settings.output_dir)
    tsv = write_table(table, out / f"{TABLE_NAME}.tsv")
    atomic_write_json(out / f"{TABLE_NAME}.json", sidecar)
    summary = sidecar["BrainAge"]
    LOG.info("group table: %s (%d image(s), %d participant(s))", tsv,
             summary["N"]["images"], summary["N"]["participants"])
    for name, metrics in summary["Metrics"].items():
        LOG.info("%-11s MAE %.2f years, r(gap, age) %s", name, metrics.get("MAE", math.nan),
                 metrics.get("r_gap_age"))
    methods = group_methods_text(settings, sidecar, card)
    LOG.info("methods boilerplate: %s", write_citation(settings.logs_dir, methods))
    if settings.reports:
        from brainage_bids.reports.render import write_group_report

        LOG.info("group report: %s", write_group_report(out, table, sidecar,
                                                        errors=group_errors(
                                                            settings, summary["WithoutRecord"]),
                                                        methods=methods))
    return 0
