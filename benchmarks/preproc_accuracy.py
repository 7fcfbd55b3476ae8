"""Accuracy and speed of the pure-pip (``ants``) preprocessing backend on real data.

What is measured (all on real scans from ``../shared/data``):

1. Colin27 ``ch2`` (1 mm head, already in MNI space) registered as given, then moved by
   ``--trials`` random affines (rotations up to 15 degrees about each axis, shifts up to 20 mm,
   per-axis scaling up to 10 %, seeded) and registered again. The move is applied to the image
   *header* (``A @ affine``, exact, no interpolation; the voxel axes stay orthogonal, so ITK
   represents it without approximation) or, with ``--move resample``, by trilinear resampling
   onto a padded grid. Error of a trial: for each brain voxel centre ``p`` of ``ch2bet`` (ch2's
   world space) the distance between ``T_moved(A p)`` and ``T_unmoved(p)``, where ``T`` are the
   native->MNI affines found; the mean over the brain is reported (goal: < 2 mm in every
   trial), with the maximum, and also the mean distance to ``p`` itself (ch2 is in an MNI
   space already, though not exactly MNI152NLin6Asym, so that is no ground truth).
2. Dice of the skull strip of ch2 against ``ch2bet > 0`` (goal >= 0.95).
3. ``ch2bet`` given as a skull-stripped input: the skull-stripped detector's verdict and the
   mean displacement between its registration and ch2's (goal < 2 mm).
4. Seconds per image (N4 + extract_and_register, ``--threads``) for a 2 mm IXI head and the
   1 mm Colin27 head, each in a fresh subprocess so that ``ru_maxrss`` is that image's peak
   and ITK's thread pool is sized by ``--threads``. antspyx's import (about 2 s) is timed
   apart. Goals: < 20 s (2 mm) and < 50 s (1 mm). The load average is printed because on a
   shared machine wall time depends on it; CPU time is given as well.
5. QC: :func:`registration_qc` on ``--ixi`` real IXI heads (the distribution the thresholds
   come from) and on deliberate failures: the good ch2 result shifted by 10 mm, rotated by 15
   degrees, flipped upside down, and an input whose header turns the head upside down.

Usage::

    python benchmarks/preproc_accuracy.py [--data ../shared/data] [--trials 10] [--seed 0]
        [--threads 2] [--ixi 10] [--move header|resample] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
IXI_TIMING_SUBJECT = "sub-IXI012"


# --------------------------------------------------------------------------- running
def run_pipeline(in_file: Path, out_dir: Path, *, threads: int, n4: bool = True,
                 skull_stripped: bool | None = None) -> dict[str, Any]:
    """N4 (optional) then extract_and_register; returns outputs, the RAS affine and timing."""
    from brainage_bids.preproc import ants_backend

    out_dir.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    source = str(in_file)
    if n4:
        source = ants_backend.n4_bias_correct(source, str(out_dir / "n4.nii.gz"),
                                              threads=threads)
    result = ants_backend.extract_and_register(source, str(out_dir), threads=threads,
                                               skull_stripped=skull_stripped)
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu
    result["to_mni"] = np.loadtxt(result["transform_txt"])
    return result


def _time_one(in_file: str, threads: int) -> None:
    """Subprocess mode: time one image, print a JSON line (peak RSS is this process's)."""
    start = time.perf_counter()
    import ants  # noqa: F401  (timed apart: a pipeline pays it once per worker process)

    import_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        result = run_pipeline(Path(in_file), Path(tmp), threads=threads)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                      "import_seconds": import_s, "peak_rss_mb": peak_mb,
                      "qc_pass": result["qc"]["qc_pass"]}))


def time_image(in_file: Path, threads: int) -> dict[str, Any]:
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--time-one", str(in_file),
                           "--threads", str(threads)], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- moving ch2
def random_affine(rng: np.random.Generator, max_rot_deg: float = 15.0,
                  max_shift_mm: float = 20.0, max_scale: float = 0.10) -> np.ndarray:
    """World-space affine ``T R S``: scaling along the world axes, rotation, shift."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    scale = np.diag(rng.uniform(1 - max_scale, 1 + max_scale, 3))
    return nib.affines.from_matvec(rz @ ry @ rx @ scale, rng.uniform(-max_shift_mm,
                                                                     max_shift_mm, 3))


def move_image(img: nib.Nifti1Image, moving: np.ndarray, mode: str) -> nib.Nifti1Image:
    """The image moved by ``moving`` (world mm): via its header, or resampled."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mode == "header":
        return nib.Nifti1Image(data, moving @ img.affine)
    from scipy import ndimage as ndi

    pad = 24
    out_affine = img.affine @ nib.affines.from_matvec(np.eye(3), [-pad] * 3)
    shape = tuple(s + 2 * pad for s in data.shape)
    vox = np.linalg.inv(img.affine) @ np.linalg.inv(moving) @ out_affine
    out = ndi.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=shape, order=1)
    return nib.Nifti1Image(out.astype(np.float32), out_affine)


def displacement(to_mni: np.ndarray, reference: np.ndarray, points: np.ndarray,
                 moving: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and max distance (mm) between ``to_mni(moving p)`` and ``reference(p)``."""
    moved = points if moving is None else nib.affines.apply_affine(moving, points)
    dist = np.linalg.norm(nib.affines.apply_affine(to_mni, moved)
                          - nib.affines.apply_affine(reference, points), axis=1)
    return float(dist.mean()), float(dist.max())


# --------------------------------------------------------------------------- QC failures
def perturbed_qc(brain_mni: str, mask_mni: str, tmp: Path) -> dict[str, dict]:
    """QC of deliberately misregistered copies of a good result."""
    from scipy import ndimage as ndi

    from brainage_bids.preproc.qc import registration_qc

    brain_img, mask_img = nib.load(brain_mni), nib.load(mask_mni)
    brain, mask = brain_img.get_fdata(), mask_img.get_fdata()
    cases = {
        "shift 10 mm": lambda v, o: ndi.shift(v, (5, 0, 0), order=o),
        "rotate 15 deg": lambda v, o: ndi.rotate(v, 15, axes=(1, 2), reshape=False, order=o),
        "upside down": lambda v, o: v[:, :, ::-1],
    }
    out = {}
    for name, fn in cases.items():
        b_path, m_path = tmp / f"{name[:5]}_brain.nii.gz", tmp / f"{name[:5]}_mask.nii.gz"
        nib.save(nib.Nifti1Image(fn(brain, 1).astype(np.float32), brain_img.affine), b_path)
        nib.save(nib.Nifti1Image((fn(mask, 0) > 0.5).astype(np.uint8), mask_img.affine),
                 m_path)
        out[name] = registration_qc(b_path, m_path)
    return out


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--trials", type=int, default=10, help="random moves of ch2")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moves")
    parser.add_argument("--threads", type=int, default=2, help="ITK threads")
    parser.add_argument("--ixi", type=int, default=10, help="IXI heads for the QC survey")
    parser.add_argument("--move", choices=("header", "resample"), default="header",
                        help="apply the random moves to the header (exact) or resample")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (outputs of every run) and print its path")
    parser.add_argument("--time-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_one:
        _time_one(args.time_one, args.threads)
        return 0
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    if not (args.data / "colin27" / "ch2.nii.gz").is_file():
        parser.error(f"{args.data / 'colin27' / 'ch2.nii.gz'} not found (use --data)")
    results: dict[str, Any] = {
        "platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
        "load_average_start": os.getloadavg(), "move": args.move, "seed": args.seed,
    }
    work = Path(tempfile.mkdtemp(prefix="preproc_accuracy_"))
    try:
        rows = measure(args, results, work)
    finally:
        if args.keep:
            print(f"outputs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  result  (goal)")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value}" + (f"  ({goal})" if goal else ""))
    print(f"load average start/end: {results['load_average_start'][0]:.2f} / "
          f"{results['load_average_end'][0]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


def measure(args: argparse.Namespace, results: dict[str, Any],
            work: Path) -> list[tuple[str, str, str]]:
    """Run every measurement; fill ``results`` and return the table rows."""
    from brainage_bids.preproc.ants_backend import looks_skull_stripped
    from brainage_bids.preproc.qc import dice

    colin = args.data / "colin27"
    ch2_path, bet_path = colin / "ch2.nii.gz", colin / "ch2bet.nii.gz"
    ixi_root = args.data / "ixi-hh-t1w-2mm"
    rows: list[tuple[str, str, str]] = []

    if not args.no_timing:
        ixi_file = ixi_root / IXI_TIMING_SUBJECT / "anat" / f"{IXI_TIMING_SUBJECT}_T1w.nii.gz"
        for label, path, goal in (("IXI 2 mm head", ixi_file, 20.0),
                                  ("Colin27 1 mm head", ch2_path, 50.0)):
            timing = time_image(path, args.threads)
            results.setdefault("timing", {})[label] = timing
            rows.append((f"seconds/image, {label} (N4 incl.)",
                         f"{timing['seconds']:.1f} s wall, {timing['cpu_seconds']:.1f} s CPU, "
                         f"peak {timing['peak_rss_mb']:.0f} MB", f"< {goal:.0f} s"))
        rows.append(("antspyx import (once per process)",
                     f"{results['timing']['IXI 2 mm head']['import_seconds']:.1f} s", ""))

    ch2 = nib.load(str(ch2_path))
    bet = nib.load(str(bet_path))
    bet_mask = np.asarray(bet.dataobj) > 0
    points = nib.affines.apply_affine(bet.affine, np.argwhere(bet_mask))

    base = run_pipeline(ch2_path, work / "ch2", threads=args.threads)
    t0 = base["to_mni"]
    native_mask = np.asarray(nib.load(base["mask_native"]).dataobj) > 0
    strip_dice = dice(native_mask, bet_mask)
    id_mean, id_max = displacement(t0, np.eye(4), points)
    results["colin27"] = {"strip_dice_vs_ch2bet": strip_dice, "qc": base["qc"],
                          "vs_identity_mean_mm": id_mean, "vs_identity_max_mm": id_max,
                          "seconds": base["seconds"],
                          "detector_ch2": looks_skull_stripped(ch2)}
    rows.append(("ch2 skull-strip Dice vs ch2bet", f"{strip_dice:.4f}", ">= 0.95"))
    rows.append(("ch2 registration vs identity (mean/max)", f"{id_mean:.2f} / {id_max:.2f} mm",
                 "info"))

    stripped = run_pipeline(bet_path, work / "ch2bet", threads=args.threads)
    bet_mean, bet_max = displacement(stripped["to_mni"], t0, points)
    results["ch2bet"] = {"detector": looks_skull_stripped(bet),
                         "skull_stripped_path": stripped["info"]["skull_stripped_input"],
                         "vs_ch2_mean_mm": bet_mean, "vs_ch2_max_mm": bet_max,
                         "qc": stripped["qc"]}
    rows.append(("skull-stripped detector ch2 / ch2bet",
                 f"{results['colin27']['detector_ch2']} / {results['ch2bet']['detector']}",
                 "False / True"))
    rows.append(("ch2bet vs ch2 registration (mean/max)", f"{bet_mean:.2f} / {bet_max:.2f} mm",
                 "< 2 mm"))

    rng = np.random.default_rng(args.seed)
    trials = []
    for index in range(args.trials):
        moving = random_affine(rng)
        moved_path = work / f"moved{index:02d}.nii.gz"
        nib.save(move_image(ch2, moving, args.move), moved_path)
        run = run_pipeline(moved_path, work / f"trial{index:02d}", threads=args.threads)
        mean, worst = displacement(run["to_mni"], t0, points, moving)
        vs_id, _ = displacement(run["to_mni"], np.eye(4), points, moving)
        trials.append({"moving": moving.tolist(), "mean_mm": mean, "max_mm": worst,
                       "vs_identity_mean_mm": vs_id, "seconds": run["seconds"],
                       "qc_pass": run["qc"]["qc_pass"],
                       "dice_template": run["qc"]["dice_template"],
                       "correlation": run["qc"]["correlation"]})
        print(f"trial {index}: mean {mean:.2f} mm, max {worst:.2f} mm, "
              f"{run['seconds']:.1f} s", file=sys.stderr, flush=True)
    results["trials"] = trials
    if trials:
        means = [t["mean_mm"] for t in trials]
        rows.append((f"moved ch2 ({args.move}), mean error per trial: worst / median",
                     f"{max(means):.2f} / {np.median(means):.2f} mm", "< 2 mm each"))
        rows.append(("moved ch2, max error over brain (worst trial)",
                     f"{max(t['max_mm'] for t in trials):.2f} mm", "info"))
        rows.append(("moved ch2, mean error vs identity (worst trial)",
                     f"{max(t['vs_identity_mean_mm'] for t in trials):.2f} mm", "info"))

    flip = nib.Nifti1Image(np.asarray(ch2.dataobj), np.diag([1.0, -1.0, -1.0, 1.0]) @
                           ch2.affine)
    flip_path = work / "upside_down.nii.gz"
    nib.save(flip, flip_path)
    failures = perturbed_qc(base["brain_mni"], base["mask_mni"], work)
    try:
        failures["upside-down input, registered"] = run_pipeline(
            flip_path, work / "flip", threads=args.threads)["qc"]
    except (ValueError, RuntimeError) as err:
        failures["upside-down input, registered"] = {"qc_pass": False, "error": str(err)}
    results["qc_failures"] = failures
    for name, qc in failures.items():
        rows.append((f"QC flags: {name}",
                     f"pass={qc['qc_pass']} dice={qc.get('dice_template', float('nan')):.3f} "
                     f"corr={qc.get('correlation', float('nan')):.3f}", "pass=False"))

    subjects = sorted(p.name for p in ixi_root.glob("sub-*"))[: args.ixi]
    survey = []
    for sub in subjects:
        run = run_pipeline(ixi_root / sub / "anat" / f"{sub}_T1w.nii.gz", work / sub,
                           threads=args.threads)
        survey.append({"subject": sub, "seconds": run["seconds"], **run["qc"]})
        print(f"{sub}: {run['qc']}", file=sys.stderr, flush=True)
    results["ixi_qc"] = survey
    if survey:
        rows.append((f"IXI heads (n={len(survey)}): QC pass",
                     f"{sum(s['qc_pass'] for s in survey)}/{len(survey)}", "all"))
        for key in ("dice_template", "correlation", "mask_volume_ml"):
            values = [s[key] for s in survey]
            rows.append((f"IXI {key}: min / median / max",
                         f"{min(values):.3f} / {np.median(values):.3f} / {max(values):.3f}",
                         "info"))
        rows.append(("IXI seconds/image, in-process (median)",
                     f"{np.median([s['seconds'] for s in survey]):.1f} s", "info"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
