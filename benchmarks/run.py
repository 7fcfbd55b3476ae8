"""All performance figures in one command: a table on stdout and everything as JSON.

    python benchmarks/run.py [--threads 2] [--repeats 3] [--json benchmarks/results.json]

Measures, each as the median of ``--repeats`` runs (every run in a fresh subprocess so that
its peak memory is its own):

- preprocessing seconds per image with the pure-pip backend (N4 + brain extraction +
  registration): a 2 mm IXI head of the shipped sample, and the 1 mm Colin27 head when
  ``../shared/data`` is present;
- end to end, one participant through ``brainage-bids ... participant`` (fresh work
  directory, shipped model, 20 MC-dropout samples, saliency, without and with the HTML
  report);
- inference volumes/s: a plain eval-mode loop against the app's settings, ours against
  SFCN (``benchmarks/inference_throughput.py``);
- training volumes/s: a plain PyTorch loop against the training engine, ours against
  SFCN (``benchmarks/train_throughput.py``);
- the same inference and training figures on the GPU when one is present.

Wall-clock numbers depend on what else runs on the machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rounds import repo_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "examples" / "ixi-sample"
IXI_HEAD = SAMPLE / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
COLIN = REPO.parent / "shared" / "data" / "colin27" / "ch2.nii.gz"


def _env(threads: int) -> dict[str, str]:
    return repo_env(ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))


def _json_run(cmd: list[str], threads: int) -> dict:
    """Run a benchmark script with ``--json`` into a temporary file and read it back."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        done = subprocess.run([*cmd, "--json", str(out)], env=_env(threads), text=True,
                              check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {done.returncode}")
        return json.loads(out.read_text())


def preprocessing(threads: int, repeats: int) -> dict:
    sys.path.insert(0, str(HERE))
    from preproc_accuracy import time_image

    images = {"IXI head, 2 mm": IXI_HEAD}
    if COLIN.is_file():
        images["Colin27 head, 1 mm"] = COLIN
    results = {}
    for label, path in images.items():
        runs = [time_image(path, threads) for _ in range(repeats)]
        results[label] = {
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "seconds_runs": [round(r["seconds"], 2) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "import_seconds": statistics.median(r["import_seconds"] for r in runs)}
        print(f"preprocessing {label}: {results[label]['seconds_median']:.1f} s "
              f"(runs {results[label]['seconds_runs']})", flush=True)
    if not COLIN.is_file():
        results["Colin27 head, 1 mm"] = {"skipped": f"{COLIN} not found (../shared/data)"}
    return results


def end_to_end(threads: int, repeats: int) -> dict:
    """One participant through the CLI; peak RSS is the largest of its processes."""
    exe = shutil.which("brainage-bids") or sys.executable
    prefix = [exe] if exe.endswith("brainage-bids") else [exe, "-m", "brainage_bids"]
    results = {}
    for label, extra in (("without report", ["--no-reports"]), ("with report", [])):
        seconds, peaks = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [*prefix, str(SAMPLE), f"{tmp}/out", "participant",
                       "--participant-label", "IXI012", "-w", f"{tmp}/work", "--nprocs", "1",
                       "--omp-nthreads", str(threads), *extra]
                code = ("import resource, subprocess, sys, time, json; t = time.perf_counter();"
                        " r = subprocess.run(sys.argv[1:]).returncode; "
                        "print(json.dumps({'rc': r, 's': time.perf_counter() - t, 'rss': "
                        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
                done = subprocess.run([sys.executable, "-c", code, *cmd], env=_env(threads),
                                      capture_output=True, text=True, check=False)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if result["rc"]:
                    return {"skipped": f"brainage-bids exited {result['rc']}: "
                                       f"{done.stderr.strip().splitlines()[-1:]}"}
                seconds.append(result["s"])
                peaks.append(result["rss"])
        results[label] = {"seconds_median": statistics.median(seconds),
                          "seconds_runs": [round(s, 2) for s in seconds],
                          "peak_rss_mb": max(peaks)}
        print(f"end to end, {label}: {results[label]['seconds_median']:.1f} s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="default",
                        help="weights for inference figures (default: the shipped model)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["preprocessing", "end-to-end", "inference", "training", "gpu"])
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    import torch

    t = str(args.threads)
    started = time.perf_counter()
    report: dict = {"machine": {
        "cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "repeats": args.repeats, "load_average_start": os.getloadavg()}
    if "preprocessing" not in args.skip:
        report["preprocessing"] = preprocessing(args.threads, args.repeats)
    if "end-to-end" not in args.skip:
        report["end_to_end"] = end_to_end(args.threads, args.repeats)
    inference = [sys.executable, str(HERE / "inference_throughput.py"), "--threads", t,
                 "--repeats", str(args.repeats), "--model", args.model]
    training = [sys.executable, str(HERE / "train_throughput.py"), "--threads", t,
                "--repeats", str(args.repeats), "--variants",
                "plain,engine,engine-textbook,engine-sfcn"]
    if "inference" not in args.skip:
        report["inference_cpu"] = _json_run(inference, args.threads)
    if "training" not in args.skip:
        report["training_cpu"] = _json_run(training, args.threads)
    if torch.cuda.is_available() and "gpu" not in args.skip:
        report["inference_gpu"] = _json_run(
            [*inference, "--device", "cuda", "--batch-size", "64", "--variants",
             "ours-plain,ours-textbook,ours-fast,ours-fast1,ours-bf16,ours-compiled,sfcn-plain,"
             "sfcn-fast"], args.threads)
        report["training_gpu"] = _json_run(
            [*training[:-2], "--variants", "plain,engine,engine-bf16,engine-sfcn",
             "--device", "cuda", "--batch-size", "32"], args.threads)
    report["load_average_end"] = os.getloadavg()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["peak_rss_mb_children"] = resource.getrusage(
        resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    print(f"\n## brainage-bids benchmarks ({args.threads} threads, "
          f"{report['machine']['processor']}, torch {torch.__version__}, median of "
          f"{args.repeats})\n")
    print("| Measure | Value | Peak memory |\n|---|---|---|")
    for label, row in (report.get("preprocessing") or {}).items():
        if "skipped" in row:
            print(f"| Preprocessing, {label} | skipped: {row['skipped']} | |")
        else:
            print(f"| Preprocessing, {label} | {row['seconds_median']:.1f} s | "
                  f"{row['peak_rss_mb']:.0f} MB |")
    e2e = report.get("end_to_end") or {}
    if "skipped" in e2e:
        print(f"| End to end, one participant | skipped: {e2e['skipped']} | |")
    else:
        for label, row in e2e.items():
            print(f"| End to end, one 2 mm participant, {label} | "
                  f"{row['seconds_median']:.1f} s | {row['peak_rss_mb']:.0f} MB |")
    for key, unit in (("inference_cpu", "inference"), ("training_cpu", "training"),
                      ("inference_gpu", "inference (GPU)"), ("training_gpu", "training (GPU)")):
        for variant, row in (report.get(key) or {}).get("summary", {}).items():
            peak = row.get("peak_memory_mb", row.get("peak_rss_mb"))
            extra = (f", max diff {row['max_abs_diff_years']:.2g} y"
                     if "max_abs_diff_years" in row else "")
            print(f"| {unit.capitalize()}, {variant} | {row['volumes_per_s_median']:.2f} "
                  f"volumes/s{extra} | {peak:.0f} MB |")
    print(f"\nload average {report['load_average_start'][0]:.2f} at the start, "
          f"{report['load_average_end'][0]:.2f} at the end; {report['wall_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
