"""Inference throughput: a plain eval-mode loop versus the app's settings, ours versus SFCN.

Each variant runs in a fresh subprocess (so ``ru_maxrss`` is its own peak) on the 91x109x91
grid and reports volumes/s as the median over timed batches after warm-up. Inputs are the
real MNI152 2 mm template brain with per-volume intensity changes, normalised as in the app;
with ``--model`` the weights are real, so the differences between variants are in years.
Every variant's predictions are compared with a plain fp32 pass over the same volumes.

Variants (``MODEL-SETTING``; MODEL is ``ours`` (BrainAgeNet, shared attention) or ``sfcn``):
    plain       the textbook network (``Conv3d -> ReLU -> MaxPool3d`` blocks, the attention
                as one ``Conv3d(2, 1, 7)``) in ``model.eval()`` and ``torch.no_grad()``, one
                volume per forward, default memory format, fp32: the loop most users would
                write around the paper's network.
    textbook    the textbook network with the app's settings: inference mode,
                channels-last-3d memory format, ``--batch-size`` volumes per forward.
    fast        the package's network with the app's settings: its blocks run depth slab by
                slab and pool before the ReLU without autograd, and its attention convolves
                with the kernel's depth taps as channels (both exact; see
                ``brainage_bids/model/blocks.py``).
    fast1       ``fast`` with one volume per forward (one participant's trunk pass).
    fastnocl    ``fast`` in the default memory format (what channels-last buys).
    bf16        ``fast`` under bf16 autocast (fp16 on CUDA).
    compiled    ``fast`` through ``torch.compile`` (compilation time reported apart).

Usage::

    python benchmarks/inference_throughput.py [--variants ours-plain,ours-fast,...]
        [--batch-size 4] [--batches 6] [--warmup 2] [--repeats 3] [--threads N]
        [--device cpu|cuda] [--model default] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

from rounds import run_rounds, use_textbook_blocks

DEFAULT_VARIANTS = ("ours-plain", "ours-textbook", "ours-fast", "ours-fast1", "ours-fastnocl",
                    "ours-bf16", "sfcn-plain", "sfcn-fast")
SETTINGS = ("plain", "textbook", "fast", "fast1", "fastnocl", "bf16", "compiled")
SHAPE = (91, 109, 91)
#: Predictions of an optimised variant must match plain fp32 within this many years.
TOLERANCE_YEARS = {"fp32": 1e-3, "bf16": 0.5}


def _inputs(n: int):
    """``n`` normalised volumes: the template brain with intensity changes."""
    import nibabel as nib
    import numpy as np
    import torch

    from brainage_bids.model.intensity import normalise_intensity

    root = resources.files("brainage_bids") / "data" / "templates"
    brain = nib.load(root / "tpl-MNI152NLin6Asym_res-02_desc-brain_T1w.nii.gz")
    mask = np.asarray(nib.load(root / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")
                      .dataobj) > 0
    base = brain.get_fdata(dtype=np.float32)
    rng = np.random.default_rng(0)
    volumes = []
    for _ in range(n):
        gamma = rng.uniform(0.8, 1.25)
        volumes.append(normalise_intensity(np.where(mask, base, 0) ** gamma, mask))
    return torch.from_numpy(np.stack(volumes)[:, None])


def _model(kind: str, spec: str | None):
    import torch

    from brainage_bids.model.step import initialise_weights
    from brainage_bids.model.weights import build_model, load_model

    if spec:
        model, card = load_model(spec)
        if (card["architecture"]["name"] == "SFCN") == (kind == "sfcn"):
            return model.eval(), card["name"]
    torch.manual_seed(0)
    model = build_model({"name": "SFCN"} if kind == "sfcn" else {"name": "BrainAgeNet"})
    initialise_weights(model, "kaiming", 50.0)
    return model.eval(), "untrained (He init)"


def run_variant(variant: str, batch: int, batches: int, warmup: int, threads: int | None,
                device_name: str, spec: str | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    kind, setting = variant.split("-", 1)
    if setting in ("plain", "textbook"):
        use_textbook_blocks()
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, model_name = _model(kind, spec)
    model.to(device)
    per_forward = 1 if setting in ("plain", "fast1") else batch
    x_all = _inputs(per_forward).to(device)
    channels_last = setting not in ("plain", "fastnocl")
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
        x_all = x_all.contiguous(memory_format=torch.channels_last_3d)
    net = model
    compile_s = None
    if setting == "compiled":
        net = torch.compile(model)
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    autocast = (torch.autocast(device.type, dtype=low) if setting == "bf16"
                else torch.autocast(device.type, enabled=False))
    grad_off = torch.no_grad() if setting == "plain" else torch.inference_mode()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    with grad_off, autocast:
        if setting == "compiled":
            start = time.perf_counter()
            net(x_all)
            sync()
            compile_s = time.perf_counter() - start
        for _ in range(warmup + batches):
            sync()
            start = time.perf_counter()
            out = net(x_all)
            sync()
            times.append(time.perf_counter() - start)
    # agreement with the plain fp32 loop of the textbook network on the same volumes, in years
    # (measured after the timing: from here on this process runs the textbook forwards)
    use_textbook_blocks()
    with torch.no_grad():
        reference = torch.cat([model.float()(x_all[i:i + 1].contiguous()) for i in
                               range(x_all.shape[0])])
    max_diff = float((out.float() - reference.float()).abs().max())
    median = statistics.median(times[warmup:])
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    return {"variant": variant, "model": model_name, "device": str(device),
            "threads": torch.get_num_threads(), "volumes_per_forward": per_forward,
            "median_forward_s": round(median, 5), "volumes_per_s": round(per_forward / median, 3),
            "max_abs_diff_years": max_diff, "compile_s": compile_s,
            "peak_memory_mb": round(peak, 1),
            "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "RSS"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="timed forwards per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="round-robin repetitions of every variant (median reported)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None,
                        help="weights to use (e.g. default); untrained He-init otherwise")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.one, args.batch_size, args.batches, args.warmup,
                                     args.threads, args.device, args.model)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:
        kind, _, setting = variant.partition("-")
        if kind not in ("ours", "sfcn") or setting not in SETTINGS:
            parser.error(f"unknown variant {variant!r}: MODEL-SETTING with MODEL in ours, "
                         f"sfcn and SETTING in {', '.join(SETTINGS)}")
    one_args = ["--batch-size", str(args.batch_size), "--batches", str(args.batches),
                "--warmup", str(args.warmup), "--device", args.device]
    if args.threads:
        one_args += ["--threads", str(args.threads)]
    if args.model:
        one_args += ["--model", args.model]

    def report(repeat: int, variant: str, result: dict) -> None:
        print(f"[{repeat + 1}/{args.repeats}] {variant:16s} {result['volumes_per_s']:8.2f} "
              f"volumes/s ({result['volumes_per_forward']} per forward, "
              f"{result['threads']} threads, max diff {result['max_abs_diff_years']:.2g} y, "
              f"peak {result['peak_memory_mb']:.0f} MB)", flush=True)

    runs = run_rounds(__file__, variants, args.repeats, one_args, report)
    if isinstance(runs, int):
        return runs
    summary = {}
    for variant, results in runs.items():
        rates = [r["volumes_per_s"] for r in results]
        summary[variant] = {
            "volumes_per_s_median": round(statistics.median(rates), 3),
            "volumes_per_s_runs": rates,
            "max_abs_diff_years": max(r["max_abs_diff_years"] for r in results),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in results),
            "within_tolerance": max(r["max_abs_diff_years"] for r in results)
            <= TOLERANCE_YEARS["bf16" if variant.endswith("bf16") else "fp32"],
            "compile_s": results[0]["compile_s"], "model": results[0]["model"],
            "device": results[0]["device"], "threads": results[0]["threads"]}
    print("\nvariant           vol/s (median)   vs plain   max |diff| (y)   peak memory")
    for variant, row in summary.items():
        plain = summary.get(f"{variant.split('-')[0]}-plain")
        ratio = (f"{row['volumes_per_s_median'] / plain['volumes_per_s_median']:.2f}x"
                 if plain else "")
        print(f"{variant:16s} {row['volumes_per_s_median']:10.2f} {ratio:>10s} "
              f"{row['max_abs_diff_years']:14.2g} {row['peak_memory_mb']:10.0f} MB")
    if args.json:
        import torch

        args.json.write_text(json.dumps({
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__, "python": platform.python_version()},
            "grid": list(SHAPE), "batch_size": args.batch_size, "summary": summary,
            "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
