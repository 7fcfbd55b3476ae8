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
  convolutions: ~1.5-2x); glibc malloc thresholds raised (:func:`_tune_malloc`: no more
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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainage_bids import __version__
from brainage_bids.io import atomic_path, atomic_write_text
from brainage_bids.metrics import bias_report, regression_metrics
from brainage_bids.model.data import AUGMENTATION, Augmenter, VolumeCache, build_cache
from brainage_bids.model.intensity import NORMALISATION
from brainage_bids.model.net import ATTENTION_VARIANTS, INPUT_SHAPE
from brainage_bids.model.predict import resolve_device
from brainage_bids.model.weights import build_model, describe_architecture
from brainage_bids.progress import eta_seconds, format_duration

LOGGER = logging.getLogger(__name__)

LOSSES = ("l1", "mse", "smoothl1", "kl")
#: "kl" is SFCN's soft-label loss and only SFCN's; the regression losses are BrainAgeNet's.
TRAIN_ARCHITECTURES = ("BrainAgeNet", "SFCN")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
INITS = ("kaiming", "default")
#: Fewest items per split; fewer is an error raised before anything is written.
MIN_TRAIN = 4
MIN_VAL = 2
CHECKPOINT_FORMAT = "brainage-bids-checkpoint"
CHECKPOINT_VERSION = 1
METRIC_COLUMNS = ("epoch", "train_loss", "val_mae", "val_rmse", "val_r", "lr", "seconds")


@dataclass(frozen=True)
class TrainItem:
    """One preprocessed image (91x109x91 MNI brain and its mask) with its age in years.

    ``group`` (e.g. the participant label) keeps several sessions of one participant in the
    same split; empty means the item is its own group.
    """

    id: str
    image: str
    mask: str
    age: float
    group: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the model card).

    ``batch_size`` is the global batch across all ranks. ``input_shape`` exists so that tests
    can train on small grids (a 32^3 cube reaches 1x1x1 in the network). ``num_threads``
    None leaves torch's setting alone. ``patience`` None disables early stopping.
    ``init="kaiming"`` (He-normal weights, zero biases) is the default because with torch's
    default initialisation the output of this 12-layer network barely depends on its input
    (spread across subjects ~1e-8 years) and, measured on a small synthetic set, it did not
    learn at all in 25 epochs, at lr 1e-4 or 1e-3; with He init it did.
    """

    epochs: int = 250
    architecture: str = "BrainAgeNet"
    batch_size: int = 4
    lr: float = 1e-4
    loss: str = "l1"
    attention: str = "shared"
    dropout: float = 0.2  # the paper gives no rate; 0.5 did not learn on IXI in 12 epochs
    seed: int = 42
    device: str = "auto"
    patience: int | None = None
    augment: bool = True
    num_threads: int | None = None
    val_fraction: float = 0.2
    model_name: str = "brainage"
    attention_kernel: int = 7
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    input_shape: tuple[int, int, int] = INPUT_SHAPE
    cache_dtype: str = "float16"
    channels_last: bool = True
    precision: str = "fp32"
    prefetch: bool = True
    init: str = "kaiming"
    tune_malloc: bool = True
    init_from_sha256: str | None = None
    freeze_trunk: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("patience", self.patience, allow_none=True)
        positive_int("num_threads", self.num_threads, allow_none=True)
        positive_int("attention_kernel", self.attention_kernel)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.val_fraction, float | int) and 0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name, value, allowed in (("architecture", self.architecture, TRAIN_ARCHITECTURES),
                                     ("loss", self.loss, LOSSES),
                                     ("attention", self.attention, ATTENTION_VARIANTS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("precision", self.precision, PRECISIONS),
                                     ("init", self.init, INITS),
                                     ("cache_dtype", self.cache_dtype, ("float16", "float32"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if (self.architecture == "SFCN") != (self.loss == "kl"):
            raise ValueError(f"loss 'kl' (soft labels) goes with SFCN and only with SFCN; got "
                             f"loss {self.loss!r} for {self.architecture}")
        if self.freeze_trunk and self.init_from_sha256 is None:
            raise ValueError("freeze_trunk needs a trained parent (init_from_sha256): a "
                             "randomly initialised trunk cannot be frozen usefully")
        if self.attention_kernel % 2 != 1:
            raise ValueError(f"attention_kernel must be odd, got {self.attention_kernel}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got "
                                 f"{self.device!r}") from exc
        if not self.model_name or not all(c.isalnum() or c in "-_." for c in self.model_name):
            raise ValueError(f"model_name must be a non-empty file stem of letters, digits, "
                             f"'-', '_' or '.', got {self.model_name!r}")
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"input_shape must be three positive integers, got {shape!r}")
        object.__setattr__(self, "input_shape", shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (tuples as lists)."""
        data = dataclasses.asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "input_shape" in data:
            data["input_shape"] = tuple(data["input_shape"])
        return cls(**data)


# --------------------------------------------------------------------------- splitting

def split_stratified(items: Sequence[TrainItem], val_fraction: float,
                     seed: int) -> tuple[list[TrainItem], list[TrainItem]]:
    """Age-stratified, seeded train/validation split (groups never straddle the split).

    Groups (participants) are sorted by mean age, cut into ``n_val`` consecutive strata of
    near-equal size, and one group per stratum, drawn with ``seed``, goes to validation; so
    the validation ages span the training range. The result does not depend on the order of
    ``items``; both lists keep the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    groups: dict[str, list[TrainItem]] = {}
    for item in items:
        if not math.isfinite(float(item.age)):
            raise ValueError(f"item {item.id!r} has no valid age ({item.age!r})")
        groups.setdefault(item.group or item.id, []).append(item)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 participants to split, got {len(groups)}")
    ordered = sorted(groups, key=lambda g: (float(np.mean([i.age for i in groups[g]])), g))
    n_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
    rng = np.random.default_rng(seed)
    val_groups = {stratum[rng.integers(len(stratum))]
                  for stratum in np.array_split(np.array(ordered, dtype=object), n_val)}
    train = [item for item in items if (item.group or item.id) not in val_groups]
    val = [item for item in items if (item.group or item.id) in val_groups]
    return train, val


# --------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(config: TrainConfig) -> _Dist:
    """Read torchrun's environment; init the process group unless the caller already did."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and config.batch_size < world:
        raise ValueError(f"batch_size ({config.batch_size}) is the global batch and must be at "
                         f"least the number of processes ({world})")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(rank, world, local_rank, device, owns)


def _barrier(env: _Dist) -> None:
    if env.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_sum(env: _Dist, tensor: torch.Tensor) -> torch.Tensor:
    if env.world > 1:
        import torch.distributed as dist

        moved = tensor.to(env.device)
        dist.all_reduce(moved)
        return moved.cpu()
    return tensor


# --------------------------------------------------------------------------- helpers

def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]
               % (2 ** 63))


def _lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): a pure function, so resuming needs no state."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr


def _initialise(model: nn.Module, scheme: str, mean_age: float) -> None:
    """He-normal weights and zero biases (``kaiming``), and the output bias at the mean age.

    Starting at the mean age saves the many epochs Adam's lr-sized steps would need to move
    a bias from ~0 to ~50 years. SFCN keeps torch's initialisation, as its reference code
    does: batch normalisation keeps its activations in range, and its output is a
    distribution over age bins, not an age with a bias to place.
    """
    if not hasattr(model, "dense"):
        return
    with torch.no_grad():
        if scheme == "kaiming":
            for module in model.modules():
                if isinstance(module, nn.Conv3d | nn.Linear):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    nn.init.zeros_(module.bias)
        model.dense[-1].bias.fill_(mean_age)


def _start_from(model: nn.Module, state: dict[str, torch.Tensor], freeze_trunk: bool) -> None:
    """Load a parent's weights (same architecture) and optionally freeze all but the head.

    Frozen parameters get no gradient, so the trunk's backward pass is skipped entirely and
    a fine-tuning epoch costs about a forward pass.
    """
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the parent model's weights do not fit this architecture: "
                         f"{str(exc).splitlines()[0]}") from exc
    if freeze_trunk:
        head = getattr(model, "dense", None)
        if head is None:
            raise ValueError(f"freeze_trunk needs a model with a dense head; "
                             f"{type(model).__name__} has none")
        keep = {id(p) for p in head.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in keep)


def _per_sample_loss(kind: str, pred: torch.Tensor, target: torch.Tensor,
                     bin_centers: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, 1)`` losses; for ``kl``, ``pred`` is SFCN's ``(N, n_bins)`` log-probabilities."""
    if kind == "kl":
        from brainage_bids.model.sfcn import gaussian_soft_labels

        soft = gaussian_soft_labels(target, bin_centers).to(pred.dtype)
        return (torch.xlogy(soft, soft) - soft * pred).sum(dim=1, keepdim=True)
    if kind == "l1":
        return (pred - target).abs()
    if kind == "mse":
        return (pred - target) ** 2
    return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _items_digest(train: Sequence[TrainItem], val: Sequence[TrainItem]) -> str:
    return _digest([[dataclasses.asdict(i) for i in train], [dataclasses.asdict(i) for i in val]])


_RUNTIME_ONLY = ("device", "num_threads", "prefetch", "patience", "model_name", "tune_malloc")


def _config_digest(config: TrainConfig) -> str:
    """Digest of the options that change results; the others may differ on resume.

    ``epochs`` may grow on resume (train longer) unless the learning rate depends on it.
    """
    skip = _RUNTIME_ONLY + (("epochs",) if config.lr_schedule == "constant" else ())
    return _digest({k: v for k, v in config.to_dict().items() if k not in skip})


def _is_finished(state: _State, config: TrainConfig) -> bool:
    return state.epoch >= config.epochs or (config.patience is not None
                                            and state.since_best >= config.patience)


def _validate_items(train: Sequence[TrainItem], val: Sequence[TrainItem]) -> None:
    for split, items, minimum in (("training", train, MIN_TRAIN), ("validation", val, MIN_VAL)):
        if len(items) < minimum:
            raise ValueError(f"need at least {minimum} {split} images, got {len(items)}")
        for item in items:
            if not isinstance(item, TrainItem):
                raise ValueError(f"expected TrainItem, got {type(item).__name__}")
            age = float(item.age)
            if not math.isfinite(age) or not 0.0 < age < 130.0:
                raise ValueError(f"item {item.id!r} has an invalid age {item.age!r}")
            for path in (item.image, item.mask):
                if not Path(path).is_file():
                    raise ValueError(f"item {item.id!r}: file {path} does not exist")
    ids = [item.id for item in [*train, *val]]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"item ids must be unique (train and validation together); "
                         f"repeated: {duplicated[:5]}")
    leaked = {i.group for i in train if i.group} & {i.group for i in val if i.group}
    if leaked:
        raise ValueError(f"groups in both training and validation: {sorted(leaked)[:5]}")


# --------------------------------------------------------------------------- batches

@dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor
    n_global: int


def _shard(batch: np.ndarray, env: _Dist) -> tuple[np.ndarray, np.ndarray]:
    """This rank's contiguous share of a global batch, padded (weight 0) to be non-empty."""
    share = np.array_split(batch, env.world)[env.rank]
    weight = np.ones(len(share), dtype=np.float32)
    if len(share) == 0:  # fewer samples than ranks: every rank must still step
        share, weight = batch[:1], np.zeros(1, dtype=np.float32)
    return share, weight


def _epoch_batches(config: TrainConfig, env: _Dist, cache: VolumeCache, ages: np.ndarray,
                   epoch: int, augmenter: Augmenter | None) -> Iterator[_Batch]:
    """Yield this rank's training batches of ``epoch``, prepared one ahead in a thread.

    The thread overlaps reading and augmenting the next batch with the current step, and
    results do not depend on it. (A measured side effect on busy CPUs: with a second thread
    running OpenMP work, libgomp shortens its workers' spin-waiting, which otherwise burns
    the cores that other processes need, and steps get faster.)
    """
    order = np.random.default_rng([config.seed, epoch]).permutation(len(cache))
    globals_ = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]

    def prepare(batch: np.ndarray) -> _Batch:
        share, weight = _shard(batch, env)
        volumes = []
        for index in share:
            volume = cache.volume(int(index))
            if augmenter is not None:  # on the training device (see Augmenter)
                volume = augmenter(volume.to(env.device), config.seed, epoch, int(index))
            volumes.append(volume)
        return _Batch(torch.stack(volumes), torch.from_numpy(ages[share]).float()[:, None],
                      torch.from_numpy(weight)[:, None], len(batch))

    if not config.prefetch:
        yield from (prepare(b) for b in globals_)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainage-batch") as pool:
        pending = pool.submit(prepare, globals_[0])
        for next_batch in [*globals_[1:], None]:
            ready = pending.result()
            if next_batch is not None:
                pending = pool.submit(prepare, next_batch)
            yield ready


def _to_device(x: torch.Tensor, env: _Dist, channels_last: bool) -> torch.Tensor:
    x = x.to(env.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def _autocast(config: TrainConfig, env: _Dist) -> contextlib.AbstractContextManager[Any]:
    if config.precision == "bf16":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_step(net: nn.Module, optimizer: torch.optim.Optimizer, batch: _Batch,
                config: TrainConfig, env: _Dist) -> tuple[float, float]:
    """One optimisation step; returns (sum of this rank's sample losses, its sample count)."""
    x = _to_device(batch.x, env, config.channels_last)
    y, w = batch.y.to(env.device), batch.weight.to(env.device)
    optimizer.zero_grad(set_to_none=True)
    centers = None
    with _autocast(config, env):
        if config.architecture == "SFCN":
            # through the (possibly DDP-wrapped) module's forward, so gradients are reduced
            pred = net(x, log_probs=True)
            centers = getattr(net, "module", net).bin_centers
        else:
            pred = net(x)
    per_sample = _per_sample_loss(config.loss, pred.float(), y, centers) * w
    # sum / n_global on each rank, times world: DDP's gradient mean is then the global mean
    (per_sample.sum() * (env.world / batch.n_global)).backward()
    optimizer.step()
    return float(per_sample.detach().sum()), float(w.sum())


@torch.no_grad()
def _predict(model: nn.Module, cache: VolumeCache, config: TrainConfig, env: _Dist) -> np.ndarray:
    """Predictions for every cached volume; ranks split the work and sum their shares."""
    model.eval()
    preds = torch.zeros(len(cache), dtype=torch.float64)
    mine = np.arange(env.rank, len(cache), env.world)
    for start in range(0, len(mine), config.batch_size):
        chunk = mine[start:start + config.batch_size]
        with _autocast(config, env):
            out = model(_to_device(cache.batch(chunk), env, config.channels_last))
        preds[torch.from_numpy(chunk)] = out.float().squeeze(1).double().cpu()
    return _all_reduce_sum(env, preds).numpy()


# --------------------------------------------------------------------------- checkpoint

def checkpoint_path(work_dir: str | Path, model_name: str) -> Path:
    """Where :func:`train_model` keeps its resumable state.

    The file (``torch.load(path, weights_only=True)``) is a dict: ``format``, ``version``,
    ``config_digest`` and ``items_digest`` (a resume must match both), ``epoch`` (epochs
    completed), ``finished``, ``history`` (the metrics rows), ``best_mae``, ``best_epoch``,
    ``best_val_pred``, ``since_best``, ``wall_seconds``, and the state dicts ``model``,
    ``best_model`` and ``optimizer``.
    """
    return Path(work_dir) / f"{model_name}_checkpoint.pt"


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@dataclass
class _State:
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_mae: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_val_pred: list[float] | None = None
    since_best: int = 0
    finished: bool = False
    wall_seconds: float = 0.0


def _save_checkpoint(path: Path, state: _State, model: nn.Module, optimizer: torch.optim.Optimizer,
                     digests: dict[str, str]) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **digests,
        "epoch": state.epoch, "finished": state.finished, "history": state.history,
        "best_mae": state.best_mae, "best_epoch": state.best_epoch,
        "best_val_pred": state.best_val_pred, "since_best": state.since_best,
        "wall_seconds": state.wall_seconds,
        "model": _cpu_state(model), "best_model": state.best_state,
        "optimizer": optimizer.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     digests: dict[str, str]) -> _State:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file must not crash obscurely
        raise ValueError(f"cannot resume from {path}: {exc}") from exc
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a brainage-bids checkpoint of version "
                         f"{CHECKPOINT_VERSION}")
    for key, what in (("config_digest", "training options"), ("items_digest", "images")):
        if payload.get(key) != digests[key]:
            raise ValueError(f"cannot resume from {path}: it was made with different {what}; "
                             "start afresh (resume=False) or use another work directory")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return _State(epoch=payload["epoch"], history=payload["history"],
                  best_mae=payload["best_mae"], best_epoch=payload["best_epoch"],
                  best_state=payload["best_model"], best_val_pred=payload["best_val_pred"],
                  since_best=payload["since_best"], finished=payload["finished"],
                  wall_seconds=payload["wall_seconds"])


# --------------------------------------------------------------------------- outputs

def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None: strict JSON readers (and BIDS validators) reject ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(value) for value in obj]
    return obj


def _tsv_value(column: str, value: float) -> str:
    if column == "epoch":
        return str(int(value))
    return f"{value:.6g}" if math.isfinite(value) else "n/a"


def _write_metrics(path: Path, history: Sequence[dict[str, float]]) -> None:
    lines = ["\t".join(METRIC_COLUMNS)]
    lines += ["\t".join(_tsv_value(c, row[c]) for c in METRIC_COLUMNS) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _write_curve(path: Path, history: Sequence[dict[str, float]], best_epoch: int,
                 loss: str) -> None:
    """Training curve as SVG, drawn without pyplot (no global backend state)."""
    import matplotlib
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax_loss, ax_mae = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel=f"training loss ({loss})", title="Training loss")
    ax_mae.plot(epochs, [row["val_mae"] for row in history], color="tab:orange")
    ax_mae.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch {best_epoch}")
    ax_mae.set(xlabel="epoch", ylabel="MAE (years)", title="Validation MAE")
    ax_mae.legend(loc="upper right", frameon=False)
    with matplotlib.rc_context({"svg.hashsalt": "brainage-bids", "svg.fonttype": "none"}), \
            atomic_path(path) as tmp:
        fig.savefig(tmp, format="svg", metadata={"Date": None})


def _software() -> dict[str, str]:
    import monai

    return {"brainage_bids": __version__, "torch": torch.__version__,
            "monai": monai.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _age_range(items: Sequence[TrainItem]) -> list[float]:
    ages = [float(i.age) for i in items]
    return [min(ages), max(ages)]


def _build_card(config: TrainConfig, env: _Dist, model: nn.Module, state: _State,
                train: Sequence[TrainItem], val: Sequence[TrainItem], mean_age: float,
                card_extra: dict[str, Any]) -> dict[str, Any]:
    val_age = np.array([float(i.age) for i in val])
    report = bias_report(val_age, np.asarray(state.best_val_pred), errors="record")
    shape = list(config.input_shape)
    standard = tuple(shape) == INPUT_SHAPE
    return _json_safe({
        "name": config.model_name,
        "card_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": describe_architecture(model),
        "input": {"shape": shape, "template": "MNI152NLin6Asym" if standard else None,
                  "resolution_mm": 2.0 if standard else None,
                  "intensity_normalisation": NORMALISATION},
        **card_extra,
        "training": {
            "n_train": len(train), "n_val": len(val),
            "age_range": _age_range([*train, *val]),
            "age_range_train": _age_range(train), "age_range_val": _age_range(val),
            "epochs_requested": config.epochs, "epochs_run": state.epoch,
            "best_epoch": state.best_epoch,
            "stopped_early": state.epoch < config.epochs, "patience": config.patience,
            "loss": config.loss, "batch_size": config.batch_size, "lr": config.lr,
            "lr_schedule": config.lr_schedule, "optimizer": "Adam",
            "optimizer_params": {"betas": [0.9, 0.999], "eps": 1e-8,
                                 "weight_decay": config.weight_decay},
            "init": ("parent model" if config.init_from_sha256 else
                     config.init if config.architecture == "BrainAgeNet" else "default"),
            "output_bias_init": (mean_age if config.architecture == "BrainAgeNet"
                                 and not config.init_from_sha256 else None),
            "freeze_trunk": config.freeze_trunk,
            "augmentation": AUGMENTATION if config.augment else None,
            "seed": config.seed, "cache_dtype": config.cache_dtype,
            "precision": config.precision,
            "memory_format": "channels_last_3d" if config.channels_last else "contiguous",
            "device": str(env.device), "world_size": env.world,
            "wall_time_s": round(state.wall_seconds, 3),
            "config": config.to_dict(),
        },
        "software": _software(),
        "validation": {**report["uncorrected"], "at_epoch": state.best_epoch,
                       "corrected": report["corrected"]},
        "bias_correction": {"fitted_on": "validation set, predictions of the best epoch",
                            **report["coefficients"]},
    })


def _finalise(out_dir: Path, config: TrainConfig, env: _Dist, model: nn.Module, state: _State,
              train: Sequence[TrainItem], val: Sequence[TrainItem], mean_age: float,
              card_extra: dict[str, Any]) -> dict[str, Any]:
    """Write the finished artefacts; the model card goes last (see save_model)."""
    from brainage_bids.model.weights import save_model

    best = build_model(describe_architecture(model))
    best.load_state_dict(state.best_state)
    card = _build_card(config, env, best, state, train, val, mean_age, card_extra)
    stem = out_dir / config.model_name
    _write_metrics(stem.with_name(f"{config.model_name}_metrics.tsv"), state.history)
    _write_curve(stem.with_name(f"{config.model_name}_curve.svg"), state.history,
                 state.best_epoch, config.loss)
    return save_model(best, stem.with_suffix(".safetensors"), card)


# --------------------------------------------------------------------------- the engine

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MALLOC_KEEP = 1 << 30


def _tune_malloc() -> bool:
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
def _torch_settings(config: TrainConfig, env: _Dist) -> Iterator[None]:
    """Threads and RNG for this run only; the caller's process state is restored after."""
    previous = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if config.tune_malloc and env.device.type == "cpu":
        LOGGER.debug("glibc malloc thresholds raised: %s", _tune_malloc())
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
                init_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
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

    Returns
    -------
    dict
        The model card (on every rank).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if (init_state is None) != (config.init_from_sha256 is None):
        raise ValueError("init_state and config.init_from_sha256 go together")
    train_items, val_items = list(train_items), list(val_items)
    _validate_items(train_items, val_items)
    card_extra = dict(card_extra or {})
    reserved = {"name", "card_version", "created", "architecture", "input", "training",
                "software", "validation", "bias_correction", "file", "sha256"}
    if reserved & set(card_extra):
        raise ValueError(f"card_extra may not set {sorted(reserved & set(card_extra))}")
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    if out_dir.resolve() == work_dir.resolve():
        raise ValueError("out_dir and work_dir must differ (out_dir holds finished models only)")

    env = _setup_distributed(config)
    try:
        with _torch_settings(config, env):
            card = _train(config, env, train_items, val_items, out_dir, work_dir, resume,
                          progress, card_extra, init_state)
        if env.world > 1:
            import torch.distributed as dist

            shared = [card]
            dist.broadcast_object_list(shared, src=0)
            card = shared[0]
        return card
    finally:
        if env.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, env: _Dist, train_items: list[TrainItem],
           val_items: list[TrainItem], out_dir: Path, work_dir: Path, resume: bool,
           progress: bool, card_extra: dict[str, Any],
           init_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
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
                _barrier(env)
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
    _initialise(model, config.init, mean_age)
    if init_state is not None:
        _start_from(model, init_state, config.freeze_trunk)
    model.to(env.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=config.lr, weight_decay=config.weight_decay)
    digests = {"config_digest": _config_digest(config),
               "items_digest": _items_digest(train_items, val_items)}
    ckpt = checkpoint_path(work_dir, config.model_name)
    state = _State()
    if resume and ckpt.is_file():
        state = _load_checkpoint(ckpt, model, optimizer, digests)
        LOGGER.info("resuming %s after epoch %d", config.model_name, state.epoch)
    elif resume:
        LOGGER.info("no checkpoint at %s; starting afresh", ckpt)
    state.finished = _is_finished(state, config)  # epochs or patience may have changed

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
                for step, batch in enumerate(_epoch_batches(config, env, train_cache, ages,
                                                            epoch, augmenter)):
                    LOGGER.debug("epoch %d batch %d/%d", epoch + 1, step + 1, n_batches)
                    batch_sum, batch_n = _train_step(net, optimizer, batch, config, env)
                    loss_sum += torch.tensor([batch_sum, batch_n], dtype=torch.float64)
                    inner.update()
                    inner.set_postfix(loss=f"{batch_sum / max(batch_n, 1.0):.3g}")
            loss_sum = _all_reduce_sum(env, loss_sum)
            val_pred = _predict(model, val_cache, config, env)
            metrics = regression_metrics(val_ages, val_pred)
            state.epoch = epoch + 1
            state.history.append({
                "epoch": state.epoch, "train_loss": float(loss_sum[0] / loss_sum[1]),
                "val_mae": metrics["mae"], "val_rmse": metrics["rmse"], "val_r": metrics["r"],
                "lr": lr, "seconds": round(time.perf_counter() - epoch_start, 3)})
            if metrics["mae"] < state.best_mae:
                state.best_mae, state.best_epoch, state.since_best = metrics["mae"], state.epoch, 0
                state.best_state = _cpu_state(model)
                state.best_val_pred = val_pred.tolist()
            else:
                state.since_best += 1
            state.finished = _is_finished(state, config)
            state.wall_seconds = wall_base + (time.perf_counter() - started)
            if env.main:
                _save_checkpoint(ckpt, state, model, optimizer, digests)
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
        card = _finalise(out_dir, config, env, model, state, train_items, val_items, mean_age,
                         card_extra)
    _barrier(env)
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
        card = train_model(config, train, val, args.out, work_dir=args.work_dir,
                           resume=args.resume, progress=not args.no_progress,
                           card_extra=extra)
    except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: no visible GPU
        LOGGER.error("%s", exc)
        return 1
    if card:
        LOGGER.info("wrote %s (validation MAE %.3f)", card["file"], card["validation"]["mae"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
