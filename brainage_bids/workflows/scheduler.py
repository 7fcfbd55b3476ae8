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

Failures stay with their image: an image whose workflow fails has its partial derivatives
removed by its worker (its record is written last, so a record means a complete image), and
a stop signal (:mod:`brainage_bids.interruption`) ends every worker process at once and
removes the half-written outputs of the images in flight (``on_abort``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainage_bids.bids import T1wImage
from brainage_bids.interruption import ignore_interrupts, terminate

LOG = logging.getLogger(__name__)

#: Name of the old combined workflow: the per-image workflows live under it in the work dir.
BASE_NAME = "brainage_wf"
#: Niceness added to report processes: they yield the CPU to preprocessing and prediction.
REPORT_NICENESS = 5
#: Memory one image's workflow needs at 2 mm with the ANTs backend (docs/hpc.md), in GB.
IMAGE_MEM_GB = 1.5


class WorkerDied(RuntimeError):
    """A worker process ended without a result (the system killed it): the pool is lost."""


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker process needs to build and run one image's workflow."""

    image: T1wImage
    workflow_args: dict[str, Any]
    work_dir: Path
    crash_dir: Path
    log_level: str = "WARNING"
    #: The run's log file, where nipype's messages go (``None``: nowhere but the terminal).
    log_file: Path | None = None
    #: Whether nipype's messages also reach the terminal (``-vv``).
    nipype_to_terminal: bool = False


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


def image_workers(*, nprocs: int, omp_nthreads: int, mem_gb: float | None = None) -> int:
    """How many images run at once: ``--nprocs`` is the CPU budget, each image takes
    ``--omp-nthreads`` of it (as MultiProc counted it), and ``--mem-gb`` bounds it too."""
    workers = max(1, nprocs // max(1, min(omp_nthreads, nprocs)))
    if mem_gb:
        workers = min(workers, max(1, int(mem_gb // IMAGE_MEM_GB)))
    return workers


def run_image_job(job: ImageJob) -> ImageResult:
    """Build and run one image's workflow in this (worker) process; never raises.

    On failure the image's partial derivatives are removed, so nothing of it looks complete.
    """
    from brainage_bids.workflows.execution import (
        collect_crashes,
        error_line,
        plain_error,
        route_nipype_logging,
        run_workflow,
    )
    from brainage_bids.workflows.outputs import remove_image_outputs
    from brainage_bids.workflows.participant import init_single_t1w_wf

    route_nipype_logging(job.log_level, log_file=job.log_file,
                         terminal=job.nipype_to_terminal)
    started = time.time()
    clock = time.monotonic()
    try:
        workflow = init_single_t1w_wf(image=job.image, **job.workflow_args)
        workflow.base_dir = str(job.work_dir / BASE_NAME)
        ok = run_workflow(workflow, crash_dir=job.crash_dir, nprocs=1,
                          log_level=job.log_level)
        error = crash = None
        if not ok:
            found = collect_crashes(job.crash_dir, since=started).get(job.image.node_name)
            error, crash = ("the workflow failed", None) if found is None else (
                found[0], str(found[1]))
    except Exception as err:  # building the workflow failed, or nipype could not even
        # write its crash file (a full disk): then the node's own error is the one to report
        cause = _first_error(err)
        error = (error_line(str(cause)) if cause is not err
                 else plain_error(str(err).splitlines()[0] if str(err) else type(err).__name__))
        ok, crash = False, None
    if ok:
        return ImageResult(job.image, True, time.monotonic() - clock)
    output_dir = job.workflow_args.get("output_dir")
    if output_dir is not None:
        remove_image_outputs(Path(output_dir), job.image.entities)
    return ImageResult(job.image, False, time.monotonic() - clock, error, crash)


def _first_error(err: BaseException) -> BaseException:
    """The exception that started a chain of errors raised while handling one another."""
    seen = {id(err)}
    while err.__context__ is not None and id(err.__context__) not in seen:
        err = err.__context__
        seen.add(id(err))
    return err


def _image_worker() -> None:
    """Initializer of image processes: Ctrl-C is for the main process to handle."""
    ignore_interrupts()


def _lower_priority() -> None:
    """Initializer of report processes (reports must not slow the images down)."""
    ignore_interrupts()
    with contextlib.suppress(OSError):  # not permitted here: run at normal priority
        os.nice(REPORT_NICENESS)


def _context():
    # forkserver, not fork: forking a process whose torch/OpenMP threads have started can
    # deadlock the child (a second run in one Python process, the test suite)
    return multiprocessing.get_context("forkserver")


def _worker_pids(pool: ProcessPoolExecutor | None) -> list[int]:
    """The pool's worker processes (``terminate_workers`` only arrives in Python 3.14)."""
    processes = getattr(pool, "_processes", None) or {}
    return [int(pid) for pid in processes]


def run_images(jobs: Sequence[ImageJob], *, workers: int,
               on_image: Callable[[ImageResult], None],
               render: Callable[[ReportJob], Any] | None = None,
               report_workers: int = 1,
               on_report: Callable[[ReportJob, Future], None] | None = None,
               failed: Sequence[ImageResult] = (),
               on_abort: Callable[[list[T1wImage], list[ReportJob]], None] | None = None,
               ) -> None:
    """Run ``jobs`` on ``workers`` processes in order; render reports as subjects complete.

    ``on_image`` is called in the main process as each image finishes (in finishing order);
    ``failed`` are images that failed before any job was made (a FIFO, a dangling link):
    they are reported first and count for their participant's report. ``render`` (a
    picklable function of a :class:`ReportJob`) runs in a report process once every image of
    a participant has finished, and ``on_report`` sees its future.

    If the run is stopped (a signal, or any error in the main process), every worker process
    is ended at once, and ``on_abort`` gets the images and reports that were in flight.
    """
    remaining: dict[str, int] = {}
    by_subject: dict[str, list[T1wImage]] = {}
    for image in [*(result.image for result in failed), *(job.image for job in jobs)]:
        remaining[image.subject] = remaining.get(image.subject, 0) + 1
        by_subject.setdefault(image.subject, []).append(image)
    failures: dict[str, dict[str, str]] = {}
    crashes: dict[str, dict[str, str]] = {}
    images = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=_context(),
                                 initializer=_image_worker)
    reports = (ProcessPoolExecutor(max_workers=max(1, report_workers), mp_context=_context(),
                                   initializer=_lower_priority) if render else None)
    report_futures: dict[Future, ReportJob] = {}
    submitted: dict[Future, ImageJob] = {}

    def finished(result: ImageResult) -> None:
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

    try:
        for result in failed:
            finished(result)
        submitted = {images.submit(run_image_job, job): job for job in jobs}
        pending = set(submitted)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise WorkerDied(
                        f"a worker process died while running {submitted[future].image.name} "
                        "or another image in flight (killed by the system: out of memory?); "
                        "rerun with the same -w, with fewer images at once (--nprocs, "
                        "--mem-gb)") from None
                finished(result)
        for future in report_futures:
            future.exception()  # wait; the callback reports any failure
            if on_report is not None:
                on_report(report_futures[future], future)
    except BaseException:
        in_flight = [job.image for future, job in submitted.items() if future.running()
                     or (future.done() and not future.cancelled()
                         and isinstance(future.exception(), BrokenProcessPool))]
        reports_in_flight = [job for future, job in report_futures.items()
                             if not future.done()]
        # end the workers first: shutdown() alone would wait for the images in flight
        terminate([*_worker_pids(images), *_worker_pids(reports)])
        images.shutdown(wait=False, cancel_futures=True)
        if reports is not None:
            reports.shutdown(wait=False, cancel_futures=True)
        if on_abort is not None:
            on_abort(in_flight, reports_in_flight)
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
