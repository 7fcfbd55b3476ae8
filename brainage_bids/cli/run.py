"""``brainage-bids``: dispatch to the participant, group and train levels.

Exit codes: 0 success, 1 a runtime failure (some image failed, a model could not load),
2 a usage error (argparse, paths), 130 / 143 stopped by SIGINT / SIGTERM
(:mod:`brainage_bids.interruption`). User mistakes end with one line on stderr, never a
traceback; ``-vv`` shows tracebacks for debugging.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from brainage_bids.cli.parser import UsageError, parse_settings
from brainage_bids.config import Settings, with_threads, write_settings
from brainage_bids.interruption import Interrupted, stop_on_signals, terminate_children

LOG = logging.getLogger("brainage_bids")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Failed images named in the run's last line (all of them are in the summary file).
MAX_NAMED = 20


class RunError(Exception):
    """A failure to report in one line (exit code 1)."""


def _setup_logging(settings: Settings) -> None:
    from brainage_bids.cohort import log_file
    from brainage_bids.workflows.execution import QuietFileHandler, route_nipype_logging

    level = logging.WARNING - 10 * min(settings.verbose + 1, 2)  # INFO by default, -v DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("brainage_bids")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    log = QuietFileHandler(log_file(settings))
    log.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    root.addHandler(log)
    # nipype's dumps and tracebacks go to the log file; to the terminal only with -vv
    route_nipype_logging("INFO" if settings.verbose >= 2 else "WARNING",
                         log_file=log_file(settings), terminal=settings.verbose >= 2)


def _log_file_only(message: str) -> None:
    """Record ``message`` in the run's log file without printing it a second time."""
    record = LOG.makeRecord(LOG.name, logging.WARNING, __file__, 0, message, (), None)
    for handler in logging.getLogger("brainage_bids").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brainage-bids`` console script."""
    with stop_on_signals():
        try:
            return _main(argv)
        except Interrupted as stop:
            terminate_children()  # anything the level started and did not end itself
            message = (f"brainage-bids: interrupted by {stop.name}; rerun with the same -w "
                       "to resume")
            print(message, file=sys.stderr)
            _log_file_only(message)
            return stop.exit_code


def _main(argv: list[str] | None) -> int:
    try:
        settings = parse_settings(argv)
    except UsageError as err:
        print(f"brainage-bids: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    # nipype asks a web service for updates on import unless told not to; runs are offline.
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    try:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        _setup_logging(settings)
        write_settings(settings)
        if settings.analysis_level == "participant":
            return run_participant(settings)
        if settings.analysis_level == "group":
            from brainage_bids.group.level import run_group

            return run_group(settings)
        return run_train(settings)
    except KeyboardInterrupt:
        print("brainage-bids: interrupted by SIGINT; rerun with the same -w to resume",
              file=sys.stderr)
        return 130
    except Exception as err:
        if settings.verbose >= 2:
            raise
        line = f"brainage-bids: error: {one_line(err)}"
        print(line, file=sys.stderr)
        _log_file_only(line)  # the log a user is asked to report with has it too
        return EXIT_FAILURE


def one_line(err: BaseException) -> str:
    """The first line of an error's message (its type when it has none), plain words for
    an OS error: ``no such file or directory: PATH``. A failed write already says
    ``... writing PATH`` (:class:`~brainage_bids.io.OutputError`); any other OS error may
    come from a read, so its line does not say which."""
    from brainage_bids.io import OutputError

    if (isinstance(err, OSError) and not isinstance(err, OutputError)
            and err.errno is not None and err.filename):
        return f"{(err.strerror or str(err)).lower()}: {err.filename}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def select_images(settings: Settings) -> list:
    """Every T1w image the settings select (pybids query, labels, filter file)."""
    from brainage_bids.bids import collect_t1w, load_layout

    layout = load_layout(settings.bids_dir, validate=not settings.skip_bids_validation,
                         index_metadata=bool(settings.bids_filters))
    images = collect_t1w(layout, participant_label=settings.participant_label,
                         session_label=settings.session_label, filters=settings.bids_filters)
    LOG.info("found %d T1w image(s) of %d participant(s)", len(images),
             len({i.subject for i in images}))
    return images


def _resolve_model(spec: str, device: str) -> tuple[str, dict]:
    """Load the model once up front so that a bad ``--model`` fails before any work."""
    from brainage_bids.metrics import card_fit_warning
    from brainage_bids.model.predict import resolve_device
    from brainage_bids.model.weights import load_model

    resolve_device(device)  # --device cuda without a GPU: before any preprocessing
    path = Path(spec).expanduser()
    resolved = str(path.resolve()) if path.exists() else spec
    _, card = load_model(resolved, device="cpu")
    LOG.info("model %s (sha256 %s)", card.get("name"), str(card.get("sha256"))[:12])
    if warning := card_fit_warning(card):  # the records' corrected gaps use these
        LOG.warning("%s", warning)
    return resolved, card


def run_participant(settings: Settings) -> int:
    """Images run one after another (``--nprocs`` at a time), each reported as it ends."""
    from brainage_bids.bids import write_dataset_description
    from brainage_bids.cohort import reports_only, run_cohort, write_methods
    from brainage_bids.workflows.preproc import backend_mismatch, resolve_backend

    images = select_images(settings)
    settings = with_threads(settings, len(images))
    write_settings(settings)  # again, with the threads decided for these images
    for image in images:  # a bad age is this image's problem alone: predict without it
        if image.age_problem:
            LOG.warning("%s: %s; predicting without a chronological age (n/a)", image.name,
                        image.age_problem)
    model, card = _resolve_model(settings.model, settings.device)
    backend = resolve_backend(settings.preproc)
    model_backend = (card.get("preprocessing") or {}).get("backend")
    if warning := backend_mismatch(backend, model_backend, str(card.get("name"))):
        LOG.warning("%s", warning)
    architecture = card.get("architecture", {})
    architecture = architecture.get("member", architecture)  # an ensemble: its members'
    is_attention_net = architecture.get("name", "BrainAgeNet") == "BrainAgeNet"
    gradcam = settings.saliency and is_attention_net
    methods = write_methods(settings, backend=backend, card=card, saliency=gradcam)
    if settings.reports_only:
        return EXIT_FAILURE if reports_only(settings, images, methods) else EXIT_OK
    LOG.info("preprocessing backend: %s", backend)
    write_dataset_description(settings.output_dir, settings.bids_dir)
    workflow_args = dict(
        bids_dir=settings.bids_dir, output_dir=settings.output_dir, backend=backend,
        omp_nthreads=settings.omp_nthreads, model=model, device=settings.device,
        mc_samples=settings.mc_samples, seed=settings.seed, gradcam=gradcam,
        attention=gradcam and architecture.get("attention", "none") != "none")
    failures, crashes = run_cohort(settings, images, workflow_args=workflow_args,
                                   methods=methods)
    summary = summarise_participants(images, settings, failures, crashes)
    return EXIT_FAILURE if summary["failed"] else EXIT_OK


def summarise_participants(images, settings: Settings, failures: dict[str, str],
                           crashes: dict[str, str] | None = None) -> dict:
    """Recap the failures, write ``logs/summary-<uuid>.json``, count failures."""
    import json

    from brainage_bids.derivatives import derivative_path
    from brainage_bids.io import atomic_write_json

    rows = []
    for image in images:
        record_path = derivative_path(settings.output_dir, image.entities, suffix="brainage",
                                      extension=".json")
        error = failures.get(image.node_name) or failures.get("*")
        if error is None and record_path.is_file():
            record = json.loads(record_path.read_text())
            rows.append({"image": image.name, "status": "ok",
                         "predicted_age": record["predicted_age"],
                         "chronological_age": record["chronological_age"],
                         "record": str(record_path.relative_to(settings.output_dir))})
        else:
            rows.append({"image": image.name, "status": "failed",
                         "error": error or "no brain-age record was written",
                         "crash_file": (crashes or {}).get(image.node_name)})
        if image.age_problem:
            rows[-1]["age_problem"] = image.age_problem
    failed = [r for r in rows if r["status"] == "failed"]
    summary = {"level": "participant", "n_images": len(rows), "failed": len(failed),
               "images": rows}
    target = settings.logs_dir / f"summary-{settings.run_uuid}.json"
    atomic_write_json(target, summary)
    # each failure had its one line as it finished; the end names them, not again in full
    names = ", ".join(r["image"] for r in failed[:MAX_NAMED])
    more = f" and {len(failed) - MAX_NAMED} more" if len(failed) > MAX_NAMED else ""
    LOG.log(logging.ERROR if failed else logging.INFO, "%d of %d image(s) done%s",
            len(rows) - len(failed), len(rows),
            f"; {len(failed)} failed: {names}{more} (see {target})" if failed else "")
    return summary


def run_train(settings: Settings) -> int:
    from brainage_bids.bids import write_dataset_description
    from brainage_bids.cohort import preprocess_cohort
    from brainage_bids.metrics import card_fit_warning
    from brainage_bids.model.predict import resolve_device
    from brainage_bids.training import train_from_bids

    resolve_device(settings.device)  # --device cuda without a GPU: before any preprocessing
    images = select_images(settings)
    settings = with_threads(settings, len(images))
    write_settings(settings)  # again, with the threads decided for these images
    write_dataset_description(settings.output_dir, settings.bids_dir)
    card = train_from_bids(settings, images, execute=preprocess_cohort)
    if not card:  # an ensemble under torchrun, on a rank other than 0: rank 0 writes it
        return EXIT_OK
    LOG.info("model written: %s (validation MAE %.2f years)",
             settings.output_dir / "models" / f"{card['name']}.safetensors",
             card["validation"]["mae"])
    if warning := card_fit_warning(card):
        LOG.warning("%s", warning)
    return EXIT_OK
