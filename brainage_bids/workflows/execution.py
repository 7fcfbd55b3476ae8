"""Running nipype workflows and turning crash files into one line per failed image."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nipype.pipeline import engine as pe

_IMAGE_WF = re.compile(r"\bt1w_(?P<image>[A-Za-z0-9_]+?)_wf\b")


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


def collect_failures(crash_dir: Path, *, since: float) -> dict[str, str]:
    """``{image node name: error line}`` from the nipype crash files written since ``since``."""
    failures: dict[str, str] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime):
        if crash.stat().st_mtime < since - 1:
            continue
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (\S+)", text, flags=re.MULTILINE)
        match = _IMAGE_WF.search(node.group(1) if node else crash.name)
        key = match.group("image") if match else "*"
        failures.setdefault(key, _error_line(text))
    return failures


def _error_line(text: str) -> str:
    """The exception message of a traceback, without the exception's module path."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception))(?:: (?P<msg>.*))?$", line)
        if match:
            return match.group("msg") or match.group(1)
    return lines[-1] if lines else "unknown error"
