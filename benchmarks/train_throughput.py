"""Training throughput: a plain PyTorch loop versus the training engine's settings.

Each variant runs in a fresh subprocess (so that ``ru_maxrss`` is its own peak) on the
91x109x91 grid at batch 8, and reports volumes/s as the median over timed steps after
warm-up steps. Inputs are copies of the real MNI152 2 mm template brain, normalised as in
training; for the engine they come from a float16 memory-mapped volume cache, as in a run.

Variants:
    plain           the textbook BrainAgeNet (its attention as one ``Conv3d(2, 1, 7)``),
                    torch's default init, default memory format, tensors in memory,
                    ``zero_grad()``, mean L1 loss, Adam.
    engine          the engine's step (``brainage_bids.model.step.train_step``) with its
                    default settings, fed by its batch pipeline, no augmentation.
    engine-MOD...   the engine with modifiers, e.g. ``engine-aug`` (default augmentation:
                    its cost), ``engine-contiguous`` (no channels_last_3d),
                    ``engine-prefetch``/``engine-noprefetch``, ``engine-bf16`` (autocast),
                    ``engine-defaultinit`` (torch's init instead of He),
                    ``engine-nomalloc`` (glibc's default mmap thresholds),
                    ``engine-textbook`` (the attention as one ``Conv3d(2, 1, 7)``),
                    ``engine-sfcn`` (the SFCN peer with its soft-label loss).

Usage::

    python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--threads N]
        [--variants plain,engine,engine-aug] [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from rounds import run_rounds, use_textbook_blocks

DEFAULT_VARIANTS = ("plain", "engine", "engine-aug")
#: ``engine-<modifier>-<modifier>...`` changes the engine's defaults.
MODIFIERS: dict[str, dict[str, object]] = {
    "aug": {"augment": True}, "contiguous": {"channels_last": False},
    "prefetch": {"prefetch": True}, "noprefetch": {"prefetch": False},
    "bf16": {"precision": "bf16"}, "defaultinit": {"init": "default"},
    "nomalloc": {"tune_malloc": False}, "sfcn": {"architecture": "SFCN", "loss": "kl"},
    "textbook": {},  # not a TrainConfig setting: the textbook blocks, see use_textbook_blocks
}
SHAPE = (91, 109, 91)


def _template_volume():
    import nibabel as nib
    import numpy as np

    from brainage_bids.model.intensity import normalise_intensity

    root = resources.files("brainage_bids") / "data" / "templates"
    brain = nib.load(root / "tpl-MNI152NLin6Asym_res-02_desc-brain_T1w.nii.gz")
    mask = nib.load(root / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")
    return normalise_intensity(brain.get_fdata(dtype=np.float32),
                               np.asarray(mask.dataobj)).astype(np.float32)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


FAULTS: list[int] = []  # minor page faults per step of the variant being run


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _plain(batch: int, steps: int, warmup: int,
           device_name: str = "cpu") -> tuple[list[float], list[float]]:
    import torch

    from brainage_bids.model.net import BrainAgeNet

    use_textbook_blocks()
    device = torch.device(device_name)
    torch.manual_seed(0)
    volume = torch.from_numpy(_template_volume())
    x = torch.stack([volume[None] * (1 + 0.01 * i) for i in range(batch)]).to(device)
    y = torch.linspace(20, 80, batch)[:, None].to(device)
    model = BrainAgeNet().train().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times, cpu = [], []
    for _ in range(warmup + steps):
        start, start_cpu, faults = time.perf_counter(), time.process_time(), _faults()
        optimizer.zero_grad()
        torch.nn.functional.l1_loss(model(x), y).backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        FAULTS.append(_faults() - faults)
    return times[warmup:], cpu[warmup:]


def _engine(variant: str, batch: int, steps: int, warmup: int,
            device_name: str = "cpu") -> tuple[list[float], list[float]]:
    import numpy as np
    import torch

    from brainage_bids.model.data import Augmenter, VolumeCache
    from brainage_bids.model.distributed import DistEnv
    from brainage_bids.model.step import epoch_batches, initialise_weights, train_step
    from brainage_bids.model.train import tune_malloc
    from brainage_bids.model.train_config import TrainConfig
    from brainage_bids.model.weights import build_model

    overrides: dict[str, object] = {"augment": False}
    for token in variant.split("-")[1:]:
        overrides.update(MODIFIERS[token])
    if "textbook" in variant.split("-"):
        use_textbook_blocks()
    config = TrainConfig(batch_size=batch, num_threads=torch.get_num_threads(), **overrides)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = DistEnv(0, 1, 0, device, False)
    if config.tune_malloc:
        tune_malloc()
    volume = _template_volume()
    n_items = batch * 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "volumes.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                          shape=(n_items, *SHAPE))
        for i in range(n_items):
            array[i] = volume * (1 + 0.01 * i)
        array.flush()
        del array
        cache = VolumeCache(path)
        ages = np.linspace(20, 80, n_items).astype(np.float32)
        torch.manual_seed(0)
        model = build_model({"name": config.architecture})
        initialise_weights(model, config.init, float(ages.mean()))
        model.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last_3d)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        augmenter = Augmenter(device=device) if config.augment else None
        times: list[float] = []
        cpu: list[float] = []
        epoch = 0
        start, start_cpu, faults = time.perf_counter(), time.process_time(), _faults()
        while len(times) < warmup + steps:
            for item in epoch_batches(config, env, cache, ages, epoch, augmenter):
                train_step(model, optimizer, item, config, env)
                _sync(device)
                now, now_cpu, now_faults = time.perf_counter(), time.process_time(), _faults()
                times.append(now - start)  # includes any batch preparation not overlapped
                cpu.append(now_cpu - start_cpu)
                FAULTS.append(now_faults - faults)
                start, start_cpu, faults = now, now_cpu, now_faults
                if len(times) == warmup + steps:
                    break
            epoch += 1
    return times[warmup:], cpu[warmup:]


def run_variant(variant: str, batch: int, steps: int, warmup: int,
                threads: int | None, device: str = "cpu") -> dict[str, float | str | int]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    times, cpu = (_plain(batch, steps, warmup, device) if variant == "plain"
                  else _engine(variant, batch, steps, warmup, device))
    median = statistics.median(times)
    # CPU seconds per step (all threads) are far less sensitive than wall time to other
    # processes on a shared machine; volumes per CPU-second compares variants' work.
    median_cpu = statistics.median(cpu)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else _peak_mb())
    return {"variant": variant, "device": device, "batch_size": batch,
            "threads": torch.get_num_threads(),
            "median_step_s": round(median, 4), "volumes_per_s": round(batch / median, 3),
            "median_step_cpu_s": round(median_cpu, 4),
            "volumes_per_cpu_s": round(batch / median_cpu, 3),
            "minor_faults_per_step": int(statistics.median(FAULTS[warmup:])),
            "step_times_s": [round(t, 4) for t in times], "peak_rss_mb": round(peak, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's choice, the number of cores)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated: plain, engine, engine-MOD[-MOD] with MOD in "
                             f"{','.join(MODIFIERS)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="round-robin repetitions of every variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (peak memory is "
                        "then the GPU's max allocated)")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.one, args.batch_size, args.steps, args.warmup,
                                     args.threads, args.device)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:
        head, *mods = variant.split("-")
        if (head, mods) != ("plain", []) and (head != "engine" or set(mods) - set(MODIFIERS)):
            parser.error(f"unknown variant {variant!r}: use plain or engine[-MOD...] with "
                         f"MOD in {sorted(MODIFIERS)}")
    one_args = ["--batch-size", str(args.batch_size), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--device", args.device]
    if args.threads:
        one_args += ["--threads", str(args.threads)]

    def report(repeat: int, variant: str, result: dict) -> None:
        result["load_average_1min"] = os.getloadavg()[0]
        print(f"[{repeat + 1}/{args.repeats}] {variant:22s} "
              f"{result['volumes_per_s']:6.2f} volumes/s, "
              f"{result['volumes_per_cpu_s']:5.2f} per CPU-s (median step "
              f"{result['median_step_s']:.2f} s, {result['minor_faults_per_step']} faults, "
              f"{result['threads']} threads, peak RSS "
              f"{result['peak_rss_mb']:.0f} MB, load {result['load_average_1min']:.1f})",
              flush=True)

    runs = run_rounds(__file__, variants, args.repeats, one_args, report)
    if isinstance(runs, int):
        return runs
    summary = {}
    for variant, results in runs.items():
        rates = [r["volumes_per_s"] for r in results]
        per_cpu = [r["volumes_per_cpu_s"] for r in results]
        summary[variant] = {"volumes_per_s_median": round(statistics.median(rates), 3),
                            "volumes_per_s_best": round(max(rates), 3),
                            "volumes_per_cpu_s_median": round(statistics.median(per_cpu), 3),
                            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
    base = summary.get("plain")
    print("\nvariant                 vol/s median  best   vol/CPU-s  peak RSS   vs plain "
          "(wall, CPU)")
    for variant, row in summary.items():
        ratio = (f"{row['volumes_per_s_median'] / base['volumes_per_s_median']:.2f}x, "
                 f"{row['volumes_per_cpu_s_median'] / base['volumes_per_cpu_s_median']:.2f}x"
                 if base else "")
        print(f"{variant:22s} {row['volumes_per_s_median']:8.2f} {row['volumes_per_s_best']:6.2f}"
              f" {row['volumes_per_cpu_s_median']:9.2f} {row['peak_rss_mb']:7.0f} MB   {ratio}")
    if args.json:
        import torch

        args.json.write_text(json.dumps({
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "load_average": os.getloadavg()},
            "grid": list(SHAPE), "batch_size": args.batch_size, "summary": summary,
            "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
