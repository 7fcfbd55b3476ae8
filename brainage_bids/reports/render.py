"""HTML reports: one ``sub-X.html`` per participant and ``group_brainage.html``.

Every asset is inline (figures as base64 data URIs, CSS and the few lines of table-sorting
JavaScript in the page), so a report copied off the cluster opens offline and makes no
network request. Templates are rendered with autoescaping, so text from the dataset (a
participants.tsv value, an error message) is shown as text, never run as code. Figures are
also written under ``OUTPUT_DIR/sub-X/figures/`` for reuse in papers and slides.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from brainage_bids import __version__
from brainage_bids.bids import T1wImage
from brainage_bids.citation import Methods, describe_uncertainty
from brainage_bids.config import BIAS_METHODS
from brainage_bids.derivatives import QC_FALSE, derivative_path, figure_path, report_path
from brainage_bids.io import atomic_write_bytes, atomic_write_text
from brainage_bids.templates import RESOLUTION_MM, TEMPLATE, template_path

LOG = logging.getLogger(__name__)

MNI = {"space": TEMPLATE, "res": str(RESOLUTION_MM)}
METHOD_LABELS = {"uncorrected": "uncorrected", "beheshti": "Beheshti 2019",
                 "cole": "de Lange & Cole 2020", "smith": "Smith 2019"}
MIME = {"png": "image/png", "svg": "image/svg+xml"}


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("brainage_bids.reports", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True, keep_trailing_newline=True)


def data_uri(data: bytes, fmt: str) -> str:
    """A figure as a ``data:`` URI, so the page needs no separate file."""
    return f"data:{MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt(value: Any, digits: int = 2, signed: bool = False) -> str:
    """Numbers for people: fixed decimals, ``n/a`` for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _figure(make: Callable[[], Any], title: str, caption: str, *, fmt: str = "png",
            target: Path | None = None, output_dir: Path | None = None) -> dict[str, Any]:
    """Render one figure (saved to ``target`` when given); a failure becomes a note."""
    from brainage_bids.reports.figures import figure_bytes

    entry: dict[str, Any] = {"title": title, "caption": caption, "src": None, "error": None,
                             "file": None, "wide": False}
    try:
        fig = make()
        data = figure_bytes(fig, fmt)
        fig.clear()
    except Exception as err:  # a broken derivative must not cost the whole report
        LOG.warning("figure %r not rendered: %s", title, err)
        entry["error"] = f"figure not rendered: {str(err).splitlines()[0] if str(err) else err!r}"
        return entry
    entry["src"] = data_uri(data, fmt)
    if target is not None:
        atomic_write_bytes(target, data)
        entry["file"] = (target.relative_to(output_dir).as_posix() if output_dir is not None
                         else target.name)
    return entry


# --- participant reports --------------------------------------------------------------------


def _qc_rows(qc: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """QC entries as table rows; nested sections flattened, booleans as pass/fail."""
    rows = []
    for key, value in qc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _qc_rows(value, f"{name}.")
        elif isinstance(value, bool):
            rows.append({"name": name, "value": "pass" if value else "fail",
                         "status": "pass" if value else "fail"})
        elif isinstance(value, float):
            rows.append({"name": name, "value": f"{value:.4g}", "status": None})
        elif isinstance(value, (list, tuple)):
            rows.append({"name": name, "value": ", ".join(map(str, value)) or "none",
                         "status": None})
        else:
            rows.append({"name": name, "value": _fmt(value), "status": None})
    return rows


def _age_scale(age: float | None, predicted: float | None, sd: float | None,
               lo_hi: tuple[float, float] | None) -> dict[str, Any] | None:
    """Positions (percent) for the inline SVG age ruler: age, prediction and its ±2 SD."""
    if predicted is None:
        return None
    values = [v for v in (age, predicted) if v is not None]
    band = 2 * (sd or 0)
    low = min([*values, predicted - band, *(lo_hi or ())])
    high = max([*values, predicted + band, *(lo_hi or ())])
    low, high = 10 * math.floor(low / 10 - 0.3), 10 * math.ceil(high / 10 + 0.3)
    low = max(low, 0)

    def pos(v: float) -> float:
        return round(100 * (v - low) / (high - low), 2)

    ticks = [{"x": pos(t), "label": str(t)} for t in range(int(low), int(high) + 1, 10)]
    return {"age": None if age is None else pos(age), "pred": pos(predicted),
            "band_lo": pos(max(low, predicted - band)),
            "band_hi": pos(min(high, predicted + band)), "ticks": ticks,
            "range": None if not lo_hi else (pos(lo_hi[0]), pos(lo_hi[1]))}


def _paths(output_dir: Path, entities: dict[str, Any]) -> dict[str, Path]:
    def path(suffix: str, extension: str = ".nii.gz", **ents: str) -> Path:
        return derivative_path(output_dir, entities, suffix=suffix, extension=extension, **ents)

    return {
        "record": path("brainage", ".json"),
        "preproc": path("T1w", **MNI, desc="preproc"),
        "mask_mni": path("mask", **MNI, desc="brain"),
        "mask_native": path("mask", desc="brain"),
        "gradcam": path("saliency", **MNI, desc="gradcam"),
        "attention": path("saliency", **MNI, desc="attention"),
    }


def _image_figures(output_dir: Path, image: T1wImage,
                   paths: dict[str, Path]) -> list[dict[str, Any]]:
    """The figures of one image, from whatever derivatives exist."""
    from brainage_bids.reports import figures

    def target(desc: str, **ents: str) -> Path:
        return figure_path(output_dir, image.entities, desc=desc, **ents)

    out = []
    if paths["preproc"].is_file():
        mask = paths["mask_mni"] if paths["mask_mni"].is_file() else None
        out.append(_figure(
            lambda: figures.registration_mosaic(paths["preproc"],
                                                template_path("brain", "mask"), mask,
                                                template_path("brain")),
            "Registration to MNI152NLin6Asym (2 mm)",
            "The skull-stripped T1w after the 12-dof affine registration, with the outlines of "
            "the template's brain mask (red), of its white matter (yellow) and of this "
            "image's brain mask (blue). The red outline should follow the brain's edge and "
            "the yellow one the white matter and ventricles in every view; a shifted, rotated "
            "or scaled brain means the registration failed and the prediction is not valid.",
            target=target("registration", **MNI), output_dir=output_dir))
    if paths["mask_native"].is_file() and image.path.is_file():
        out.append(_figure(
            lambda: figures.mask_mosaic(image.path, paths["mask_native"]),
            "Brain mask (native space)",
            "The input T1w with the brain mask (shaded, outlined in red). The mask should "
            "cover the whole brain, cerebellum included, and exclude skull, eyes and neck.",
            target=target("brainmask"), output_dir=output_dir))
    if paths["preproc"].is_file() and paths["gradcam"].is_file():
        block = figures.late_gradcam_volume(paths["gradcam"])
        out.append(_figure(
            lambda: figures.saliency_mosaic(paths["preproc"], paths["gradcam"], volume=block,
                                            label=f"Grad-CAM, conv block {block + 1}"),
            f"Saliency: Grad-CAM of convolution block {block + 1}",
            "Where the features of a late convolution block drive the predicted age "
            "(Grad-CAM, normalised to 0..1; values below 0.2 are not shown).",
            target=target("gradcam", **MNI), output_dir=output_dir))
        out.append(_figure(
            lambda: figures.gradcam_strip(paths["preproc"], paths["gradcam"]),
            "Saliency: Grad-CAM of every convolution block",
            "One axial slice, from the first (fine) to the last (coarse) block.",
            target=target("gradcamblocks", **MNI), output_dir=output_dir))
    if paths["preproc"].is_file() and paths["attention"].is_file():
        out.append(_figure(
            lambda: figures.saliency_mosaic(paths["preproc"], paths["attention"],
                                            label="spatial attention"),
            "Saliency: shared spatial-attention map",
            "The weight-shared spatial-attention module's map (mean over its seven uses), "
            "normalised to 0..1.",
            target=target("attention", **MNI), output_dir=output_dir))
    return out


def _uncertainty_text(uncertainty: dict[str, Any]) -> str:
    """The record's SD in words, e.g. an ensemble's spread combined with MC dropout."""
    members = uncertainty.get("n_members")
    return describe_uncertainty(
        samples=uncertainty.get("samples", "n/a"),
        n_members=members if isinstance(members, int) else 1,
        scale=uncertainty.get("calibration_scale") if uncertainty.get("calibrated") else None,
        scaled=uncertainty.get("scaled"), method=uncertainty.get("method"))


def _image_section(output_dir: Path, image: T1wImage, error: str | None) -> dict[str, Any]:
    paths = _paths(output_dir, image.entities)
    record: dict[str, Any] = {}
    if paths["record"].is_file():
        try:
            record = json.loads(paths["record"].read_text())
        except (OSError, json.JSONDecodeError) as err:
            error = error or f"unreadable brain-age record: {err}"
    if not record and error is None:
        error = "no brain-age record was written (see the log in OUTPUT_DIR/logs)"
    age = record.get("chronological_age", image.age)
    predicted = record.get("predicted_age")
    sd = (record.get("uncertainty") or {}).get("sd")
    gap = record.get("brain_age_gap")
    model = record.get("model") or {}
    qc = record.get("qc") or {}
    age_range = model.get("age_range")
    lo_hi = None
    if isinstance(age_range, (list, tuple)) and len(age_range) == 2:
        lo_hi = (float(age_range[0]), float(age_range[1]))
    elif isinstance(age_range, dict) and {"min", "max"} <= set(age_range):
        lo_hi = (float(age_range["min"]), float(age_range["max"]))
    corrected = [{"method": METHOD_LABELS.get(m, m), "value": _fmt(v, signed=True)}
                 for m, v in (record.get("corrected_brain_age_gap") or {}).items()]
    outside = (predicted is not None and lo_hi is not None and age is not None
               and not lo_hi[0] <= age <= lo_hi[1])
    return {
        "id": image.name, "title": image.name, "error": error, "has_record": bool(record),
        "source": record.get("source_file") or str(image.path.name),
        "predicted": _fmt(predicted, 1), "sd": _fmt(sd, 1), "age": _fmt(age, 1),
        "gap": _fmt(gap, 1, signed=True), "corrected": corrected,
        "scale": _age_scale(age, predicted, sd, lo_hi), "outside_range": outside,
        "qc_pass": qc.get("qc_pass"), "qc_rows": _qc_rows(qc),
        "uncertainty": record.get("uncertainty") or {},
        "uncertainty_text": _uncertainty_text(record.get("uncertainty") or {}),
        "model": model, "age_range": lo_hi,
        "preprocessing": record.get("preprocessing") or {},
        "software": record.get("software") or {},
        "figures": _image_figures(output_dir, image, paths),
    }


def _crash_text(output_dir: Path, crash: str | None) -> str | None:
    """A crash file's path relative to OUTPUT_DIR when it lies inside (reports move)."""
    if not crash:
        return None
    try:
        return Path(crash).relative_to(output_dir).as_posix()
    except ValueError:
        return str(crash)


def methods_context(methods: Methods | None) -> dict[str, Any] | None:
    """The Methods section: the paragraphs of ``logs/CITATION.md`` and their references."""
    if methods is None:
        return None
    return {"paragraphs": methods.paragraphs, "references": methods.reference_list()}


def write_participant_report(output_dir: Path, subject: str, images: list[T1wImage],
                             failures: dict[str, str], *,
                             crashes: dict[str, str] | None = None,
                             methods: Methods | None = None) -> Path:
    """``sub-X.html``: one section per T1w image (session, run) of one participant.

    ``failures`` and ``crashes`` (by image node name) fill the Errors section, so a failed
    image is explained in the report itself, with the crash file to open next.
    """
    output_dir = Path(output_dir)
    crashes = crashes or {}
    sections = [_image_section(output_dir, image,
                               failures.get(image.node_name) or failures.get("*"))
                for image in images]
    errors = [{"id": s["id"], "image": s["title"], "error": s["error"],
               "crash": _crash_text(output_dir, crashes.get(image.node_name))}
              for s, image in zip(sections, images, strict=True) if s["error"]]
    html = _environment().get_template("participant.html.j2").render(
        title=f"sub-{subject}", subject=subject, sections=sections, version=__version__,
        generated=_now(), n_failed=len(errors), errors=errors,
        methods=methods_context(methods),
        group_report="group_brainage.html"
        if (output_dir / "group_brainage.html").is_file() else None)
    return atomic_write_text(report_path(output_dir, subject), html)


def write_participant_reports(output_dir: Path, images: list[T1wImage],
                              failures: dict[str, str], *,
                              crashes: dict[str, str] | None = None,
                              methods: Methods | None = None) -> list[Path]:
    """One report per participant among ``images``; failed images show their error.

    A report that cannot be written is logged and skipped: reports must never turn a
    successful participant-level run into a failure.
    """
    by_subject: dict[str, list[T1wImage]] = {}
    for image in images:
        by_subject.setdefault(image.subject, []).append(image)
    written = []
    for subject, subject_images in sorted(by_subject.items()):
        try:
            written.append(write_participant_report(Path(output_dir), subject, subject_images,
                                                    failures, crashes=crashes,
                                                    methods=methods))
        except Exception:
            LOG.exception("the report of sub-%s could not be written", subject)
    LOG.info("wrote %d participant report(s)", len(written))
    return written


# --- group report -------------------------------------------------------------------------


def _column(table, name: str):
    import numpy as np

    if name not in table.columns:
        return np.full(len(table), np.nan)
    return table[name].to_numpy(dtype=float, na_value=np.nan)


def _group_figures(table, summary: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np

    from brainage_bids.reports import figures

    age, pred = _column(table, "age"), _column(table, "predicted_age")
    groups = (table["group"].fillna("n/a").astype(str).tolist()
              if "group" in table.columns else None)
    qc_fail = ((table["qc_pass"] == QC_FALSE).to_numpy() if "qc_pass" in table.columns
               else None)
    gaps = {"uncorrected": _column(table, "brain_age_gap")}
    for method in BIAS_METHODS:
        values = _column(table, f"brain_age_gap_{method}")
        if np.isfinite(values).any():
            gaps[METHOD_LABELS[method]] = values
    primary = summary.get("PrimaryBiasCorrection")
    dist = {"uncorrected": gaps["uncorrected"]}
    if primary and METHOD_LABELS.get(primary) in gaps:
        dist[f"corrected ({METHOD_LABELS[primary]})"] = gaps[METHOD_LABELS[primary]]
    has_age = np.isfinite(age) & np.isfinite(pred)
    selected = None if groups is None else [g for g, k in zip(groups, has_age, strict=True)
                                            if k]
    scatter = _figure(
        lambda: figures.predicted_vs_age(age[has_age], pred[has_age], groups=selected,
                                         qc_fail=None if qc_fail is None else qc_fail[has_age]),
        "Predicted against chronological age",
        "Each point is one image; the dashed line is a perfect prediction. Points marked x "
        "failed quality control.", fmt="svg")
    distribution = _figure(
        lambda: figures.gap_distribution(dist, groups=groups),
        "Distribution of the brain-age gap" + (" by group" if groups else ""),
        "Each point is one image; the black bar is the group mean.", fmt="svg")
    trend = _figure(
        lambda: figures.gap_vs_age(age, gaps, groups=groups, qc_fail=qc_fail),
        "Brain-age gap against age, before and after bias correction",
        "An uncorrected gap falls with age (regression to the mean: young brains are "
        "predicted older, old brains younger); a correction should flatten that slope "
        "(r(gap, age) near 0).", fmt="svg")
    trend["wide"] = True
    out = [scatter, distribution, trend]
    return out


def _cell(value: Any, column: str) -> dict[str, Any]:
    """A table cell: shown text and a sort key (numbers sort as numbers, n/a last)."""
    missing = value is None or (isinstance(value, float) and not math.isfinite(value))
    try:
        import pandas as pd

        missing = missing or bool(pd.isna(value))
    except (TypeError, ValueError):
        pass
    if missing:
        return {"text": "n/a", "sort": "", "numeric": False}
    if isinstance(value, float):
        # years to one decimal, as the participant reports show them: the two never disagree
        years = column in ("age", "predicted_age", "predicted_age_cole", "uncertainty_sd")
        digits = 1 if years or column.startswith("brain_age_gap") else 2
        signed = column.startswith("brain_age_gap")
        return {"text": _fmt(value, digits, signed=signed), "sort": repr(value),
                "numeric": True}
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return {"text": str(value), "sort": str(value), "numeric": True}
    return {"text": str(value), "sort": str(value), "numeric": False}


def _table_rows(table, columns: list[str], output_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for record in table.to_dict(orient="records"):
        participant = str(record["participant_id"])
        report = report_path(output_dir, participant.removeprefix("sub-"))
        cells = [_cell(record.get(c), c) for c in columns]
        rows.append({"cells": cells, "link": report.name if report.is_file() else None,
                     "qc_fail": record.get("qc_pass") == QC_FALSE})
    return rows


def _shown_columns(table, primary: str) -> list[str]:
    """Columns worth a glance in the HTML (the TSV has all of them)."""
    core = ["participant_id", "session_id", "run", "age", "predicted_age", "uncertainty_sd",
            "brain_age_gap", f"brain_age_gap_{primary}", "qc_pass"]
    skip = {"model_sha256", "model_name", "predicted_age_cole",
            *[f"brain_age_gap_{m}" for m in BIAS_METHODS]}
    extra = [c for c in table.columns if c not in core and c not in skip
             and not c.startswith(("qc_", "participants_"))]
    shown = [c for c in core if c in table.columns]
    for optional in ("session_id", "run"):
        if optional in shown and table[optional].isna().all():
            shown.remove(optional)
    return shown + extra


def _metrics_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, metrics in summary.get("Metrics", {}).items():
        rows.append({"name": METHOD_LABELS.get(name, name),
                     "primary": name == summary.get("PrimaryBiasCorrection"),
                     "values": {k: _fmt(metrics.get(k), 0 if k == "N" else 2,
                                        signed=k in ("mean_gap",))
                                for k in ("N", "MAE", "RMSE", "r", "R2", "r_gap_age",
                                          "mean_gap")}})
    return rows


def _coefficient_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for method, entry in summary.get("BiasCorrection", {}).items():
        coefs = entry.get("Coefficients")
        shown = {k: v for k, v in (coefs or {}).items()
                 if k not in ("method", "n") and v not in ([], None)}
        text = ("n/a" if not shown else
                ", ".join(f"{k} = {_coef(v)}" for k, v in _flat(shown)))
        rows.append({"method": METHOD_LABELS.get(method, method), "source": entry.get("Source"),
                     "n": _fmt(entry.get("N"), 0), "coefficients": text})
    return rows


def _coef(value: Any) -> str:
    """A coefficient: integers as such, floats to six significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _flat(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flat(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)) and all(isinstance(v, (int, float)) for v in obj):
        yield prefix.rstrip("."), "[" + ", ".join(_coef(v) for v in obj) + "]"
    else:
        yield prefix.rstrip("."), obj


def write_group_report(output_dir: Path, table, sidecar: dict[str, Any], *,
                       errors: list[dict[str, Any]] | None = None,
                       methods: Methods | None = None) -> Path:
    """``group_brainage.html`` from the group table and its sidecar (``BrainAge`` section).

    ``errors`` (``image``, ``error``, ``crash``) lists the images without a usable record,
    so that a group's missing participants are explained where the group is summarised.
    """
    output_dir = Path(output_dir)
    errors = [{**e, "crash": _crash_text(output_dir, e.get("crash"))} for e in errors or []]
    summary = sidecar.get("BrainAge", {})
    primary = summary.get("PrimaryBiasCorrection") or "beheshti"
    columns = _shown_columns(table, primary)
    headers = [{"name": c, "description": (sidecar.get(c) or {}).get("Description", ""),
                "numeric": c not in ("participant_id", "session_id", "qc_pass")
                and table[c].dtype.kind in "if"} for c in columns]
    html = _environment().get_template("group.html.j2").render(
        title="Brain age: group report", version=__version__, generated=_now(),
        summary=summary, n=summary.get("N", {}), primary=METHOD_LABELS.get(primary, primary),
        metrics=_metrics_rows(summary), coefficients=_coefficient_rows(summary),
        figures=_group_figures(table, summary), headers=headers,
        rows=_table_rows(table, columns, output_dir), models=summary.get("Models", []),
        sources=[(METHOD_LABELS.get(method, method), entry.get("Source", "n/a"))
                 for method, entry in (summary.get("BiasCorrection") or {}).items()
                 if isinstance(entry, dict)],
        errors=errors, methods=methods_context(methods))
    return atomic_write_text(output_dir / "group_brainage.html", html)
