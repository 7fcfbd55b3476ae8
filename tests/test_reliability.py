"""Reliability: stop signals, full disks and unwritable outputs, unreadable records, usage errors.

The fast tests exercise each mechanism alone (a write that fails, the cleanup of an image's
outputs, the process-tree helpers, the group level's checks). The slow ones run the real app
on a real head: SIGTERM and Ctrl-C to a running participant level (no worker survives, no
record appears, a rerun resumes to the same prediction), a full disk on a small tmpfs and a
record that cannot be written. Those reuse the session's preprocessed head where they can
(``participant_run``), so only the signal test preprocesses again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from brainage_bids.cli.run import main
from brainage_bids.interruption import alive, descendants, terminate
from brainage_bids.io import OutputError, atomic_path, atomic_write_json
from brainage_bids.workflows.execution import error_line, plain_error
from brainage_bids.workflows.outputs import image_outputs, remove_image_outputs
from tests.test_group import build_study, restore_logging  # noqa: F401 (fixture)

from .conftest import SAMPLE, read_json

INTERRUPTED = "brainage-bids: interrupted by {}; rerun with the same -w to resume"


# --- writes that fail ------------------------------------------------------------------------


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from brainage_bids.interfaces.bids import DerivativesSink

    source = tmp_path / "in.nii.gz"
    source.write_bytes(b"x" * 4096)

    def full(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"half")  # what a full disk leaves: a partial temporary
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr("brainage_bids.interfaces.bids.shutil.copyfile", full)
    out = tmp_path / "out"
    sink = DerivativesSink(base_directory=str(out), source_entities={"subject": "01"},
                           suffix="T1w", entities={"desc": "preproc"}, in_file=str(source))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError) as exc:
        sink.run()
    target = out / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz"
    assert str(exc.value) == f"no space left on device writing {target}"
    assert exc.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []  # neither the file nor its temporary


def test_a_failed_rename_names_the_target(tmp_path):
    target = tmp_path / "sub-01_brainage.json"
    target.mkdir()  # something in the way of the record
    with pytest.raises(OutputError, match=f"a directory is in the way writing {target}$"):
        atomic_write_json(target, {"predicted_age": 40})
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x.json") as tmp:
        shutil.copyfile(tmp_path / "missing", tmp)  # reading fails: not a write error


def test_crash_file_errors_read_as_one_plain_line():
    assert plain_error("[Errno 28] No space left on device: '/o/sub-01_brainage.json'") == (
        "no space left on device writing /o/sub-01_brainage.json")
    assert plain_error("[Errno 2] No such file or directory: '/x'") == (
        "no such file or directory: /x")
    crash = ("Node: t1w_sub01_wf.derivatives_wf.ds_record\nTraceback (most recent call last):\n"
             '  File "x.py", line 1, in f\n'
             "brainage_bids.io.OutputError: no space left on device writing /o/r.json\n")
    assert error_line(crash) == "no space left on device writing /o/r.json"


def test_a_log_file_on_a_full_disk_says_so_once(tmp_path, capsys):
    import logging

    from brainage_bids.workflows.execution import QuietFileHandler

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    handler = QuietFileHandler(tmp_path / "run.log")
    handler.stream = Full()
    for n in range(3):
        handler.emit(logging.LogRecord("x", logging.INFO, __file__, 0, f"line {n}", (), None))
    err = capsys.readouterr().err
    assert err == (f"brainage-bids: warning: cannot write the log {tmp_path / 'run.log'}: "
                   "no space left on device\n")


def test_the_nodes_own_error_is_reported_when_its_crash_file_cannot_be_written():
    from brainage_bids.workflows.scheduler import _first_error

    try:
        try:
            raise RuntimeError("Traceback:\nOutputError: no space left on device writing /o/x")
        except RuntimeError:
            raise OSError(errno.ENOSPC, "No space left on device") from None
    except OSError as err:
        # "from None" hides the cause in tracebacks, but the context is still there
        assert error_line(str(_first_error(err))) == "no space left on device writing /o/x"


def test_remove_image_outputs_takes_everything_of_the_image_only(tmp_path):
    entities = {"subject": "01", "session": "A"}
    other = {"subject": "01", "session": "A", "run": 2}
    mine, theirs = image_outputs(tmp_path, entities), image_outputs(tmp_path, other)
    for path in [*mine, *theirs]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    partial = mine[-1].with_name(f".{mine[-1].name}.abc123.tmp.json")
    partial.write_text("{")
    assert remove_image_outputs(tmp_path, entities, since=time.time() + 60) == []
    removed = remove_image_outputs(tmp_path, entities, since=time.time() - 60)
    assert sorted(removed) == sorted([*mine, partial])
    assert all(p.is_file() for p in theirs)  # run-2 of the same session is another image


# --- processes -------------------------------------------------------------------------------


def test_terminate_ends_a_process_tree(tmp_path):
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        while len(descendants([proc.pid])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = [proc.pid, *descendants([proc.pid])]
        assert len(tree) == 3
        started = time.monotonic()
        terminate([proc.pid], grace_s=0.5)  # the shell ignores SIGTERM: SIGKILL follows
        assert time.monotonic() - started < 3
        proc.wait(timeout=5)
        assert not any(alive(pid) for pid in tree)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


class _DiesWhenUnpickled:
    """Kills the worker process that receives it: what the system's OOM killer does."""

    def __reduce__(self):
        return (os._exit, (9,))


def test_a_worker_killed_by_the_system_is_one_clear_error(tmp_path):
    from brainage_bids.bids import T1wImage
    from brainage_bids.workflows.scheduler import ImageJob, WorkerDied, run_images

    job = ImageJob(image=T1wImage(path=SAMPLE, entities={"subject": "x"}),
                   workflow_args={"poison": _DiesWhenUnpickled()}, work_dir=tmp_path,
                   crash_dir=tmp_path)
    aborted = []
    with pytest.raises(WorkerDied, match=r"while running sub-x .*out of memory\?"):
        run_images([job], workers=1, on_image=aborted.append,
                   on_abort=lambda images, reports: aborted.append(images))
    assert aborted == [[job.image]]  # its partial outputs are cleaned up


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "NIPYPE_NO_ET": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "brainage_bids", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def _wait_while_running(proc: subprocess.Popen, ready: Callable[[], bool], what: str, *,
                        timeout: float = 240) -> None:
    """Until ``ready()``, failing the test if ``proc`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if ready():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} in time")


def _wait_until_working(proc: subprocess.Popen, out: Path, *, workers: int) -> None:
    """Until the log says the images run and their worker processes exist."""
    def working() -> bool:
        log = "".join(p.read_text() for p in (out / "logs").glob("brainage-*.log"))
        # the forkserver and its image workers (and the resource tracker)
        return "processing" in log and len(descendants([proc.pid])) >= workers + 1

    _wait_while_running(proc, working, "the participant level did not start its workers")


def _wait_for_a_finished_step(proc: subprocess.Popen, work: Path) -> None:
    """Until a node of the workflow has written its result file."""
    _wait_while_running(proc, lambda: next(work.rglob("result_*.pklz"), None) is not None,
                        "no workflow step finished")


def _stop_and_check(proc: subprocess.Popen, out: Path, sig: int, *, group: bool) -> str:
    """Send ``sig``; check the exit code, the one line, and that no process survives."""
    tree = descendants([proc.pid])
    sent = time.monotonic()
    if group:  # Ctrl-C on a terminal: every process of the foreground group gets SIGINT
        os.killpg(proc.pid, sig)
    else:  # SLURM at the time limit, docker stop, kill
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "the run did not stop within a few seconds"
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert lines[-1] == INTERRUPTED.format(signal.Signals(sig).name), err
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in tree if alive(pid)], "worker processes survived the signal"
    assert not list(out.rglob("*_brainage.json")), "a record was written after the signal"
    assert not list(out.glob("sub-*.html")) and not list(out.rglob(".*.tmp*"))
    assert not list((out / "logs").glob("summary-*.json"))
    return err


@pytest.mark.slow
def test_sigterm_stops_everything_and_a_rerun_resumes_to_the_same_prediction(
        tmp_path, participant_run):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _start([str(SAMPLE), str(out), "participant", "--participant-label", "IXI012",
                   "IXI013", "-w", str(work), "--nprocs", "2", "--omp-nthreads", "1"])
    try:
        _wait_until_working(proc, out, workers=2)
        _wait_for_a_finished_step(proc, work)  # into preprocessing, however busy the machine
        _stop_and_check(proc, out, signal.SIGTERM, group=False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    finished = {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}
    assert finished, "nothing had finished before the signal"
    assert main([str(SAMPLE), str(out), "participant", "--participant-label", "IXI012",
                 "-w", str(work), "--nprocs", "1", "--omp-nthreads", "1", "--mc-samples", "4",
                 "--no-reports"]) == 0
    reused = {p: p.stat().st_mtime_ns for p in finished if p.is_file()}
    assert reused == {p: t for p, t in finished.items() if p in reused}
    assert any("IXI012" in str(p) for p in reused), "the rerun redid finished steps"
    resumed = read_json(out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json")
    uninterrupted = read_json(participant_run[0] / "sub-IXI012" / "anat"
                              / "sub-IXI012_brainage.json")
    assert resumed["predicted_age"] == pytest.approx(uninterrupted["predicted_age"], abs=0.01)


@pytest.mark.slow
def test_ctrl_c_is_handled_once_by_the_main_process(tmp_path):
    out = tmp_path / "out"
    proc = _start([str(SAMPLE), str(out), "participant", "--participant-label", "IXI012",
                   "IXI013", "-w", str(tmp_path / "work"), "--nprocs", "2",
                   "--omp-nthreads", "1"], start_new_session=True)
    try:
        _wait_until_working(proc, out, workers=2)
        _stop_and_check(proc, out, signal.SIGINT, group=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# --- a full disk and an unwritable record, on the real head ---------------------------------


def _rerun(participant_run, out: Path, capsys) -> tuple[int, str]:
    """The session's participant run again (every step cached) into another output dir."""
    args = list(participant_run[2])
    args[1] = str(out)
    capsys.readouterr()
    code = main([*args, "--no-reports"])
    return code, capsys.readouterr().err


def _image_files(out: Path) -> list[Path]:
    return [p for p in (out / "sub-IXI012").rglob("*") if p.is_file()] if (
        out / "sub-IXI012").exists() else []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 kB tmpfs: the run's logs fit, the preprocessed image does not."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_image_in_one_line_and_leaves_nothing(
        participant_run, tiny_tmpfs, capsys, restore_logging):  # noqa: F811
    out = tiny_tmpfs / "out"
    code, err = _rerun(participant_run, out, capsys)
    assert code == 1
    failed = [line for line in err.splitlines() if "sub-IXI012: FAILED: " in line]
    assert len(failed) == 1, err
    assert f"no space left on device writing {out}/sub-IXI012/anat/sub-IXI012_" in failed[0]
    assert "Traceback" not in err
    assert _image_files(out) == [], "a failed image left derivatives behind"
    summary = read_json(next((out / "logs").glob("summary-*.json")))
    assert summary["images"][0]["status"] == "failed"


@pytest.mark.slow
def test_an_unwritable_record_removes_the_images_other_derivatives(
        participant_run, tmp_path, capsys, restore_logging):  # noqa: F811
    out = tmp_path / "out"
    record = out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json"
    record.mkdir(parents=True)  # in the way of the record, the last derivative written
    code, err = _rerun(participant_run, out, capsys)
    assert code == 1
    assert f"sub-IXI012: FAILED: a directory is in the way writing {record}" in err
    assert _image_files(out) == [], "the preprocessed image or masks were left behind"
    assert record.is_dir()  # not ours to delete


# --- the group level ------------------------------------------------------------------------


def test_group_level_names_every_unreadable_record_and_writes_no_table(
        tmp_path, restore_logging, capsys):  # noqa: F811
    settings = build_study(tmp_path)
    out = settings.output_dir
    records = sorted(out.rglob("*_brainage.json"))
    truncated, wrong = records[0], records[1]
    truncated.write_text(truncated.read_text()[:40])
    wrong.write_text(json.dumps({**read_json(wrong), "predicted_age": "old"}))
    args = [str(settings.bids_dir), str(out), "group", "--skip-bids-validation", "--no-reports",
            "--bias-reference", "group=control"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{truncated}: not valid JSON (truncated?)" in err
    assert f"{wrong}: not a brain-age record: predicted_age 'old' is not a number" in err
    assert err.strip().splitlines()[-1].startswith(
        "brainage-bids: error: 2 brain-age record(s) cannot be read")
    assert not (out / "group_brainage.tsv").exists()
    assert main([*args, "--skip-unreadable"]) == 0
    rows = (out / "group_brainage.tsv").read_text().splitlines()
    assert len(rows) == 1 + len(records) - 2


def test_group_level_participants_tsv_by_the_bids_rules(tmp_path, restore_logging, capsys):  # noqa: F811
    settings = build_study(tmp_path)
    tsv = settings.bids_dir / "participants.tsv"
    lines = tsv.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[-1] = '"unclosed'  # a quote is a character, not the start of a quoted cell
    lines[1] = "\t".join(cells)
    tsv.write_text("\n".join(lines) + "\n")
    args = [str(settings.bids_dir), str(settings.output_dir), "group",
            "--skip-bids-validation", "--no-reports", "--bias-reference", "group=control"]
    assert main(args) == 0
    table = (settings.output_dir / "group_brainage.tsv").read_text()
    assert '"unclosed' in table and len(table.splitlines()) > 2
    tsv.write_text("\n".join([*lines, lines[2]]) + "\n")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tsv} lines 3 and {len(lines) + 1}: participant_id" in err and "twice" in err


# --- usage errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "message"), [
    ("--bids-filter-file", "is a directory, not a JSON file"),
    ("-w", "exists and is not a directory"),
])
def test_bad_option_paths_are_usage_errors(sample_bids, tmp_path, capsys, option, message):
    target = tmp_path / "thing"
    if option == "-w":
        target.write_text("a file")
    else:
        target.mkdir()
    code = main([str(sample_bids), str(tmp_path / "out"), "participant", option, str(target)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("brainage-bids: error: "), err
    assert str(target) in err[0] and message in err[0], err
