"""Large-cohort figures (issue 16): participant level with/without reports, group at scale.

    python benchmarks/cohort.py participant [--nprocs 2]    # the 4-head sample, twice
    python benchmarks/cohort.py group --n 2000 10000         # records built from real ones
    python benchmarks/cohort.py workflow --n 1000            # building 1,000 image workflows
    python benchmarks/cohort.py all --json benchmarks/results/cohort-cpu-2core.json

``participant`` runs ``brainage-bids examples/ixi-sample ... participant --nprocs N`` in a
fresh work directory with ``--no-reports`` and with reports, and reports the wall time of
each and their ratio (goal: at most 1.25) and when each image's progress line appeared.

``group`` needs real records: it runs the participant level on the sample once (or reuses
``--records-from``), then builds a BIDS dataset of N participants (each T1w a symbolic link
to a sample head, ages from a real spread) whose records are copies of the four real records
with the ids changed and the predicted age and QC measures moved by real-sized noise. It
times pybids indexing, the table and bias correction, the TSV and the HTML report
separately, and the peak memory of the process (each N in its own process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "ixi-sample"
APP = [sys.executable, "-m", "brainage_bids"]
PROGRESS = re.compile(r"^(\d\d:\d\d:\d\d) \[\w+\] \[(\d+)/(\d+)\]", re.M)


def _run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stderr


def participant(nprocs: int, root: Path) -> dict:
    """The sample with and without reports, each in a fresh work directory."""
    out: dict = {"nprocs": nprocs}
    for label, extra in (("no_reports", ["--no-reports"]), ("reports", [])):
        target = root / label
        seconds, log = _run([*APP, str(SAMPLE), str(target / "out"), "participant",
                             "-w", str(target / "work"), "--nprocs", str(nprocs), *extra])
        lines = PROGRESS.findall(log)
        out[label] = {"seconds": round(seconds, 1),
                      "progress_lines": [f"{t} [{k}/{n}]" for t, k, n in lines]}
        print(f"participant --nprocs {nprocs} {label}: {seconds:.1f} s; progress lines "
              f"{', '.join(out[label]['progress_lines'])}", flush=True)
    out["ratio"] = round(out["reports"]["seconds"] / out["no_reports"]["seconds"], 3)
    print(f"reports / no reports: {out['ratio']:.2f} (goal <= 1.25)", flush=True)
    return out


def _real_records(output_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(output_dir.rglob("*_brainage.json"))]
    if not records:
        raise SystemExit(f"no records under {output_dir}")
    return records


def build_cohort(n: int, records: list[dict], root: Path) -> tuple[Path, Path]:
    """A BIDS dataset of ``n`` participants and their derivatives, from real records."""
    import numpy as np

    rng = np.random.default_rng(n)
    bids, out = root / "bids", root / "out"
    heads = sorted(SAMPLE.glob("sub-*/anat/*_T1w.nii.gz"))
    shutil.copy(SAMPLE / "dataset_description.json", bids.mkdir(parents=True) or bids)
    rows = ["participant_id\tage\tsex\tgroup"]
    for i in range(n):
        sub = f"c{i:05d}"
        base = records[i % len(records)]
        age = float(rng.uniform(20, 85))
        anat = bids / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{sub}_T1w.nii.gz").symlink_to(heads[i % len(heads)])
        rows.append(f"sub-{sub}\t{age:.2f}\t{'MF'[i % 2]}\t{'control' if i % 3 else 'patient'}")
        record = json.loads(json.dumps(base))
        predicted = age + 0.3 * (55 - age) + float(rng.normal(0, 6.9))
        record.update(participant_id=f"sub-{sub}", source_file=f"sub-{sub}/anat/"
                      f"sub-{sub}_T1w.nii.gz", chronological_age=round(age, 2),
                      predicted_age=round(predicted, 3),
                      brain_age_gap=round(predicted - age, 3))
        for key, value in (record.get("qc") or {}).items():
            if isinstance(value, float):
                record["qc"][key] = round(value * float(rng.normal(1, 0.01)), 4)
        target = out / f"sub-{sub}" / "anat" / f"sub-{sub}_brainage.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(record))
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    return bids, out


def group_once(bids: Path, out: Path) -> dict:
    """The group level's parts, timed in this process (run in a child per N)."""
    from dataclasses import replace

    from brainage_bids.bids import collect_t1w, load_layout
    from brainage_bids.cli.parser import parse_settings
    from brainage_bids.group.level import run_group

    settings = parse_settings([str(bids), str(out), "group"])
    times = {}
    start = time.perf_counter()
    images = collect_t1w(load_layout(bids))
    times["pybids_index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    run_group(replace(settings, reports=False))
    times["table_s"] = time.perf_counter() - start
    start = time.perf_counter()
    run_group(settings)
    times["group_level_with_report_s"] = time.perf_counter() - start
    html = out / "group_brainage.html"
    return {"images": len(images), **{k: round(v, 2) for k, v in times.items()},
            "report_mb": round(html.stat().st_size / 1e6, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def group(sizes: list[int], records_from: Path | None, root: Path) -> list[dict]:
    if records_from is None:
        records_from = root / "sample" / "out"
        _run([*APP, str(SAMPLE), str(records_from), "participant", "-w",
              str(root / "sample" / "work"), "--nprocs", "2", "--no-reports"])
    records = _real_records(records_from)
    results = []
    for n in sizes:
        bids, out = build_cohort(n, records, root / f"group-{n}")
        seconds, _ = _run([sys.executable, __file__, "_group_once", str(bids), str(out)])
        result = json.loads((out / "bench.json").read_text())
        result.update(n=n, process_s=round(seconds, 1))
        results.append(result)
        print(f"group level, {n} participants: {json.dumps(result)}", flush=True)
    return results


def workflow(n: int) -> dict:
    """Build the participant workflow of ``n`` images (what each worker does for one)."""
    from brainage_bids.bids import T1wImage
    from brainage_bids.workflows.participant import init_single_t1w_wf

    head = next(SAMPLE.glob("sub-*/anat/*_T1w.nii.gz"))
    images = [T1wImage(path=SAMPLE / f"sub-w{i:05d}" / "anat" / f"sub-w{i:05d}_T1w.nii.gz",
                       entities={"subject": f"w{i:05d}", "datatype": "anat",
                                 "suffix": "T1w", "extension": ".nii.gz"}, age=50.0)
              for i in range(n)]
    del head
    start = time.perf_counter()
    for image in images:
        init_single_t1w_wf(image=image, bids_dir=SAMPLE, output_dir=Path("/nonexistent"),
                           backend="ants", omp_nthreads=1, model="default")
    seconds = time.perf_counter() - start
    result = {"n": n, "seconds": round(seconds, 2), "ms_per_image": round(1000 * seconds / n, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(f"building {n} image workflows: {json.dumps(result)}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["participant", "group", "workflow", "all",
                                         "_group_once"])
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument("--records-from", type=Path, default=None,
                        help="an OUTPUT_DIR with participant-level records to replicate")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    if args.what == "_group_once":
        bids, out = map(Path, args.paths)
        (out / "bench.json").write_text(json.dumps(group_once(bids, out)))
        return 0
    results: dict = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="brainage-cohort-") as tmp:
        root = Path(tmp)
        if args.what in ("participant", "all"):
            results["participant"] = participant(args.nprocs, root / "participant")
        if args.what in ("workflow", "all"):
            results["workflow"] = workflow((args.n or [1000])[0])
        if args.what in ("group", "all"):
            records = args.records_from
            if records is None and "participant" in results:
                records = root / "participant" / "no_reports" / "out"
            results["group"] = group(args.n if args.what == "group" and args.n
                                     else [2000, 10000], records, root / "group")
    results["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
