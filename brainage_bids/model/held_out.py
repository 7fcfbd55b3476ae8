"""Predictions on images a model never trained on, and what its card fits on them.

A cross-validated ensemble's out-of-fold predictions (:mod:`brainage_bids.model.cv`) and a
single model's validation split are both held out. On them the card

- chooses the test-time views: the left-right flip when it lowers the held-out MAE, and grid
  jitter (:mod:`brainage_bids.model.jitter`) whenever every image has its native outputs,
  for invariance to how a head is stored rather than for accuracy;
- fits the bias correction on the predictions as the participant level will make them (with
  those views);
- calibrates the uncertainty (:mod:`brainage_bids.model.uncertainty`).

Never on a test set. A single model's validation split also chose its best epoch, so its
fits are slightly optimistic; an ensemble's out-of-fold predictions are not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainage_bids.metrics import bias_report
from brainage_bids.model.train_config import TrainConfig, TrainItem

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberPlan:
    """One member: its index, fold (-1 for a seed ensemble on one split), seed and data."""

    index: int
    fold: int
    seed: int
    train: tuple[TrainItem, ...]
    val: tuple[TrainItem, ...]


@dataclass(frozen=True)
class HeldOut:
    """Which held-out predictions a card's fits come from, in the card's words."""

    kind: str  #: the card's ``validation.kind``
    predictions: str  #: what the fits' ``fitted_on`` names ...
    detail: str  #: ... and adds in brackets
    chooser: str  #: whose MAE chose the flip
    prefix: str  #: of the grid-jitter MAEs in ``inference.grid_jitter``

    def fitted_on(self, grid_jitter: bool) -> str:
        jitter = " with grid jitter" if grid_jitter else ""
        return f"{self.predictions}{jitter} ({self.detail})"


OUT_OF_FOLD = HeldOut("out-of-fold", "out-of-fold predictions",
                      "each image by the members of its own fold", "out-of-fold", "oof")
VALIDATION = HeldOut("validation split", "validation-split predictions",
                     "the images that also chose the best epoch", "validation", "validation")


def check_mc_samples(mc_samples: int) -> None:
    """Refuse an impossible sample count before any training, not after it."""
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")


def held_out_predictions(plans: Sequence[MemberPlan], members: Sequence[Any],
                         config: TrainConfig, mc_samples: int) -> dict[str, dict[str, Any]]:
    """Each held-out image's prediction by the members that never trained on it (its fold's),
    with and without the flip (``plain``, ``tta``) and, where the image has its native
    outputs and the model the template grid, with grid jitter (``*_jitter``).

    On the training device (``config.device``); the members are left on the CPU. The
    callers check ``mc_samples`` (:func:`check_mc_samples`) before they train.
    """
    import torch

    from brainage_bids.model.data import read_volume
    from brainage_bids.model.ensemble import BrainAgeEnsemble
    from brainage_bids.model.jitter import DEFAULT_GRID_JITTER, jitter_views
    from brainage_bids.model.predict import predict_brain_age, resolve_device
    from brainage_bids.templates import GRID_SHAPE

    device = resolve_device(config.device)

    by_fold: dict[int, list[int]] = {}
    for plan in plans:
        by_fold.setdefault(plan.fold, []).append(plan.index)
    rows: dict[str, dict[str, Any]] = {}
    previous = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        for fold, indices in by_fold.items():
            fold_model = BrainAgeEnsemble([members[i] for i in indices])
            for item in plans[indices[0]].val:
                # From the NIfTI, not the members' volume cache: that cache is float16 by
                # default (cache_dtype), which moves these predictions by ~1e-5 years and so
                # the card's metrics and fits, and the float32 NIfTI is what the
                # participant level reads. One read is cheap next to the MC-dropout and
                # flip passes of every member of the fold that follow.
                volume = read_volume(item.image, item.mask, config.input_shape)
                views = {tta: predict_brain_age(fold_model, volume, mc_samples=mc_samples,
                                                seed=config.seed, flip_tta=tta, device=device)
                         for tta in (False, True)}
                rows[item.id] = {"item": item, "fold": fold, **{
                    ("tta" if tta else "plain"): pred for tta, pred in views.items()}}
                # grid jitter, with and without the flip, where the views fit the model input
                if item.native is not None and tuple(config.input_shape) == GRID_SHAPE:
                    grid = jitter_views(*item.native, DEFAULT_GRID_JITTER)
                    for tta in (False, True):
                        rows[item.id][f"{'tta' if tta else 'plain'}_jitter"] = predict_brain_age(
                            fold_model, volume, mc_samples=mc_samples, seed=config.seed,
                            flip_tta=tta, views=grid, device=device)
    finally:
        torch.set_num_threads(previous)
        for member in members:  # as they came: on the CPU, in the default memory format
            member.to(device="cpu", memory_format=torch.contiguous_format)
    return rows


def summarise(rows: dict[str, dict[str, Any]], *, seeds_per_fold: int, held_out: HeldOut,
              n_members: int) -> dict[str, Any]:
    """Metrics with and without the flip and grid jitter, the choices, the bias and the
    uncertainty fits, all on the held-out ``rows`` of :func:`held_out_predictions`.

    ``n_members`` 1 (a single model) makes the uncertainty plain MC dropout.
    """
    from brainage_bids.model.jitter import DEFAULT_GRID_JITTER
    from brainage_bids.model.uncertainty import coverage, fit_scale

    ages = np.array([float(r["item"].age) for r in rows.values()])
    without = sorted(i for i, r in rows.items() if "plain_jitter" not in r)
    grid_jitter = not without
    no_native = [i for i in without if rows[i]["item"].native is None]
    if no_native:
        LOGGER.warning("grid jitter stays off for this model: %d of %d held-out image(s) lack "
                       "their native-space brain and transform (e.g. %s: derivatives of an "
                       "older version); rerun the participant level on them to add these "
                       "outputs", len(no_native), len(rows), no_native[0])
    elif without:
        LOGGER.info("grid jitter stays off for this model: its input is not the 2 mm "
                    "template grid that the jitter resamples onto")
    keys = ("plain", "tta", "plain_jitter", "tta_jitter") if grid_jitter else ("plain", "tta")
    results = {}
    for key in keys:
        pred = np.array([r[key]["predicted_age"] for r in rows.values()])
        results[key] = bias_report(ages, pred, errors="record")
    flip_tta = results["tta"]["uncorrected"]["mae"] < results["plain"]["uncorrected"]["mae"]
    unjittered = "tta" if flip_tta else "plain"
    key = f"{unjittered}_jitter" if grid_jitter else unjittered
    chosen = [r[key] for r in rows.values()]
    errors = np.array([p["predicted_age"] for p in chosen]) - ages
    scaled = "raw_sd" if seeds_per_fold > 1 else "mc_sd"
    spreads = np.array([p["raw_sd"] if scaled == "raw_sd" else p["mc_sd"] for p in chosen])
    scale = fit_scale(errors, spreads)
    fitted_on = held_out.fitted_on(grid_jitter)
    if n_members > 1:
        method, formula = "ensemble+mc-dropout", (
            "sd = sqrt((k * mc_sd)^2 + member_sd^2)" if scaled == "mc_sd"
            else "sd = k * sqrt(mc_sd^2 + member_sd^2)")
    elif np.any(spreads > 0):
        method, formula = "mc-dropout", "sd = k * mc_sd"
    else:  # no dropout: no spread to calibrate, as predict_brain_age records it
        method, formula = "none", None
    uncertainty: dict[str, Any] = {
        "method": method, "calibration_scale": scale, "scaled": scaled,
        "fitted_on": fitted_on, "formula": formula,
        "raw_coverage_oof": coverage(errors, spreads),
        "calibrated_coverage_oof": (coverage(errors, scale * spreads) if scale else None),
        "note": ("the scale is fitted on the same held-out predictions its coverage is "
                 "reported on; coverage on a test set is in the evaluation"),
    }
    jitter = None
    if grid_jitter:
        jitter = {**DEFAULT_GRID_JITTER,
                  "chosen_by": ("on whenever every image has its native outputs: for "
                                "invariance to how a head is stored, not for accuracy"),
                  f"{held_out.prefix}_mae_without": results[unjittered]["uncorrected"]["mae"],
                  f"{held_out.prefix}_mae_with": results[key]["uncorrected"]["mae"]}
    return {"flip_tta": bool(flip_tta), "report": results[key], "held_out": held_out,
            "fitted_on": fitted_on,
            "mae_without_tta": results["plain"]["uncorrected"]["mae"],
            "mae_with_tta": results["tta"]["uncorrected"]["mae"],
            "grid_jitter": jitter, "uncertainty": uncertainty}


def card_entries(summary: dict[str, Any]) -> dict[str, Any]:
    """The card's ``validation``, ``bias_correction``, ``uncertainty`` and ``inference``
    from a :func:`summarise` result."""
    held_out: HeldOut = summary["held_out"]
    report = summary["report"]
    validation = {**report["uncorrected"], "kind": held_out.kind,
                  "corrected": report["corrected"],
                  "mae_without_flip_tta": summary["mae_without_tta"],
                  "mae_with_flip_tta": summary["mae_with_tta"]}
    if summary["grid_jitter"]:
        validation["mae_without_grid_jitter"] = (
            summary["grid_jitter"][f"{held_out.prefix}_mae_without"])
    return {
        "validation": validation,
        "bias_correction": {"fitted_on": summary["fitted_on"], **report["coefficients"]},
        "uncertainty": summary["uncertainty"],
        "inference": {"flip_tta": summary["flip_tta"],
                      "flip_tta_chosen_by": f"{held_out.chooser} MAE with and without "
                                            "the flip",
                      **({"grid_jitter": summary["grid_jitter"]}
                         if summary["grid_jitter"] else {})},
    }


def validation_fits(config: TrainConfig, val_items: Sequence[TrainItem],
                    mc_samples: int) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
    """For :func:`~brainage_bids.model.train.train_model`'s ``finish``: a single model's card
    gets its test-time views, bias correction and uncertainty scale from its validation
    split, predicted the way the participant level will predict.

    The card's ``validation`` then describes those predictions; the best epoch's own
    validation MAE (no views, the cached inputs) stays as ``mae_during_training``.
    """
    check_mc_samples(mc_samples)

    def finish(model: Any, card: dict[str, Any]) -> dict[str, Any]:
        LOGGER.info("predicting the %d validation image(s) as the participant level will "
                    "(flip, grid jitter, %d Monte-Carlo dropout samples) to fit the card's "
                    "bias correction and uncertainty scale", len(val_items), mc_samples)
        plan = MemberPlan(index=0, fold=0, seed=config.seed, train=(), val=tuple(val_items))
        rows = held_out_predictions([plan], [model], config, mc_samples)
        summary = summarise(rows, seeds_per_fold=1, held_out=VALIDATION, n_members=1)
        entries = card_entries(summary)
        previous = card.get("validation") or {}
        entries["validation"] = {**entries["validation"],
                                 "at_epoch": previous.get("at_epoch"),
                                 "mae_during_training": previous.get("mae")}
        entries["uncertainty"]["samples"] = mc_samples
        return {**card, **entries}

    return finish
