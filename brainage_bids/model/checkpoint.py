"""The resumable state of a training run and its checkpoint file.

The checkpoint holds tensors and plain containers only, so that it loads with
``torch.load(weights_only=True)``; it is written atomically after every epoch and a resume
must match its two digests: of the options that change results (:func:`config_digest`) and
of the images (:func:`items_digest`). Its layout is :func:`checkpoint_path`'s docstring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainage_bids.io import atomic_path
from brainage_bids.model.train_config import TrainConfig, TrainItem

CHECKPOINT_FORMAT = "brainage-bids-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_path(work_dir: str | Path, model_name: str) -> Path:
    """Where :func:`~brainage_bids.model.train.train_model` keeps its resumable state.

    The file (``torch.load(path, weights_only=True)``) is a dict: ``format``, ``version``,
    ``config_digest`` and ``items_digest`` (a resume must match both), ``epoch`` (epochs
    completed), ``finished``, ``history`` (the metrics rows), ``best_mae``, ``best_epoch``,
    ``best_val_pred``, ``since_best``, ``wall_seconds``, and the state dicts ``model``,
    ``best_model`` and ``optimizer``.
    """
    return Path(work_dir) / f"{model_name}_checkpoint.pt"


@dataclass
class TrainState:
    """Where a run stands after its last finished epoch (what a resume restores)."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_mae: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_val_pred: list[float] | None = None
    since_best: int = 0
    finished: bool = False
    wall_seconds: float = 0.0


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state on the CPU, safe from later optimiser steps."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def items_digest(train: Sequence[TrainItem], val: Sequence[TrainItem]) -> str:
    """Digest of both splits, in order: a resume must see the same images.

    ``native`` (the grid-jitter inputs of the out-of-fold predictions) is left out: training
    never reads it, and a run started before it existed must still resume.
    """
    def fields(item: TrainItem) -> dict:
        return {k: v for k, v in dataclasses.asdict(item).items() if k != "native"}

    return _digest([[fields(i) for i in train], [fields(i) for i in val]])


#: Options that may differ on resume: they change how a run goes, not what it computes.
RUNTIME_ONLY = ("device", "num_threads", "prefetch", "patience", "model_name", "tune_malloc")


def config_digest(config: TrainConfig) -> str:
    """Digest of the options that change results; the others may differ on resume.

    ``epochs`` may grow on resume (train longer) unless the learning rate depends on it.
    """
    skip = RUNTIME_ONLY + (("epochs",) if config.lr_schedule == "constant" else ())
    return _digest({k: v for k, v in config.to_dict().items() if k not in skip})


def is_finished(state: TrainState, config: TrainConfig) -> bool:
    """All epochs run, or no better validation MAE for ``patience`` epochs."""
    return state.epoch >= config.epochs or (config.patience is not None
                                            and state.since_best >= config.patience)


def save_checkpoint(path: Path, state: TrainState, model: nn.Module,
                    optimizer: torch.optim.Optimizer, digests: dict[str, str]) -> None:
    """Write the state atomically: a kill leaves the previous epoch's checkpoint whole."""
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **digests,
        "epoch": state.epoch, "finished": state.finished, "history": state.history,
        "best_mae": state.best_mae, "best_epoch": state.best_epoch,
        "best_val_pred": state.best_val_pred, "since_best": state.since_best,
        "wall_seconds": state.wall_seconds,
        "model": cpu_state(model), "best_model": state.best_state,
        "optimizer": optimizer.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    digests: dict[str, str]) -> TrainState:
    """Restore ``model`` and ``optimizer`` in place and return the run's state.

    Raises ``ValueError`` for a damaged or foreign file and for digests that do not match.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file must not crash obscurely
        raise ValueError(f"cannot resume from {path}: {exc}") from exc
    if (not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT
            or payload.get("version") != CHECKPOINT_VERSION):
        raise ValueError(f"{path} is not a brainage-bids checkpoint of version "
                         f"{CHECKPOINT_VERSION}; delete it or use another work directory")
    for key, what in (("config_digest", "training options"), ("items_digest", "images")):
        if payload.get(key) != digests[key]:
            raise ValueError(f"cannot resume from {path}: it was made with different {what}; "
                             "rerun with its options, or start afresh (drop --resume) or use "
                             "another work directory")
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        return TrainState(epoch=int(payload["epoch"]), history=payload["history"],
                          best_mae=payload["best_mae"], best_epoch=payload["best_epoch"],
                          best_state=payload["best_model"],
                          best_val_pred=payload["best_val_pred"],
                          since_best=payload["since_best"], finished=payload["finished"],
                          wall_seconds=payload["wall_seconds"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot resume from {path}: it is damaged ({type(exc).__name__}: "
                         f"{exc}); delete it or use another work directory") from exc

