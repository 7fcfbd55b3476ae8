"""One optimisation step and what it needs: the initial weights, the loss, an epoch's batches.

The pieces :mod:`brainage_bids.model.train` runs epoch after epoch (and that
``benchmarks/train_throughput.py`` times one by one). Each is deterministic given the
config's seed and the epoch: the shuffle is ``numpy.random.default_rng([seed, epoch])`` and
each sample's augmentation a function of ``(seed, epoch, index)``
(:class:`~brainage_bids.model.data.Augmenter`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainage_bids.model.data import Augmenter, VolumeCache
from brainage_bids.model.distributed import DistEnv, all_reduce_sum, shard
from brainage_bids.model.train_config import TrainConfig


def initialise_weights(model: nn.Module, scheme: str, mean_age: float) -> None:
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


def start_from(model: nn.Module, state: dict[str, torch.Tensor], freeze_trunk: bool) -> None:
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


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor
    n_global: int


def epoch_batches(config: TrainConfig, env: DistEnv, cache: VolumeCache, ages: np.ndarray,
                   epoch: int, augmenter: Augmenter | None) -> Iterator[Batch]:
    """Yield this rank's training batches of ``epoch``, prepared one ahead in a thread.

    The thread overlaps reading and augmenting the next batch with the current step, and
    results do not depend on it. (A measured side effect on busy CPUs: with a second thread
    running OpenMP work, libgomp shortens its workers' spin-waiting, which otherwise burns
    the cores that other processes need, and steps get faster.)
    """
    order = np.random.default_rng([config.seed, epoch]).permutation(len(cache))
    globals_ = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]

    def prepare(batch: np.ndarray) -> Batch:
        share, weight = shard(batch, env)
        volumes = []
        for index in share:
            volume = cache.volume(int(index))
            if augmenter is not None:  # on the training device (see Augmenter)
                volume = augmenter(volume.to(env.device), config.seed, epoch, int(index))
            volumes.append(volume)
        return Batch(torch.stack(volumes), torch.from_numpy(ages[share]).float()[:, None],
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


def _to_device(x: torch.Tensor, env: DistEnv, channels_last: bool) -> torch.Tensor:
    x = x.to(env.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def _autocast(config: TrainConfig, env: DistEnv) -> contextlib.AbstractContextManager[Any]:
    if config.precision == "bf16":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                config: TrainConfig, env: DistEnv) -> tuple[float, float]:
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
def predict_cache(model: nn.Module, cache: VolumeCache, config: TrainConfig,
             env: DistEnv) -> np.ndarray:
    """Predictions for every cached volume; ranks split the work and sum their shares."""
    model.eval()
    preds = torch.zeros(len(cache), dtype=torch.float64)
    mine = np.arange(env.rank, len(cache), env.world)
    for start in range(0, len(mine), config.batch_size):
        chunk = mine[start:start + config.batch_size]
        with _autocast(config, env):
            out = model(_to_device(cache.batch(chunk), env, config.channels_last))
        preds[torch.from_numpy(chunk)] = out.float().squeeze(1).double().cpu()
    return all_reduce_sum(env, preds).numpy()
