"""The train level's BIDS side: ages, reused preprocessing, subject-level split.

The training itself is :func:`brainage_bids.model.train.train_model`, which knows nothing of
BIDS; this module turns a dataset into its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brainage_bids.bids import T1wImage
from brainage_bids.config import Settings, with_threads
from brainage_bids.derivatives import derivative_path, native_outputs, transform_backend
from brainage_bids.templates import TEMPLATE

if TYPE_CHECKING:  # the model package imports torch; the train level imports it when training
    from brainage_bids.model.train_config import TrainItem

LOG = logging.getLogger(__name__)
PREPROC = {"suffix": "T1w", "extension": ".nii.gz", "space": TEMPLATE, "res": "2",
           "desc": "preproc"}
MASK = {"suffix": "mask", "extension": ".nii.gz", "space": TEMPLATE, "res": "2",
        "desc": "brain"}


class TrainDataError(ValueError):
    """The dataset cannot train a model (no ages, too few usable images)."""


def preprocessed_paths(output_dir: Path, image: T1wImage) -> tuple[Path, Path]:
    """Where the participant level writes this image's model input and its mask."""
    return (derivative_path(output_dir, image.entities, **PREPROC),
            derivative_path(output_dir, image.entities, **MASK))


def _dataset_name(bids_dir: Path) -> str:
    try:
        return str(json.loads((bids_dir / "dataset_description.json").read_text())["Name"])
    except (OSError, KeyError, json.JSONDecodeError):
        return bids_dir.name


def default_model_name(bids_dir: Path) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", bids_dir.name).strip("-").lower() or "cohort"
    return f"brainage-{slug}"


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _wait_for(paths: list[Path], timeout_s: float = 24 * 3600) -> None:
    """Non-zero DDP ranks wait for rank 0 to finish preprocessing."""
    deadline = time.time() + timeout_s
    while not all(p.is_file() for p in paths):
        if time.time() > deadline:
            raise TrainDataError("timed out waiting for rank 0 to preprocess the images")
        time.sleep(5)


def _parent_backend(settings: Settings) -> str | None:
    """The backend that made a fine-tuning parent's inputs (its card), else ``None``."""
    if not settings.init_from:
        return None
    from brainage_bids.model.weights import read_card, resolve_model

    card = read_card(resolve_model(settings.init_from)[0])
    return (card.get("preprocessing") or {}).get("backend")


def ensure_preprocessed(settings: Settings, images: list[T1wImage],
                        execute: Callable) -> tuple[list[T1wImage], dict[str, str]]:
    """Run participant-level preprocessing where its outputs are missing.

    ``execute(settings, images, workflow_args)`` runs the images' preprocessing-only
    workflows and returns ``{image node name: error}`` of the failures
    (:func:`brainage_bids.cohort.preprocess_cohort`). Returns the images that have both
    outputs, and ``{image: error}`` for those that failed.
    """
    from brainage_bids.validation import screen_images
    from brainage_bids.workflows.preproc import backend_mismatch, resolve_backend

    todo = [im for im in images
            if not all(p.is_file() for p in preprocessed_paths(settings.output_dir, im))]
    missing, rejected = screen_images(todo)  # a FIFO or a dangling link fails alone
    failures: dict[str, str] = {image.name: reason for image, reason in rejected}
    if missing and _is_main_rank():
        settings = with_threads(settings, len(missing))  # callers may not have decided them
        backend = resolve_backend(settings.preproc)
        if warning := backend_mismatch(backend, _parent_backend(settings),
                                       f"the parent model {settings.init_from}"):
            LOG.warning("%s", warning)
        LOG.info("preprocessing %d image(s) with the %s backend (%d already done)",
                 len(missing), backend, len(images) - len(todo))
        failed = execute(settings, missing, dict(
            bids_dir=settings.bids_dir, output_dir=settings.output_dir, backend=backend,
            omp_nthreads=settings.omp_nthreads, model=None))
        failures.update({im.name: failed[im.node_name] for im in missing
                         if im.node_name in failed})
        if failed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # the other ranks wait for every image's outputs: they would wait for a failed
            # one until their timeout. Stopping here ends the whole torchrun job at once.
            name, error = next(iter(failures.items()))
            raise TrainDataError(
                f"{len(failed)} image(s) failed preprocessing (e.g. {name}: {error}); under "
                "torchrun every process must train on the same images: fix them or leave "
                "them out (--participant-label), or preprocess first without torchrun")
    elif missing:
        _wait_for([p for im in missing for p in preprocessed_paths(settings.output_dir, im)])
    done = [im for im in images
            if all(p.is_file() for p in preprocessed_paths(settings.output_dir, im))]
    for image in images:
        if image not in done and image.name not in failures:
            failures[image.name] = "preprocessing produced no output"
    return done, failures


def train_from_bids(settings: Settings, images: list[T1wImage], *, execute: Callable) -> dict:
    """Preprocess where needed, then train; returns the model card."""
    from brainage_bids.model.train import train_model
    from brainage_bids.model.train_config import (
        MIN_TRAIN,
        MIN_VAL,
        TrainConfig,
        TrainItem,
        split_stratified,
    )

    bad_ages = [im for im in images if im.age_problem]
    if bad_ages:  # training on a silently shorter cohort would hide a typo in the ages
        for image in bad_ages if len(bad_ages) > 1 else ():  # the error line names one
            LOG.error("%s: %s", image.name, image.age_problem)
        first = bad_ages[0]
        more = f" (and {len(bad_ages) - 1} more)" if len(bad_ages) > 1 else ""
        raise TrainDataError(
            f"{first.name}: {first.age_problem}{more}; the train level needs a valid age for "
            "every selected participant: fix it, write n/a (unknown: the image is left "
            "out), or leave the participant out with --participant-label")
    labelled = [im for im in images if im.age is not None]
    unlabelled = [im.name for im in images if im.age is None]
    if not labelled:
        raise TrainDataError(
            f"no selected image has an age: {settings.bids_dir / 'participants.tsv'} needs an "
            "'age' column with numbers (or sessions.tsv for ages per session)")
    if unlabelled:
        LOG.warning("skipping %d image(s) without an age: %s", len(unlabelled),
                    ", ".join(unlabelled))
    needed = MIN_TRAIN + MIN_VAL
    if len({im.subject for im in labelled}) < needed:
        raise TrainDataError(
            f"only {len({im.subject for im in labelled})} participant(s) with an age; "
            f"training needs at least {needed} ({MIN_TRAIN} to train, {MIN_VAL} to validate)")
    name = settings.model_name or default_model_name(settings.bids_dir)
    config = TrainConfig(
        epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
        loss=settings.loss, attention=settings.attention, seed=settings.seed,
        device=settings.device, patience=settings.patience, augment=settings.augment,
        dropout=settings.dropout,
        # one training process: it gets every CPU the run was given, not one worker's share
        num_threads=settings.nprocs, val_fraction=settings.val_fraction,
        model_name=name)  # its checks, and the splits', before hours of preprocessing
    _check_splits(settings, [TrainItem(id=im.name, image="", mask="", age=float(im.age),
                                       group=im.subject) for im in labelled])
    usable, failures = ensure_preprocessed(settings, labelled, execute)
    if failures:
        LOG.warning("skipping %d image(s) whose preprocessing failed: %s", len(failures),
                    "; ".join(f"{name}: {err}" for name, err in failures.items()))
    items = []
    for image in usable:
        brain, mask = preprocessed_paths(settings.output_dir, image)
        items.append(TrainItem(id=image.name, image=str(brain), mask=str(mask),
                               age=float(image.age), group=image.subject,
                               native=native_outputs(settings.output_dir, image.entities)))
    # grouped by participant: no one's sessions straddle the train/validation split
    train, val = split_stratified(items, settings.val_fraction, settings.seed)
    backends = sorted({transform_backend(settings.output_dir, im.entities) for im in usable})
    LOG.info("recording the training inputs' intensity distribution (QC reference)")
    card_extra = {
        "input_reference": input_reference(items),
        "training_data": {
            "name": _dataset_name(settings.bids_dir),
            "source": settings.bids_dir.name,
            "n_images_selected": len(images),
            "skipped_without_age": unlabelled,
            "skipped_failed_preprocessing": sorted(failures),
            "train_ids": [it.id for it in train],
            "validation_ids": [it.id for it in val],
        },
        "preprocessing": {"backend": backends[0] if len(backends) == 1 else backends,
                          "template": TEMPLATE, "resolution_mm": 2},
    }
    init_states = None
    if settings.init_from:
        init_states, lineage = _parent(settings, items)
        card_extra["lineage"] = lineage
        config = dataclasses.replace(config, init_from_sha256=lineage["parent"]["sha256"],
                                     freeze_trunk=settings.freeze_trunk)
    work_dir = settings.work_dir / f"train_{name}"
    progress = sys.stderr.isatty()  # a bar on a terminal; a batch log gets the epoch lines
    if settings.folds > 1 or settings.ensemble > 1:
        from brainage_bids.model.cv import train_ensemble

        del card_extra["training_data"]["train_ids"], card_extra["training_data"]["validation_ids"]
        LOG.info("training the ensemble %s: %d fold(s) x %d seed(s) on %d images", name,
                 settings.folds, settings.ensemble, len(items))
        return train_ensemble(config, items, settings.output_dir / "models", work_dir=work_dir,
                              folds=settings.folds, seeds_per_fold=settings.ensemble,
                              resume=settings.resume, progress=progress,
                              card_extra=card_extra, mc_samples=settings.mc_samples,
                              init_states=init_states)
    from brainage_bids.model.held_out import validation_fits

    LOG.info("training %s on %d images, validating on %d", name, len(train), len(val))
    return train_model(config, train, val, settings.output_dir / "models",
                       work_dir=work_dir, resume=settings.resume, progress=progress,
                       card_extra=card_extra,
                       init_state=init_states[0] if init_states else None,
                       finish=validation_fits(config, val, settings.mc_samples))


def _check_splits(settings: Settings, probe: list[TrainItem]) -> None:
    """The validation split or the folds that ``probe`` (the labelled images, not yet
    preprocessed) would give: too few participants is said now, not after preprocessing."""
    from brainage_bids.model.cv import plan_members
    from brainage_bids.model.train_config import check_split_sizes, split_stratified

    try:
        if settings.folds > 1 or settings.ensemble > 1:
            plan_members(probe, folds=settings.folds, seeds_per_fold=settings.ensemble,
                         seed=settings.seed, val_fraction=settings.val_fraction)
        else:
            check_split_sizes(*split_stratified(probe, settings.val_fraction, settings.seed))
    except ValueError as err:
        n = len({item.group for item in probe})
        raise TrainDataError(
            f"{n} participant(s) with an age cannot be split as asked (--folds "
            f"{settings.folds}, --ensemble {settings.ensemble}, --val-fraction "
            f"{settings.val_fraction}): {err}") from None


def input_reference(items: Sequence[TrainItem]) -> dict[str, Any]:
    """The card's ``input_reference``: the training inputs' normalised intensity percentiles
    (:mod:`brainage_bids.model.input_reference`), read exactly as training reads them, with
    each participant's images left out together."""
    from brainage_bids.model.input_reference import fit_reference, image_quantiles

    return fit_reference([image_quantiles(item.image, item.mask) for item in items],
                         groups=[str(item.group) for item in items])


def _parent(settings: Settings, items: list) -> tuple[list[dict], dict]:
    """The parent model's member weights and the lineage entry of the new model's card."""
    from brainage_bids.model.ensemble import members_of
    from brainage_bids.model.weights import load_model

    parent, card = load_model(settings.init_from)
    states = [{k: v.detach().clone() for k, v in member.state_dict().items()}
              for member in members_of(parent)]
    ages = [float(item.age) for item in items]
    lineage = {
        "parent": {"name": card.get("name"), "sha256": card.get("sha256"),
                   "n_members": len(states),
                   "training_data": (card.get("training_data") or {}).get("name")},
        "fine_tuning_data": {"name": _dataset_name(settings.bids_dir),
                             "n_participants": len({item.group for item in items}),
                             "n_images": len(items), "age_range": [min(ages), max(ages)]},
        "freeze_trunk": settings.freeze_trunk,
    }
    LOG.info("fine-tuning from %s (sha256 %s, %d member(s))", card.get("name"),
             str(card.get("sha256"))[:12], len(states))
    return states, lineage
