"""The participant level over a cohort: the image queue, progress lines, reports, methods.

:mod:`brainage_bids.workflows.scheduler` runs the images; this module decides what a user
sees while it does (one line per finished image with an ETA), what the reports are given
(the errors and their crash files, the methods text) and how ``--reports-only`` re-renders
reports from the derivatives that exist, without preprocessing or predicting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from brainage_bids.bids import T1wImage
from brainage_bids.citation import Methods, participant_methods, write_citation
from brainage_bids.config import Settings
from brainage_bids.derivatives import derivative_path
from brainage_bids.progress import Progress
from brainage_bids.workflows.scheduler import (
    ImageJob,
    ImageResult,
    ReportJob,
    image_workers,
    render_reports,
    run_images,
)

LOG = logging.getLogger("brainage_bids")


def record_path(output_dir: Path, image: T1wImage) -> Path:
    return derivative_path(output_dir, image.entities, suffix="brainage", extension=".json")


def describe_image(output_dir: Path, image: T1wImage) -> str:
    """``sub-X: predicted age 52.3 (age 49.1)`` from the image's record, as it now exists."""
    try:
        record = json.loads(record_path(output_dir, image).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{image.name}: done, but no brain-age record was written"
    age = record.get("chronological_age")
    known = f" (age {age:.1f})" if isinstance(age, (int, float)) else ""
    qc = record.get("qc") or {}
    failed = [k.removesuffix("_ok") for k, v in qc.items() if k.endswith("_ok") and v is False]
    flag = f"; QC failed ({', '.join(failed)}): see qc in its record" if failed else ""
    return f"{image.name}: predicted age {record['predicted_age']:.1f}{known}{flag}"


def render_one(job: ReportJob, *, output_dir: Path, methods: Methods | None) -> str:
    """Render one participant's report (in a report process); returns its path."""
    from brainage_bids.reports.render import write_participant_report

    return str(write_participant_report(output_dir, job.subject, job.images, job.failures,
                                        crashes=job.crashes, methods=methods))


def write_methods(settings: Settings, *, backend: str, card: dict[str, Any],
                  saliency: bool) -> Methods:
    """``logs/CITATION.md`` and ``.bib`` for this participant-level run."""
    methods = participant_methods(backend=backend, card=card, mc_samples=settings.mc_samples,
                                  saliency=saliency)
    LOG.info("methods boilerplate: %s", write_citation(settings.logs_dir, methods))
    return methods


def _report_done(job: ReportJob, future: Future) -> None:
    err = future.exception()
    if err is not None:  # a report must never turn a successful run into a failure
        LOG.warning("the report of sub-%s could not be written: %s", job.subject,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)


def describe_preprocessed(output_dir: Path, image: T1wImage) -> str:
    """``sub-X: preprocessed``: the progress line of an image run without a model."""
    return f"{image.name}: preprocessed"


def preprocess_cohort(settings: Settings, images: Sequence[T1wImage],
                      workflow_args: dict[str, Any]) -> dict[str, str]:
    """The train level's preprocessing: the participant level's queue, without a model.

    Images finish one after another with a progress line each, as in the participant level
    (one nipype graph of every image would show nothing for most of a cohort's run); no
    reports are rendered. Returns ``{image node name: one-line error}`` of the failures.
    """
    failures, _ = run_cohort(replace(settings, reports=False), images,
                             workflow_args={**workflow_args, "model": None}, methods=None,
                             describe=describe_preprocessed)
    return failures


def run_cohort(settings: Settings, images: Sequence[T1wImage], *,
               workflow_args: dict[str, Any], methods: Methods | None,
               describe: Callable[[Path, T1wImage], str] = describe_image,
               ) -> tuple[dict[str, str], dict[str, str]]:
    """Run every image, reporting each as it finishes; return ``(failures, crash files)``.

    Both map an image's node name to its one-line error and to its crash file. ``describe``
    gives a finished image's progress line.
    """
    from brainage_bids.validation import screen_images
    from brainage_bids.workflows.outputs import (
        remove_image_outputs,
        remove_report_temporaries,
    )

    started = time.time()
    crash_dir = settings.logs_dir / "crashes"
    log_level = "INFO" if settings.verbose >= 2 else "WARNING"
    usable, rejected = screen_images(images)  # a FIFO, a dangling link: fail alone, now
    jobs = [ImageJob(image=image, workflow_args=workflow_args, work_dir=settings.work_dir,
                     crash_dir=crash_dir, log_level=log_level, log_file=log_file(settings),
                     nipype_to_terminal=settings.verbose >= 2) for image in usable]
    workers = image_workers(nprocs=settings.nprocs, omp_nthreads=settings.omp_nthreads,
                            mem_gb=settings.mem_gb)
    predicted = (f" and predicted on {settings.omp_nthreads}"
                 if workflow_args.get("model") is not None else "")
    LOG.info("processing %d image(s), %d at a time, each preprocessed on 1 thread%s%s",
             len(jobs), workers, predicted,
             f" ({len(rejected)} more cannot be opened)" if rejected else "")
    progress = Progress(len(images), logger=LOG)
    failures: dict[str, str] = {}
    crashes: dict[str, str] = {}

    def finished(result: ImageResult) -> None:
        image = result.image
        if result.ok:
            progress.advance(describe(settings.output_dir, image),
                             seconds=result.seconds)
            return
        failures[image.node_name] = result.error or "failed"
        if result.crash_file:
            crashes[image.node_name] = result.crash_file
        crash = f" (crash file: {result.crash_file})" if result.crash_file else ""
        progress.advance(f"{image.name}: FAILED: {result.error}{crash}",
                         seconds=result.seconds, failed=True)

    def aborted(in_flight: list[T1wImage], reports: list[ReportJob]) -> None:
        for image in in_flight:  # nothing of an interrupted image may look complete
            removed = remove_image_outputs(settings.output_dir, image.entities, since=started)
            if removed:
                LOG.info("%s: interrupted; removed %d partial output(s)", image.name,
                         len(removed))
        for report in reports:
            remove_report_temporaries(settings.output_dir, report.subject, report.images)

    render = (partial(render_one, output_dir=settings.output_dir, methods=methods)
              if settings.reports else None)
    try:
        run_images(jobs, workers=workers, on_image=finished, render=render,
                   report_workers=settings.nprocs, on_report=_report_done,
                   failed=[ImageResult(image, False, 0.0, reason)
                           for image, reason in rejected],
                   on_abort=aborted)
    finally:
        progress.close()
    return failures, crashes


def log_file(settings: Settings) -> Path:
    """The run's log file (``logs/brainage-<run>.log``)."""
    return settings.logs_dir / f"brainage-{settings.run_uuid}.log"


def last_failures(logs_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Errors and crash files of each image's latest run, from ``logs/summary-*.json``.

    Keyed by image name (``sub-X_ses-Y``); an image that later succeeded is dropped.
    """
    errors: dict[str, str] = {}
    crashes: dict[str, str] = {}
    summaries = sorted(Path(logs_dir).glob("summary-*.json"), key=lambda p: p.stat().st_mtime)
    for path in summaries:
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(summary, dict) or summary.get("level") != "participant":
            continue
        for row in summary.get("images", []):
            name = row.get("image")
            if not name:
                continue
            errors.pop(name, None)
            crashes.pop(name, None)
            if row.get("status") == "failed":
                errors[name] = str(row.get("error") or "failed")
                if row.get("crash_file"):
                    crashes[name] = str(row["crash_file"])
    return errors, crashes


def reports_only(settings: Settings, images: Sequence[T1wImage],
                 methods: Methods | None) -> int:
    """``--reports-only``: re-render every selected participant's report from derivatives.

    Errors come from the latest participant-level summaries in ``logs/``, so a failed image
    keeps its reason and crash file in the re-rendered report.
    """
    errors, crash_files = last_failures(settings.logs_dir)
    by_subject: dict[str, list[T1wImage]] = {}
    for image in images:
        by_subject.setdefault(image.subject, []).append(image)
    jobs = [ReportJob(subject, subject_images,
                      {im.node_name: errors[im.name] for im in subject_images
                       if im.name in errors},
                      {im.node_name: crash_files[im.name] for im in subject_images
                       if im.name in crash_files})
            for subject, subject_images in by_subject.items()]
    progress = Progress(len(jobs), logger=LOG, unit="report")
    failed = 0

    def done(job: ReportJob, future: Future) -> None:
        nonlocal failed
        err = future.exception()
        if err is None:
            progress.advance(f"sub-{job.subject}: report {Path(future.result()).name}")
        else:
            failed += 1
            progress.advance(f"sub-{job.subject}: report FAILED: {err}", failed=True)

    try:
        render_reports(jobs, render=partial(render_one, output_dir=settings.output_dir,
                                            methods=methods),
                       workers=settings.nprocs, on_report=done)
    finally:
        progress.close()
    return failed
