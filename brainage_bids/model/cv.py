"""Ensembles: K-fold cross-validated members and seed members, trained one after another.

Why K-fold: with 150 labelled heads, a single 24-participant validation set gives a noisy
early-stopping signal, noisy bias-correction coefficients and a noisy uncertainty
calibration. A K-fold ensemble uses every training participant once for validation: each
member is early-stopped on its own fold, and the members' predictions on their own folds
(out-of-fold, OOF) are an honest cross-validated estimate for every participant. The OOF
predictions then fit what the card needs (bias correction, the uncertainty scale, whether
test-time flipping helps) without ever touching a test set. Averaging the K members at
prediction time reduces the variance that makes one network's errors heavy-tailed.

Seed ensembles (``seeds_per_fold`` N > 1) train N members per fold with different seeds;
with ``folds`` 1 they share one age-stratified validation split.

Each member is an ordinary :func:`~brainage_bids.model.train.train_model` run with its own
checkpoint, so ``resume`` continues member by member after a kill -9: finished members are
reused (their card must name the same images and options), the interrupted one resumes from
its last epoch, and the rest start afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from brainage_bids.io import atomic_write_text
from brainage_bids.metrics import bias_report
from brainage_bids.model.train import train_model
from brainage_bids.model.train_config import (
    MIN_TRAIN,
    MIN_VAL,
    TrainConfig,
    TrainItem,
    group_items,
    split_stratified,
)
from brainage_bids.model.train_record import json_safe

LOGGER = logging.getLogger(__name__)
#: Columns of ``<name>_oof.tsv`` (one row per image; ``member_predictions`` comma-separated).
OOF_COLUMNS = ("id", "participant_id", "age", "fold", "predicted_age", "error", "mc_sd",
               "member_sd", "predicted_age_no_tta", "member_predictions")


@dataclass(frozen=True)
class MemberPlan:
    """One member: its index, fold (-1 for a seed ensemble on one split), seed and data."""

    index: int
    fold: int
    seed: int
    train: tuple[TrainItem, ...]
    val: tuple[TrainItem, ...]


def split_kfold(items: Sequence[TrainItem], folds: int, seed: int) -> dict[str, int]:
    """Fold of every group (participant): age-stratified, seeded, groups never split.

    Groups are sorted by mean age and cut into consecutive strata of ``folds`` groups; a
    seeded permutation deals each stratum's groups to the folds, so every fold spans the
    age range and fold sizes differ by at most one. Independent of the order of ``items``.
    """
    groups = group_items(items)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if len(groups) < folds * MIN_VAL:
        raise ValueError(f"{folds} folds need at least {folds * MIN_VAL} participants "
                         f"({MIN_VAL} per fold), got {len(groups)}")
    ordered = sorted(groups, key=lambda g: (float(np.mean([i.age for i in groups[g]])), g))
    rng = np.random.default_rng([seed, folds])
    assignment: dict[str, int] = {}
    offset = 0
    for start in range(0, len(ordered), folds):
        stratum = ordered[start:start + folds]
        # rotate the fold order so a short last stratum does not always fill fold 0 first
        deal = (rng.permutation(folds) + offset) % folds
        offset += len(stratum)
        for group, fold in zip(stratum, deal[:len(stratum)], strict=True):
            assignment[group] = int(fold)
    return assignment


def plan_members(items: Sequence[TrainItem], *, folds: int, seeds_per_fold: int, seed: int,
                 val_fraction: float) -> list[MemberPlan]:
    """The members to train: ``folds`` x ``seeds_per_fold`` of them.

    ``folds`` 1 means one age-stratified split (``val_fraction``) shared by all members.
    Member ``i`` gets seed ``seed + i``.
    """
    if seeds_per_fold < 1:
        raise ValueError(f"seeds per fold must be at least 1, got {seeds_per_fold}")
    if folds == 1:
        train, val = split_stratified(items, val_fraction, seed)
        splits = [(-1, train, val)]
    else:
        fold_of = split_kfold(items, folds, seed)
        splits = [(f, [i for i in items if fold_of[i.group or i.id] != f],
                   [i for i in items if fold_of[i.group or i.id] == f]) for f in range(folds)]
    plans = []
    for fold, train, val in splits:
        if len(train) < MIN_TRAIN or len(val) < MIN_VAL:
            raise ValueError(f"fold {fold} has {len(train)} training and {len(val)} "
                             f"validation images; need at least {MIN_TRAIN} and {MIN_VAL}")
        for _ in range(seeds_per_fold):
            index = len(plans)
            plans.append(MemberPlan(index, fold, seed + index, tuple(train), tuple(val)))
    return plans


def member_name(model_name: str, index: int) -> str:
    return f"{model_name}-m{index}"


def _member_card_matches(card: dict[str, Any], plan: MemberPlan, config: TrainConfig) -> bool:
    data = card.get("training_data") or {}
    return (data.get("train_ids") == [i.id for i in plan.train]
            and data.get("validation_ids") == [i.id for i in plan.val]
            and (card.get("training") or {}).get("seed") == plan.seed
            and (card.get("training") or {}).get("config", {}).get("epochs") == config.epochs)


def _train_member(config: TrainConfig, plan: MemberPlan, members_dir: Path, work_dir: Path,
                  resume: bool, progress: bool, card_extra: dict[str, Any],
                  init_state: dict[str, Any] | None,
                  parent_member: int | None) -> dict[str, Any]:
    from brainage_bids.model.weights import read_card

    name = member_name(config.model_name, plan.index)
    card_path = members_dir / f"{name}.json"
    if resume and card_path.is_file():
        card = read_card(card_path)
        if _member_card_matches(card, plan, config):
            LOGGER.info("member %d (fold %d) is finished; reusing %s", plan.index, plan.fold,
                        card_path)
            return card
        LOGGER.info("member %d: %s was trained on other images or options; training it "
                    "again", plan.index, card_path.name)
    extra = dict(card_extra)
    extra["training_data"] = {**dict(card_extra.get("training_data") or {}),
                              "train_ids": [i.id for i in plan.train],
                              "validation_ids": [i.id for i in plan.val]}
    extra["ensemble_member"] = {"index": plan.index, "fold": plan.fold, "seed": plan.seed}
    if "lineage" in card_extra and init_state is not None:
        extra["lineage"] = {**card_extra["lineage"], "parent_member": parent_member}
    member_config = dataclasses.replace(config, model_name=name, seed=plan.seed)
    LOGGER.info("training member %d (fold %d, seed %d): %d training, %d validation images",
                plan.index, plan.fold, plan.seed, len(plan.train), len(plan.val))
    return train_model(member_config, plan.train, plan.val, members_dir,
                       work_dir=work_dir / name, resume=resume, progress=progress,
                       card_extra=extra, init_state=init_state)


def _held_out_predictions(plans: Sequence[MemberPlan], members: Sequence[Any],
                          config: TrainConfig, mc_samples: int) -> dict[str, dict[str, Any]]:
    """Each image's prediction by the members that never trained on it (its fold's)."""
    import torch

    from brainage_bids.model.data import read_volume
    from brainage_bids.model.ensemble import BrainAgeEnsemble
    from brainage_bids.model.jitter import DEFAULT_GRID_JITTER, jitter_views
    from brainage_bids.model.predict import predict_brain_age
    from brainage_bids.templates import GRID_SHAPE

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
                # the card's OOF metrics and fits, and the float32 NIfTI is what the
                # participant level reads. One read is cheap next to the MC-dropout and
                # flip passes of every member of the fold that follow.
                volume = read_volume(item.image, item.mask, config.input_shape)
                views = {tta: predict_brain_age(fold_model, volume, mc_samples=mc_samples,
                                                seed=config.seed, flip_tta=tta)
                         for tta in (False, True)}
                rows[item.id] = {"item": item, "fold": fold, **{
                    ("tta" if tta else "plain"): pred for tta, pred in views.items()}}
                # grid jitter, with and without the flip, where the views fit the model input
                if item.native is not None and tuple(config.input_shape) == GRID_SHAPE:
                    grid = jitter_views(*item.native, DEFAULT_GRID_JITTER)
                    for tta in (False, True):
                        rows[item.id][f"{'tta' if tta else 'plain'}_jitter"] = predict_brain_age(
                            fold_model, volume, mc_samples=mc_samples, seed=config.seed,
                            flip_tta=tta, views=grid)
    finally:
        torch.set_num_threads(previous)
    return rows


def _oof_table(rows: dict[str, dict[str, Any]], flip_tta: bool, grid_jitter: bool) -> str:
    lines = ["\t".join(OOF_COLUMNS)]
    suffix = "_jitter" if grid_jitter else ""
    for row in rows.values():
        item, pred = row["item"], row[("tta" if flip_tta else "plain") + suffix]
        values = [item.id, item.group or item.id, f"{float(item.age):.2f}", str(row["fold"]),
                  f"{pred['predicted_age']:.3f}", f"{pred['predicted_age'] - item.age:.3f}",
                  f"{pred['mc_sd']:.3f}", f"{pred['member_sd']:.3f}",
                  f"{row['plain' + suffix]['predicted_age']:.3f}",
                  ",".join(f"{p:.3f}" for p in pred["member_predictions"])]
        lines.append("\t".join(values))
    return "\n".join(lines) + "\n"


def _oof_summary(rows: dict[str, dict[str, Any]], seeds_per_fold: int) -> dict[str, Any]:
    """Metrics with and without flip TTA, the choice, bias and uncertainty fits (all OOF).

    The flip is kept when it lowers the out-of-fold MAE. Grid jitter is on whenever every
    image had its native outputs: it is there for invariance to how a head is stored (the
    same head must get the same age), not for accuracy; both MAEs go in the card.
    """
    from brainage_bids.model.jitter import DEFAULT_GRID_JITTER
    from brainage_bids.model.uncertainty import coverage, fit_scale

    ages = np.array([float(r["item"].age) for r in rows.values()])
    grid_jitter = all("plain_jitter" in r for r in rows.values())
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
    uncertainty: dict[str, Any] = {
        "method": "ensemble+mc-dropout", "calibration_scale": scale, "scaled": scaled,
        "fitted_on": "out-of-fold predictions (each image by the members of its own fold)",
        "formula": ("sd = sqrt((k * mc_sd)^2 + member_sd^2)" if scaled == "mc_sd"
                    else "sd = k * sqrt(mc_sd^2 + member_sd^2)"),
        "raw_coverage_oof": coverage(errors, spreads),
        "calibrated_coverage_oof": (coverage(errors, scale * spreads) if scale else None),
        "note": ("the scale is fitted on the same out-of-fold predictions its coverage is "
                 "reported on; held-out coverage is in the evaluation"),
    }
    jitter = None
    if grid_jitter:
        jitter = {**DEFAULT_GRID_JITTER,
                  "chosen_by": ("on whenever every image has its native outputs: for "
                                "invariance to how a head is stored, not for accuracy"),
                  "oof_mae_without": results[unjittered]["uncorrected"]["mae"],
                  "oof_mae_with": results[key]["uncorrected"]["mae"]}
    return {"flip_tta": bool(flip_tta), "report": results[key],
            "mae_without_tta": results["plain"]["uncorrected"]["mae"],
            "mae_with_tta": results["tta"]["uncorrected"]["mae"],
            "grid_jitter": jitter, "uncertainty": uncertainty}


def train_ensemble(config: TrainConfig, items: Sequence[TrainItem], out_dir: str | Path, *,
                   work_dir: str | Path, folds: int = 5, seeds_per_fold: int = 1,
                   resume: bool = False, progress: bool = True,
                   card_extra: dict[str, Any] | None = None,
                   mc_samples: int = 20,
                   init_states: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train every member, then write the ensemble, its card and the OOF table to ``out_dir``.

    ``out_dir`` receives ``<name>.safetensors`` (all members, one sha256), ``<name>.json``
    (the card, written last), ``<name>_oof.tsv`` and each member's metrics and curve. The
    members' own files and checkpoints stay in ``work_dir``.

    ``init_states`` (fine-tuning) gives member ``i`` the parent state ``i`` modulo their
    number: an ensemble parent's members each seed one new member, a single parent all.

    Returns the ensemble's card (an empty dict on DDP ranks other than 0).
    """
    from brainage_bids.model.ensemble import BrainAgeEnsemble
    from brainage_bids.model.weights import load_model, save_model

    out_dir, work_dir = Path(out_dir), Path(work_dir)
    card_extra = dict(card_extra or {})
    plans = plan_members(items, folds=folds, seeds_per_fold=seeds_per_fold, seed=config.seed,
                         val_fraction=config.val_fraction)
    members_dir = work_dir / "members"
    member_cards = []
    for plan in plans:
        parent = plan.index % len(init_states) if init_states else None
        member_cards.append(_train_member(
            config, plan, members_dir, work_dir, resume, progress, card_extra,
            init_states[parent] if parent is not None else None, parent))
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    members = [load_model(members_dir / f"{member_name(config.model_name, p.index)}.json")[0]
               for p in plans]
    LOGGER.info("predicting the held-out fold of each member")
    rows = _held_out_predictions(plans, members, config, mc_samples)
    summary = _oof_summary(rows, seeds_per_fold)
    out_dir.mkdir(parents=True, exist_ok=True)
    oof_file = out_dir / f"{config.model_name}_oof.tsv"
    atomic_write_text(oof_file, _oof_table(rows, summary["flip_tta"],
                                           summary["grid_jitter"] is not None))
    for card in member_cards:
        for suffix in ("_metrics.tsv", "_curve.svg"):
            source = members_dir / f"{card['name']}{suffix}"
            if source.is_file():
                shutil.copyfile(source, out_dir / source.name)
    card = _ensemble_card(config, plans, member_cards, summary, card_extra, folds,
                          seeds_per_fold, oof_file.name)
    ensemble = BrainAgeEnsemble(members)
    return save_model(ensemble, out_dir / f"{config.model_name}.safetensors", card)


def _ensemble_card(config: TrainConfig, plans: Sequence[MemberPlan],
                   member_cards: Sequence[dict[str, Any]], summary: dict[str, Any],
                   card_extra: dict[str, Any], folds: int, seeds_per_fold: int,
                   oof_file: str) -> dict[str, Any]:
    first = member_cards[0]
    all_items = {i.id: i for p in plans for i in (*p.train, *p.val)}
    ages = [float(i.age) for i in all_items.values()]
    shared = {k: v for k, v in first["training"].items()
              if k not in ("n_train", "n_val", "age_range_train", "age_range_val",
                           "epochs_run", "best_epoch", "stopped_early", "seed",
                           "wall_time_s", "output_bias_init", "device", "world_size")}
    report = summary["report"]
    data = dict(card_extra.get("training_data") or {})
    if folds > 1:
        data["train_ids"] = sorted(all_items)
        data["validation_ids"] = []
        data["note"] = ("every image is in the training set of some members and in the "
                        "validation fold of the others; see ensemble.members")
    else:
        data["train_ids"] = [i.id for i in plans[0].train]
        data["validation_ids"] = [i.id for i in plans[0].val]
    members = [{
        "index": plan.index, "fold": plan.fold, "seed": plan.seed,
        "best_epoch": card["training"]["best_epoch"],
        "epochs_run": card["training"]["epochs_run"],
        "stopped_early": card["training"]["stopped_early"],
        "validation_mae": card["validation"]["mae"],
        "n_train": card["training"]["n_train"], "n_val": card["training"]["n_val"],
        "validation_ids": [i.id for i in plan.val],
        "wall_time_s": card["training"]["wall_time_s"],
        "device": card["training"].get("device"),
        "sha256": card["sha256"],
    } for plan, card in zip(plans, member_cards, strict=True)]
    validation = {**report["uncorrected"],
                  "kind": "out-of-fold" if folds > 1 else "validation split",
                  "corrected": report["corrected"], "file": oof_file,
                  "mae_without_flip_tta": summary["mae_without_tta"],
                  "mae_with_flip_tta": summary["mae_with_tta"]}
    if summary["grid_jitter"]:
        validation["mae_without_grid_jitter"] = summary["grid_jitter"]["oof_mae_without"]
    extra = {k: v for k, v in card_extra.items() if k != "training_data"}
    return json_safe({
        "name": config.model_name, "card_version": 2,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": first["input"],
        "training_data": data, **extra,
        "training": {**shared,
                     "n_train": len(all_items) if folds > 1 else len(plans[0].train),
                     "n_val": 0 if folds > 1 else len(plans[0].val),
                     "age_range": [min(ages), max(ages)], "folds": folds,
                     "seeds_per_fold": seeds_per_fold,
                     "wall_time_s": round(sum(m["wall_time_s"] for m in members), 3)},
        "ensemble": {"n_members": len(plans), "folds": folds,
                     "seeds_per_fold": seeds_per_fold,
                     "combine": "mean of the members' deterministic predictions",
                     "members": members},
        "software": first["software"],
        "validation": validation,
        "cross_validation": validation,
        "bias_correction": {"fitted_on": "out-of-fold predictions", **report["coefficients"]},
        "uncertainty": summary["uncertainty"],
        "inference": {"flip_tta": summary["flip_tta"],
                      "flip_tta_chosen_by": "out-of-fold MAE with and without the flip",
                      **({"grid_jitter": summary["grid_jitter"]}
                         if summary["grid_jitter"] else {})},
    })
