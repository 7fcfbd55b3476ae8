"""The participant level's cohort side: --reports-only and errors carried between runs."""

from __future__ import annotations

import json
import time

from brainage_bids.cli.run import main
from brainage_bids.cohort import last_failures
from tests.test_group import build_study, restore_logging  # noqa: F401 (fixture)

CRASH = "logs/crashes/crash-20261202-120000-root-validate-1234.txt"


def _summary(logs, name, rows):
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"summary-{name}.json").write_text(json.dumps(
        {"level": "participant", "n_images": len(rows), "failed": 0, "images": rows}))
    time.sleep(0.01)  # distinct modification times: the latest summary wins


def test_latest_summary_decides_an_images_error(tmp_path):
    logs = tmp_path / "logs"
    _summary(logs, "a", [{"image": "sub-01", "status": "failed", "error": "old",
                          "crash_file": "c1"},
                         {"image": "sub-02", "status": "failed", "error": "still broken"}])
    _summary(logs, "b", [{"image": "sub-01", "status": "ok", "predicted_age": 40.0}])
    errors, crashes = last_failures(logs)
    assert errors == {"sub-02": "still broken"}  # sub-01 succeeded on the rerun
    assert crashes == {}


def test_reports_only_renders_from_derivatives_without_running_anything(
        tmp_path, restore_logging, capsys):  # noqa: F811
    settings = build_study(tmp_path, images={"11"})
    out, work = settings.output_dir, tmp_path / "work"
    failed = next(out.glob("sub-03/anat/*_brainage.json"))
    failed.unlink()
    _summary(out / "logs", "earlier", [
        {"image": "sub-03", "status": "failed", "error": "sub-03_T1w.nii.gz: cannot be read",
         "crash_file": str(out / CRASH)}])
    records = {p: p.stat().st_mtime_ns for p in out.rglob("*_brainage.json")}
    code = main([str(settings.bids_dir), str(out), "participant", "--reports-only",
                 "--skip-bids-validation", "-w", str(work), "--nprocs", "2"])
    assert code == 0
    assert not work.exists(), "--reports-only must not preprocess"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_brainage.json")} == records
    subjects = sorted({p.relative_to(out).parts[0] for p in records} | {"sub-03"})
    assert sorted(p.stem for p in out.glob("sub-*.html")) == subjects
    html = (out / "sub-03.html").read_text()
    errors = html[html.index('id="errors"'):]
    assert "cannot be read" in errors and CRASH in errors
    assert "Methods" in (out / "sub-11.html").read_text()
    assert (out / "logs" / "CITATION.md").is_file()
    err = capsys.readouterr().err
    assert f"[{len(subjects)}/{len(subjects)}]" in err and "report" in err


def test_reports_only_contradicts_no_reports(tmp_path, capsys):
    settings = build_study(tmp_path)
    code = main([str(settings.bids_dir), str(settings.output_dir), "participant",
                 "--reports-only", "--no-reports", "--skip-bids-validation"])
    assert code == 2 and "--reports-only" in capsys.readouterr().err


def test_workers_share_the_cpu_and_memory_budget():
    from brainage_bids.workflows.scheduler import image_workers

    assert image_workers(nprocs=2, omp_nthreads=2) == 1  # the default: one image, 2 threads
    assert image_workers(nprocs=4, omp_nthreads=1) == 4
    assert image_workers(nprocs=8, omp_nthreads=3) == 2
    assert image_workers(nprocs=8, omp_nthreads=1, mem_gb=3.0) == 2  # 1.5 GB per image
    assert image_workers(nprocs=1, omp_nthreads=4) == 1


def test_collect_crashes_finds_each_images_first_crash(tmp_path):
    from brainage_bids.workflows.execution import collect_crashes

    def crash(name: str, node: str, error: str) -> None:
        (tmp_path / f"crash-{name}.txt").write_text(
            f"Node: {node}\nWorking directory: /w\n\nTraceback:\nImageError: {error}\n")
        time.sleep(0.02)

    started = time.time()
    crash("a", "brainage_wf.t1w_sub01_wf.derivatives_wf.ds_preproc", "the cause")
    crash("b", "t1w_sub012_wf.t1w_preproc_wf.validate", "bad")  # another image, longer name
    crash("c", "t1w_sub01_wf.derivatives_wf.ds_attention", "a consequence")
    found = collect_crashes(tmp_path, since=started)
    assert found["sub01"] == ("the cause", tmp_path / "crash-a.txt")
    assert found["sub012"] == ("bad", tmp_path / "crash-b.txt")
    assert "sub02" not in found


def test_the_log_line_names_the_failed_qc_checks(tmp_path):
    from brainage_bids.bids import T1wImage
    from brainage_bids.cohort import describe_image, record_path

    image = T1wImage(path=tmp_path / "sub-01_T1w.nii.gz", entities={"subject": "01"},
                     age=38.8)
    target = record_path(tmp_path, image)
    target.parent.mkdir(parents=True)
    record = {"predicted_age": 51.44, "chronological_age": 38.8,
              "qc": {"dice_template_ok": True, "intensity_distance": 0.244,
                     "intensity_distance_ok": False, "qc_pass": False}}
    target.write_text(json.dumps(record))
    assert describe_image(tmp_path, image) == (
        "sub-01: predicted age 51.4 (age 38.8); QC failed (intensity_distance): see qc in its "
        "record")
    record["qc"]["intensity_distance_ok"] = True
    target.write_text(json.dumps(record))
    assert describe_image(tmp_path, image) == "sub-01: predicted age 51.4 (age 38.8)"
