"""The training engine: deterministic, resumable, optionally distributed.

Design decisions (each measured or required; see ``benchmarks/train_throughput.py``):

- Every source of randomness in an epoch is a pure function of ``(seed, epoch)``: the
  shuffle (``numpy.random.default_rng([seed, epoch])``), the augmentation of each sample
  (:mod:`brainage_bids.model.data`) and dropout (``torch.manual_seed`` of a seed derived from
  ``(seed, epoch, rank)`` at the start of the epoch). Resuming therefore needs only the
  epoch index and the model/optimizer state, and ends bitwise equal to an uninterrupted run.
- A checkpoint ``<work_dir>/<model_name>_checkpoint.pt`` is written atomically after every
  epoch; it holds tensors and plain containers only (``torch.load(weights_only=True)``).
- Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is set up here (gloo on the CPU,
  nccl on CUDA); ``batch_size`` is the GLOBAL batch, each rank takes a contiguous share of
  every global batch, and the loss is scaled so that DDP's gradient average equals the
  single-process mean over the global batch. Only rank 0 writes files.
- CPU speed (``benchmarks/train_throughput.py``, batch 8, 91x109x91, 2 shared cores), each
  measured against the same engine without it:
  channels_last_3d memory format (oneDNN's default layout is slow for these few-channel 3D
  convolutions: ~1.5-2x); glibc malloc thresholds raised (:func:`tune_malloc`: no more
  ~450,000 page faults per step: ~1.5x); batches prepared one ahead in a thread from the
  float16 cache, which overlaps augmentation with compute and, on a busy machine, also
  stops OpenMP workers from spin-waiting (~1.5-2x there); no DataLoader workers;
  ``set_to_none`` grads; He initialisation (see :class:`TrainConfig`).
  ``torch.compile`` took 84 s to compile and was no faster; bf16 autocast was about as fast
  as fp32 on this CPU and is not validated for accuracy, so it is an option, not the default.
  Where CPUs are shared, ``OMP_WAIT_POLICY=PASSIVE`` in the environment helps further.

Launch, one process: call :func:`train_model`, or
``python -m brainage_bids.model.train --items items.json --out OUT/models --work-dir WORK``.
Several processes/GPUs: ``torchrun --nproc_per_node N -m brainage_bids.model.train ...``
(or any script calling :func:`train_model` started by torchrun).

Around the engine: the options, items and split are :mod:`~brainage_bids.model.train_config`,
one step (initial weights, loss, an epoch's batches, prediction of the cached validation
images) :mod:`~brainage_bids.model.step`, the process layout
:mod:`~brainage_bids.model.distributed`, the resumable state
:mod:`~brainage_bids.model.checkpoint`, and the finished run's card, metrics and curve
:mod:`~brainage_bids.model.train_record`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainage_bids.metrics import regression_metrics
from brainage_bids.model.checkpoint import (
    TrainState,
    checkpoint_path,
    config_digest,
    cpu_state,
    is_finished,
    items_digest,
    load_checkpoint,
    save_checkpoint,
)
from brainage_bids.model.data import Augmenter, VolumeCache, build_cache
from brainage_bids.model.distributed import DistEnv, all_reduce_sum, barrier, setup_distributed
from brainage_bids.model.step import (
    epoch_batches,
    initialise_weights,
    predict_cache,
    start_from,
    train_step,
)
from brainage_bids.model.train_config import (
    TrainConfig,
    TrainItem,
    split_stratified,
    validate_items,
)
from brainage_bids.model.train_record import RESERVED_CARD_KEYS, CardFinish, write_finished_model
from brainage_bids.model.weights import build_model
from brainage_bids.progress import eta_seconds, format_duration

LOGGER = logging.getLogger(__name__)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]
               % (2 ** 63))


def _lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): a pure function, so resuming needs no state."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MALLOC_KEEP = 1 << 30


def tune_malloc() -> bool:
    """Keep freed activation buffers in the heap instead of unmapping them (glibc only).

    By default glibc serves every buffer over 32 MB (a batch of 8 has activations of 360 MB)
    with a fresh ``mmap`` and returns it with ``munmap``, so every step page-faults in and
    zero-fills about 1.8 GB (~450,000 minor faults per step, measured). Raising the mmap
    and trim thresholds to 1 GiB lets the next step reuse the memory: zero faults per step
    and 1.3-2x faster steps on the CPU. The price is that up to 1 GiB of freed memory stays
    with the process; the setting is process-wide and lasts after training.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MALLOC_KEEP)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _MALLOC_KEEP))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def _torch_settings(config: TrainConfig, env: DistEnv) -> Iterator[None]:
    """Threads and RNG for this run only; the caller's process state is restored after."""
    previous = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if config.tune_malloc and env.device.type == "cpu":
        LOGGER.debug("glibc malloc thresholds raised: %s", tune_malloc())
    devices = [env.device.index or 0] if env.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads(previous)


def train_model(config: TrainConfig, train_items: Sequence[TrainItem],
                val_items: Sequence[TrainItem], out_dir: str | Path, *,
                work_dir: str | Path, resume: bool = False, progress: bool = True,
                card_extra: dict[str, Any] | None = None,
                init_state: dict[str, torch.Tensor] | None = None,
                finish: CardFinish | None = None) -> dict[str, Any]:
    """Train a BrainAgeNet and write it, with its card, metrics and curve, to ``out_dir``.

    Parameters
    ----------
    config:
        The run's options; recorded in the card.
    train_items, val_items:
        Preprocessed images with ages (see :func:`split_stratified`). Validated before
        anything is written: at least 4 and 2 items, finite ages, existing files, unique ids.
    out_dir:
        Receives only finished artefacts: ``<name>.safetensors``, ``<name>.json`` (the card,
        written last), ``<name>_metrics.tsv`` and ``<name>_curve.svg``.
    work_dir:
        The volume cache (``cache/``) and the per-epoch checkpoint
        (:func:`checkpoint_path`).
    resume:
        Continue from the checkpoint in ``work_dir`` when there is one (its options and
        images must match); otherwise start afresh.
    progress:
        A tqdm bar on stderr (rank 0 only).
    card_extra:
        Added to the card's top level (training data, preprocessing backend, source dataset,
        lineage); keys may not shadow the engine's own.
    init_state:
        A trained model's state dict to start from instead of a fresh initialisation
        (fine-tuning); ``config.init_from_sha256`` must name its source so that a resume
        can tell parents apart. With ``config.freeze_trunk`` only the dense head trains.
    finish:
        Called with the best epoch's model and its card before the card is written, and
        returns the card to write: the train level's validation-set fits of a single model
        (:func:`brainage_bids.model.held_out.validation_fits`). Rank 0 only.

    Returns
    -------
    dict
        The model card; an empty dict on DDP ranks other than 0, which write nothing.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if (init_state is None) != (config.init_from_sha256 is None):
        raise ValueError("init_state and config.init_from_sha256 go together")
    train_items, val_items = list(train_items), list(val_items)
    validate_items(train_items, val_items)
    card_extra = dict(card_extra or {})
    if RESERVED_CARD_KEYS & set(card_extra):
        raise ValueError(f"card_extra may not set {sorted(RESERVED_CARD_KEYS & set(card_extra))}")
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    if out_dir.resolve() == work_dir.resolve():
        raise ValueError("out_dir and work_dir must differ (out_dir holds finished models only)")

    env = setup_distributed(config)
    try:
        with _torch_settings(config, env):
            # No collective after _train's barrier: one on Python tensors (a broadcast of
            # the card) can leave a gloo thread freeing them during interpreter exit, which
            # aborts a finished run (SIGABRT).
            return _train(config, env, train_items, val_items, out_dir, work_dir, resume,
                          progress, card_extra, init_state, finish)
    finally:
        if env.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, env: DistEnv, train_items: list[TrainItem],
           val_items: list[TrainItem], out_dir: Path, work_dir: Path, resume: bool,
           progress: bool, card_extra: dict[str, Any],
           init_state: dict[str, torch.Tensor] | None = None,
           finish: CardFinish | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    cache_dir = work_dir / "cache"
    cache_paths = {}
    for split, items in (("train", train_items), ("val", val_items)):
        # One process per node reads the NIfTI files; the others map its cache.
        for builder in (True, False):
            if (env.local_rank == 0) == builder:
                cache_paths[split] = build_cache(
                    [(i.image, i.mask) for i in items], cache_dir, shape=config.input_shape,
                    dtype=config.cache_dtype, ids=[i.id for i in items])
            if builder:
                barrier(env)
    train_cache, val_cache = VolumeCache(cache_paths["train"]), VolumeCache(cache_paths["val"])
    ages = np.array([float(i.age) for i in train_items], dtype=np.float32)
    val_ages = np.array([float(i.age) for i in val_items], dtype=np.float64)
    mean_age = float(ages.astype(np.float64).mean())

    torch.manual_seed(config.seed)
    if config.architecture == "SFCN":
        model = build_model({"name": "SFCN", "dropout": config.dropout})
    else:
        model = build_model({"name": "BrainAgeNet", "attention": config.attention,
                             "attention_kernel": config.attention_kernel,
                             "dropout": config.dropout})
    initialise_weights(model, config.init, mean_age)
    if init_state is not None:
        start_from(model, init_state, config.freeze_trunk)
    model.to(env.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=config.lr, weight_decay=config.weight_decay)
    digests = {"config_digest": config_digest(config),
               "items_digest": items_digest(train_items, val_items)}
    ckpt = checkpoint_path(work_dir, config.model_name)
    state = TrainState()
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt, model, optimizer, digests)
        if state.epoch > config.epochs:  # its best epoch may lie beyond the budget asked for
            raise ValueError(f"cannot resume from {ckpt}: it has run {state.epoch} epochs, "
                             f"more than the {config.epochs} asked for; rerun with --epochs "
                             f"{state.epoch} or more, or use another work directory (-w)")
        LOGGER.info("resuming %s after epoch %d", config.model_name, state.epoch)
    elif resume:
        LOGGER.info("no checkpoint at %s; starting afresh", ckpt)
    state.finished = is_finished(state, config)  # epochs or patience may have changed

    net: nn.Module = model
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    augmenter = Augmenter(device=env.device) if config.augment else None
    n_batches = math.ceil(len(train_items) / config.batch_size)
    bar = tqdm(total=config.epochs, initial=state.epoch, desc=config.model_name, unit="epoch",
               file=sys.stderr, disable=not progress or not env.main, dynamic_ncols=True)
    if state.history:
        bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.3g}",
                        val_mae=f"{state.history[-1]['val_mae']:.3g}")
    wall_base = state.wall_seconds  # earlier sessions of a resumed run
    first_epoch = state.epoch  # the ETA counts this session's pace only
    with bar:
        while not state.finished:
            epoch = state.epoch  # 0-based index of the epoch about to run
            epoch_start = time.perf_counter()
            lr = _lr_at(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(_derived_seed(config.seed, epoch, env.rank))
            net.train()
            loss_sum = torch.zeros(2, dtype=torch.float64)
            inner = tqdm(total=n_batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                         file=sys.stderr, disable=not progress or not env.main,
                         dynamic_ncols=True)
            with inner:
                for step, batch in enumerate(epoch_batches(config, env, train_cache, ages,
                                                            epoch, augmenter)):
                    LOGGER.debug("epoch %d batch %d/%d", epoch + 1, step + 1, n_batches)
                    batch_sum, batch_n = train_step(net, optimizer, batch, config, env)
                    loss_sum += torch.tensor([batch_sum, batch_n], dtype=torch.float64)
                    inner.update()
                    inner.set_postfix(loss=f"{batch_sum / max(batch_n, 1.0):.3g}")
            loss_sum = all_reduce_sum(env, loss_sum)
            val_pred = predict_cache(model, val_cache, config, env)
            metrics = regression_metrics(val_ages, val_pred)
            state.epoch = epoch + 1
            state.history.append({
                "epoch": state.epoch, "train_loss": float(loss_sum[0] / loss_sum[1]),
                "val_mae": metrics["mae"], "val_rmse": metrics["rmse"], "val_r": metrics["r"],
                "lr": lr, "seconds": round(time.perf_counter() - epoch_start, 3)})
            if metrics["mae"] < state.best_mae:
                state.best_mae, state.best_epoch, state.since_best = metrics["mae"], state.epoch, 0
                state.best_state = cpu_state(model)
                state.best_val_pred = val_pred.tolist()
            else:
                state.since_best += 1
            state.finished = is_finished(state, config)
            state.wall_seconds = wall_base + (time.perf_counter() - started)
            if env.main:
                save_checkpoint(ckpt, state, model, optimizer, digests)
            left = eta_seconds(time.perf_counter() - started, state.epoch - first_epoch,
                               config.epochs - first_epoch)
            LOGGER.info("epoch %d/%d: train loss %.4g, val MAE %.3f (best %.3f at %d), %s%s",
                        state.epoch, config.epochs, state.history[-1]["train_loss"],
                        metrics["mae"], state.best_mae, state.best_epoch,
                        format_duration(state.history[-1]["seconds"]),
                        f", ETA {format_duration(left)}" if left else "")
            bar.update()
            bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.3g}",
                            val_mae=f"{metrics['mae']:.3g}")
    if state.since_best and config.patience is not None and state.epoch < config.epochs:
        LOGGER.info("early stop after epoch %d: no better validation MAE for %d epochs",
                    state.epoch, state.since_best)
    state.wall_seconds = wall_base + (time.perf_counter() - started)
    if state.best_state is None:
        raise ValueError(f"training diverged: the validation MAE was never finite "
                         f"({state.epoch} epochs); try a lower learning rate")
    card: dict[str, Any] = {}
    if env.main:
        card = write_finished_model(out_dir, config, env, model, state, train_items, val_items,
                                    mean_age, card_extra, finish)
    barrier(env)
    return card


# --------------------------------------------------------------------------- entry point

def _read_items(path: str | Path) -> list[TrainItem]:
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        return [TrainItem(**row) for row in rows]
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"cannot read training items from {path}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m brainage_bids.model.train`` (also under ``torchrun``)."""
    parser = argparse.ArgumentParser(
        prog="python -m brainage_bids.model.train",
        description="Train a brain-age model on preprocessed images (JSON item lists: "
                    "[{id, image, mask, age[, group]}, ...]). Start with torchrun for "
                    "several processes.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--items", help="all items; split by age with the config's seed")
    source.add_argument("--train", help="training items (use with --val)")
    parser.add_argument("--val", help="validation items (with --train)")
    parser.add_argument("--out", required=True, help="directory for the finished model")
    parser.add_argument("--work-dir", required=True, help="cache and checkpoint directory")
    parser.add_argument("--config", help="JSON object of TrainConfig options")
    parser.add_argument("--card-extra", help="JSON object added to the model card")
    parser.add_argument("--mc-samples", type=int, default=20,
                        help="Monte-Carlo dropout samples of the validation predictions that "
                             "fit the card's uncertainty scale (default 20)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    if bool(args.train) != bool(args.val):
        parser.error("--train and --val go together")
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else
                        logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = TrainConfig.from_dict(
            json.loads(Path(args.config).read_text()) if args.config else {})
        extra = json.loads(Path(args.card_extra).read_text()) if args.card_extra else None
        if args.items:
            train, val = split_stratified(_read_items(args.items), config.val_fraction,
                                          config.seed)
        else:
            train, val = _read_items(args.train), _read_items(args.val)
        from brainage_bids.model.held_out import validation_fits

        card = train_model(config, train, val, args.out, work_dir=args.work_dir,
                           resume=args.resume, progress=not args.no_progress,
                           card_extra=extra,
                           finish=validation_fits(config, val, args.mc_samples))
    except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: no visible GPU
        LOGGER.error("%s", exc)
        return 1
    if card:
        LOGGER.info("wrote %s (validation MAE %.3f)", card["file"], card["validation"]["mae"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
