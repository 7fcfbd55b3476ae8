"""Running nipype workflows and turning crash files into one line per failed image.

nipype reports a failed node with its own multi-line dump and traceback. Those belong in the
run's log file and in the crash file; the terminal gets one line per image
(:func:`route_nipype_logging`, and :func:`collect_crashes` for the line itself).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from pathlib import Path

from nipype.pipeline import engine as pe

from brainage_bids.io import WRITE_ERRORS

_IMAGE_WF = re.compile(r"\bt1w_(?P<image>[A-Za-z0-9_]+?)_wf\b")
_NIPYPE_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"


class QuietFileHandler(logging.FileHandler):
    """A log file that, when it cannot be written (a full disk), says so once and stops.

    The standard handler prints a traceback to the terminal for every record it fails to
    write; on a full disk that would bury the one line that says what happened.
    """

    def __init__(self, filename: str | os.PathLike[str], *, announce: bool = True,
                 delay: bool = False) -> None:
        super().__init__(filename, delay=delay)
        self._announce = announce
        self._failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if self._announce and not self._failed:
            reason = (WRITE_ERRORS.get(err.errno or -1) if isinstance(err, OSError) else None)
            print(f"brainage-bids: warning: cannot write the log {self.baseFilename}: "
                  f"{reason or err}", file=sys.stderr)
        self._failed = True


def route_nipype_logging(level: str, *, log_file: Path | None, terminal: bool) -> None:
    """nipype's messages go to ``log_file`` (and to the terminal only when ``terminal``).

    nipype logs to stdout from the moment it is imported, in every process; each process
    (the main one and every image worker) calls this once.
    """
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, level)
    nipype_logging.update_logging(nipype_config)
    root = logging.getLogger("nipype")
    for handler in list(root.handlers):
        if isinstance(handler, QuietFileHandler) or (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler) and not terminal):
            root.removeHandler(handler)
    if log_file is not None:
        # silent: the run's own log handler (same file) says once that it cannot be written
        handler = QuietFileHandler(log_file, delay=True, announce=False)
        handler.setFormatter(logging.Formatter(_NIPYPE_FORMAT))
        root.addHandler(handler)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    root.propagate = False


def _worker_config(directory: Path, log_level: str) -> Path:
    """A nipype.cfg for MultiProc workers, which start with nipype's defaults (INFO logs)."""
    directory.mkdir(parents=True, exist_ok=True)
    levels = "\n".join(f"{key} = {log_level}" for key in
                        ("workflow_level", "interface_level", "utils_level"))
    (directory / "nipype.cfg").write_text(f"[logging]\n{levels}\n"
                                          "[monitoring]\nenabled = false\n")
    return directory


def run_workflow(workflow: pe.Workflow, *, crash_dir: Path, nprocs: int,
                 mem_gb: float | None = None, log_level: str = "WARNING") -> bool:
    """Run ``workflow``; images that fail do not stop the others. True if all succeeded.

    Nodes are cached in the workflow's base directory, so a rerun with the same work
    directory only redoes what changed or failed.
    """
    crash_dir.mkdir(parents=True, exist_ok=True)
    workflow.config["execution"] = {
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "hash_method": "content",
        "remove_unnecessary_outputs": False,
        "check_version": False,
    }
    if nprocs > 1:
        # forkserver, not fork: forking a process whose torch/OpenMP threads have started
        # (the train level, a second run in one Python process) can deadlock the workers
        args: dict = {"n_procs": nprocs, "raise_insufficient": False,
                      "mp_context": "forkserver"}
        if mem_gb:
            args["memory_gb"] = mem_gb
        plugin = "MultiProc"
    else:
        plugin, args = "Linear", {}
    config_dir = _worker_config(Path(workflow.base_dir or crash_dir) / "nipype_config",
                                log_level)
    previous = os.environ.get("NIPYPE_CONFIG_DIR")
    os.environ["NIPYPE_CONFIG_DIR"] = str(config_dir)  # read by the worker processes
    try:
        workflow.run(plugin=plugin, plugin_args=args)
    except RuntimeError:
        return False
    finally:
        if previous is None:
            os.environ.pop("NIPYPE_CONFIG_DIR", None)
        else:
            os.environ["NIPYPE_CONFIG_DIR"] = previous
    return True


def collect_crashes(crash_dir: Path, *, since: float) -> dict[str, tuple[str, Path]]:
    """``{image node name: (error line, crash file)}`` of the crash files since ``since``.

    For each image the first crash is kept: it is the cause, and later ones are usually its
    consequences (every other sink failing on the same full disk).
    """
    crashes: dict[str, tuple[str, Path]] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime_ns):
        if crash.stat().st_mtime < since - 1:
            continue
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (\S+)", text, flags=re.MULTILINE)
        match = _IMAGE_WF.search(node.group(1) if node else crash.name)
        key = match.group("image") if match else "*"
        crashes.setdefault(key, (error_line(text), crash))
    return crashes


_ERRNO = re.compile(r"^\[Errno (?P<code>\d+)\] (?P<text>[^:]+?)(?:: '(?P<path>.*)')?$")


def plain_error(message: str) -> str:
    """``[Errno 28] No space left on device: 'PATH'`` as ``no space left on device writing
    PATH``; any other message as it is."""
    match = _ERRNO.match(message)
    if not match:
        return message
    code = int(match.group("code"))
    text = WRITE_ERRORS.get(code) or match.group("text").lower()
    path = match.group("path")
    if path is None:
        return text
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):  # only writes fail so
        return f"{text} writing {path}"
    return f"{text}: {path}"


def error_line(text: str) -> str:
    """The exception message of a traceback, without the exception's module path."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception))(?:: (?P<msg>.*))?$", line)
        if match:
            return plain_error(match.group("msg") or match.group(1))
    return lines[-1] if lines else "unknown error"
