"""The participant level's job queue: images finish one after another, reports alongside.

One nipype graph holding every image would make MultiProc run every image's first step,
then every image's second step: on a cohort no record appears until nearly the end, and an
interruption loses everything in flight. Here each image's workflow is one job, run
start to finish by one of ``image_workers`` processes, in the dataset's order, so records
stream out and each finished image is reported at once (:class:`~brainage_bids.progress.
Progress`). A participant's HTML report is rendered as soon as its last image is done, by a
separate pool of lower-priority processes, so reports use the CPU time that the images'
single-threaded phases leave idle instead of forming a serial tail at the end.

Each image's workflow keeps the base directory and name it had inside the old combined
graph (``WORK_DIR/brainage_wf/t1w_<image>_wf``), so nipype's cache is shared with earlier
runs and a rerun with the same work directory redoes nothing that finished.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainage_bids.bids import T1wImage

LOG = logging.getLogger(__name__)

#: Name of the old combined workflow: the per-image workflows live under it in the work dir.
BASE_NAME = "brainage_wf"
#: Niceness added to report processes: they yield the CPU to preprocessing and prediction.
REPORT_NICENESS = 5
#: Memory one image's workflow needs at 2 mm with the ANTs backend (docs/hpc.md), in GB.
IMAGE_MEM_GB = 1.5


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker process needs to build and run one image's workflow."""

    image: T1wImage
    workflow_args: dict[str, Any]
    work_dir: Path
    crash_dir: Path
    log_level: str = "WARNING"


@dataclass(frozen=True)
class ImageResult:
    """What the main process learns when an image's job ends."""

    image: T1wImage
    ok: bool
    seconds: float
    error: str | None = None
    crash_file: str | None = None


@dataclass
class ReportJob:
    """A participant's report: rendered when every one of its images is done.

    ``failures`` and ``crashes`` map an image's node name to its one-line error and to its
    crash file.
    """

    subject: str
    images: list[T1wImage]
    failures: dict[str, str] = field(default_factory=dict)
    crashes: dict[str, str] = field(default_factory=dict)


_NODE = re.compile(r"^Node: \S*?\bt1w_(?P<image>[A-Za-z0-9_]+?)_wf\b", re.MULTILINE)


def crash_file_of(crash_dir: Path, node_name: str, *, since: float) -> Path | None:
    """The newest crash file written since ``since`` by a step of image ``node_name``."""
    newest: tuple[float, Path] | None = None
    for crash in crash_dir.glob("crash-*.txt"):
        mtime = crash.stat().st_mtime
        if mtime < since - 1 or (newest and mtime <= newest[0]):
            continue
        match = _NODE.search(crash.read_text(errors="replace")[:4096])
        if match and match.group("image") == node_name:
            newest = (mtime, crash)
    return newest[1] if newest else None


def image_workers(*, nprocs: int, omp_nthreads: int, mem_gb: float | None = None) -> int:
    """How many images run at once: ``--nprocs`` is the CPU budget, each image takes
    ``--omp-nthreads`` of it (as MultiProc counted it), and ``--mem-gb`` bounds it too."""
    workers = max(1, nprocs // max(1, min(omp_nthreads, nprocs)))
    if mem_gb:
        workers = min(workers, max(1, int(mem_gb // IMAGE_MEM_GB)))
    return workers


def run_image_job(job: ImageJob) -> ImageResult:
    """Build and run one image's workflow in this (worker) process; never raises."""
    from brainage_bids.workflows.execution import collect_failures, run_workflow
    from brainage_bids.workflows.participant import init_single_t1w_wf

    _quiet_nipype(job.log_level)
    started = time.time()
    clock = time.monotonic()
    try:
        workflow = init_single_t1w_wf(image=job.image, **job.workflow_args)
        workflow.base_dir = str(job.work_dir / BASE_NAME)
        ok = run_workflow(workflow, crash_dir=job.crash_dir, nprocs=1,
                          log_level=job.log_level)
    except Exception as err:  # building the workflow failed: report it as this image's
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return ImageResult(job.image, False, time.monotonic() - clock, message)
    if ok:
        return ImageResult(job.image, True, time.monotonic() - clock)
    failures = collect_failures(job.crash_dir, since=started)
    crash = crash_file_of(job.crash_dir, job.image.node_name, since=started)
    return ImageResult(job.image, False, time.monotonic() - clock,
                       failures.get(job.image.node_name) or "the workflow failed",
                       None if crash is None else str(crash))


def _quiet_nipype(level: str) -> None:
    """Worker processes start with nipype's INFO logging: use the run's level instead."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, level)
    nipype_logging.update_logging(nipype_config)


def _lower_priority() -> None:
    """Initializer of report processes (reports must not slow the images down)."""
    with contextlib.suppress(OSError):  # not permitted here: run at normal priority
        os.nice(REPORT_NICENESS)


def _context():
    # forkserver, not fork: forking a process whose torch/OpenMP threads have started can
    # deadlock the child (a second run in one Python process, the test suite)
    return multiprocessing.get_context("forkserver")


def run_images(jobs: Sequence[ImageJob], *, workers: int,
               on_image: Callable[[ImageResult], None],
               render: Callable[[ReportJob], Any] | None = None,
               report_workers: int = 1,
               on_report: Callable[[ReportJob, Future], None] | None = None) -> None:
    """Run ``jobs`` on ``workers`` processes in order; render reports as subjects complete.

    ``on_image`` is called in the main process as each image finishes (in finishing order);
    ``render`` (a picklable function of a :class:`ReportJob`) runs in a report process once
    every image of a participant has finished, and ``on_report`` sees its future.
    """
    remaining: dict[str, int] = {}
    by_subject: dict[str, list[T1wImage]] = {}
    for job in jobs:
        remaining[job.image.subject] = remaining.get(job.image.subject, 0) + 1
        by_subject.setdefault(job.image.subject, []).append(job.image)
    failures: dict[str, dict[str, str]] = {}
    crashes: dict[str, dict[str, str]] = {}
    images = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=_context())
    reports = (ProcessPoolExecutor(max_workers=max(1, report_workers), mp_context=_context(),
                                   initializer=_lower_priority) if render else None)
    report_futures: dict[Future, ReportJob] = {}
    try:
        pending = {images.submit(run_image_job, job) for job in jobs}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                result = future.result()
                on_image(result)
                subject = result.image.subject
                if result.error is not None:
                    failures.setdefault(subject, {})[result.image.node_name] = result.error
                if result.crash_file is not None:
                    crashes.setdefault(subject, {})[result.image.node_name] = result.crash_file
                remaining[subject] -= 1
                if remaining[subject] == 0 and reports is not None:
                    report = ReportJob(subject, by_subject[subject], failures.get(subject, {}),
                                       crashes.get(subject, {}))
                    report_futures[reports.submit(render, report)] = report
        for future in report_futures:
            future.exception()  # wait; the callback reports any failure
            if on_report is not None:
                on_report(report_futures[future], future)
    except BaseException:
        images.shutdown(wait=False, cancel_futures=True)
        if reports is not None:
            reports.shutdown(wait=False, cancel_futures=True)
        raise
    images.shutdown()
    if reports is not None:
        reports.shutdown()


def render_reports(report_jobs: Sequence[ReportJob], *, render: Callable[[ReportJob], Any],
                   workers: int, on_report: Callable[[ReportJob, Future], None]) -> None:
    """Render reports only (``--reports-only``): ``workers`` processes, in order."""
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=_context()) as pool:
        futures = {pool.submit(render, job): job for job in report_jobs}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                on_report(futures[future], future)
