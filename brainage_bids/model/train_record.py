"""What a finished training run leaves behind: its model card, metrics table and curve.

Rank 0 writes them once, after the last epoch, into the output directory: the metrics TSV
(one row per epoch), the curve as SVG, the best epoch's weights and, last, the card (see
:func:`~brainage_bids.model.weights.save_model`), which records the options, the data's age
ranges, the software versions and the validation metrics with their bias correction.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainage_bids import __version__
from brainage_bids.io import atomic_path, atomic_write_text
from brainage_bids.metrics import bias_report
from brainage_bids.model.checkpoint import TrainState
from brainage_bids.model.data import AUGMENTATION
from brainage_bids.model.distributed import DistEnv
from brainage_bids.model.intensity import NORMALISATION
from brainage_bids.model.net import INPUT_SHAPE
from brainage_bids.model.train_config import TrainConfig, TrainItem
from brainage_bids.model.weights import build_model, describe_architecture, save_model

METRIC_COLUMNS = ("epoch", "train_loss", "val_mae", "val_rmse", "val_r", "lr", "seconds")
#: Amends a finished model's card: ``finish(model, card) -> card`` (see write_finished_model).
CardFinish = Callable[[nn.Module, dict[str, Any]], dict[str, Any]]
#: The card's own top-level keys, which ``card_extra`` may not shadow.
RESERVED_CARD_KEYS = frozenset({"name", "card_version", "created", "architecture", "input",
                                "training", "software", "validation", "bias_correction",
                                "file", "sha256"})


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None: strict JSON readers (and BIDS validators) reject ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    return obj


def _tsv_value(column: str, value: float) -> str:
    if column == "epoch":
        return str(int(value))
    return f"{value:.6g}" if math.isfinite(value) else "n/a"


def write_metrics(path: Path, history: Sequence[dict[str, float]]) -> None:
    """One row per epoch (:data:`METRIC_COLUMNS`); a non-finite value is ``n/a``."""
    lines = ["\t".join(METRIC_COLUMNS)]
    lines += ["\t".join(_tsv_value(c, row[c]) for c in METRIC_COLUMNS) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_curve(path: Path, history: Sequence[dict[str, float]], best_epoch: int,
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


def software_versions() -> dict[str, str]:
    """The versions that can change a trained model's numbers."""
    import monai

    return {"brainage_bids": __version__, "torch": torch.__version__,
            "monai": monai.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _age_range(items: Sequence[TrainItem]) -> list[float]:
    ages = [float(i.age) for i in items]
    return [min(ages), max(ages)]


def build_card(config: TrainConfig, env: DistEnv, model: nn.Module, state: TrainState,
               train: Sequence[TrainItem], val: Sequence[TrainItem], mean_age: float,
               card_extra: dict[str, Any]) -> dict[str, Any]:
    """The model card of the best epoch (``model``), JSON-safe; ``file``/``sha256`` come later.

    The validation metrics and the bias correction are both of the best epoch's validation
    predictions, as recorded in ``state``.
    """
    val_age = np.array([float(i.age) for i in val])
    report = bias_report(val_age, np.asarray(state.best_val_pred), errors="record")
    shape = list(config.input_shape)
    standard = tuple(shape) == INPUT_SHAPE
    return json_safe({
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
        "software": software_versions(),
        "validation": {**report["uncorrected"], "at_epoch": state.best_epoch,
                       "corrected": report["corrected"]},
        "bias_correction": {"fitted_on": "validation set, predictions of the best epoch",
                            **report["coefficients"]},
    })


def write_finished_model(out_dir: Path, config: TrainConfig, env: DistEnv, model: nn.Module,
                         state: TrainState, train: Sequence[TrainItem],
                         val: Sequence[TrainItem], mean_age: float,
                         card_extra: dict[str, Any],
                         finish: CardFinish | None = None) -> dict[str, Any]:
    """Write the finished artefacts; the model card goes last (see save_model).

    ``finish`` amends the card of the best epoch's model before anything is written.
    """
    best = build_model(describe_architecture(model))
    best.load_state_dict(state.best_state)
    card = build_card(config, env, best, state, train, val, mean_age, card_extra)
    if finish is not None:
        card = json_safe(finish(best, card))
    stem = out_dir / config.model_name
    write_metrics(stem.with_name(f"{config.model_name}_metrics.tsv"), state.history)
    write_curve(stem.with_name(f"{config.model_name}_curve.svg"), state.history,
                state.best_epoch, config.loss)
    return save_model(best, stem.with_suffix(".safetensors"), card)

