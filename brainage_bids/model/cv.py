"""Ensembles: K-fold cross-validated members and seed members, trained one after another.

Why K-fold: with 150 labelled heads, a single 24-participant validation set gives a noisy
early-stopping signal, noisy bias-correction coefficients and a noisy uncertainty
calibration. A K-fold ensemble uses every training participant once for validation: each
member is early-stopped on its own fold, and the members' predictions on their own folds
(out-of-fold, OOF) are an honest cross-validated estimate for every participant. The OOF
predictions then fit what the card needs (bias correction, the uncertainty scale, the
test-time views; :mod:`brainage_bids.model.held_out`) without ever touching a test set.
Averaging the K members at prediction time reduces the variance that makes one network's
errors heavy-tailed.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from brainage_bids.io import atomic_write_text
from brainage_bids.model.held_out import (
    OUT_OF_FOLD,
    VALIDATION,
    MemberPlan,
    card_entries,
    check_mc_samples,
    held_out_predictions,
    summarise,
)
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


def _member_card_matches(card: dict[str, Any], plan: MemberPlan, config: TrainConfig,
                         card_path: Path) -> bool:
    """Whether a finished member is this plan's member, to be reused as it is.

    ``False`` when only the number of epochs differs: the member's checkpoint then resumes
    (and trains longer). A member trained on other images or with options that change
    results is a :class:`ValueError`: reusing it would mix members of two recipes in one
    ensemble, and training it again silently would throw away hours.
    """
    from brainage_bids.model.checkpoint import RUNTIME_ONLY

    data = card.get("training_data") or {}
    if (data.get("train_ids") != [i.id for i in plan.train]
            or data.get("validation_ids") != [i.id for i in plan.val]):
        raise ValueError(f"cannot resume: {card_path} is member {plan.index} of an ensemble "
                         "trained on other participants or folds; rerun with the same images, "
                         "--folds and --seed, or use another work directory (-w)")
    saved = (card.get("training") or {}).get("config") or {}
    wanted = dataclasses.replace(config, seed=plan.seed).to_dict()
    changed = [f"{key} {saved.get(key)!r} -> {wanted[key]!r}" for key in wanted
               if key not in (*RUNTIME_ONLY, "epochs") and key in saved
               and saved[key] != wanted[key]]
    if changed:
        raise ValueError(f"cannot resume: {card_path} (member {plan.index}) was trained with "
                         f"other options ({', '.join(changed)}); rerun with its options, or "
                         "use another work directory (-w) to start afresh")
    return saved.get("epochs") == config.epochs


def _train_member(config: TrainConfig, plan: MemberPlan, members_dir: Path, work_dir: Path,
                  resume: bool, progress: bool, card_extra: dict[str, Any],
                  init_state: dict[str, Any] | None,
                  parent_member: int | None) -> dict[str, Any]:
    from brainage_bids.model.weights import read_card

    name = member_name(config.model_name, plan.index)
    card_path = members_dir / f"{name}.json"
    if resume and card_path.is_file():
        card = read_card(card_path)
        if _member_card_matches(card, plan, config, card_path):
            LOGGER.info("member %d (fold %d) is finished; reusing %s", plan.index, plan.fold,
                        card_path)
            return card
        LOGGER.info("member %d: %s ran another number of epochs; resuming it from its "
                    "checkpoint", plan.index, card_path.name)
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

    check_mc_samples(mc_samples)
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
    rows = held_out_predictions(plans, members, config, mc_samples)
    summary = summarise(rows, seeds_per_fold=seeds_per_fold,
                        held_out=OUT_OF_FOLD if folds > 1 else VALIDATION,
                        n_members=len(plans))
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
    entries = card_entries(summary)
    validation = {**entries["validation"], "file": oof_file}
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
        **entries,
        "validation": validation,
        "cross_validation": validation,
    })
