"""What a training run is: its items, its options, the train/validation split.

Everything here is checked before the engine (:mod:`brainage_bids.model.train`) writes a
file: :class:`TrainConfig` validates its options on construction, :func:`validate_items` the
images, and :func:`split_stratified` makes the age-stratified, seeded split that the train
level and the entry point use when no split is given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_bids.model.net import ATTENTION_VARIANTS, INPUT_SHAPE

LOSSES = ("l1", "mse", "smoothl1", "kl")
#: "kl" is SFCN's soft-label loss and only SFCN's; the regression losses are BrainAgeNet's.
TRAIN_ARCHITECTURES = ("BrainAgeNet", "SFCN")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
INITS = ("kaiming", "default")
#: Fewest items per split; fewer is an error raised before anything is written.
MIN_TRAIN = 4
MIN_VAL = 2


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model's file stem (``None`` when it can)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        return (f"must be a non-empty file stem of letters, digits, '-', '_' or '.' (not "
                f"first), got {name!r}")
    return None


@dataclass(frozen=True)
class TrainItem:
    """One preprocessed image (91x109x91 MNI brain and its mask) with its age in years.

    ``group`` (e.g. the participant label) keeps several sessions of one participant in the
    same split; empty means the item is its own group. ``native`` is ``(brain, mask,
    transform, backend)`` on the input grid when the derivatives have them: an ensemble's
    out-of-fold predictions then use grid jitter (:mod:`brainage_bids.model.jitter`).
    """

    id: str
    image: str
    mask: str
    age: float
    group: str = ""
    native: tuple[str, str, str, str] | None = None


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
        if (problem := model_name_problem(self.model_name)) is not None:
            raise ValueError(f"model_name {problem}")
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

def group_items(items: Sequence[TrainItem]) -> dict[str, list[TrainItem]]:
    """Items by group (an item without one is its own), for splits that stratify by age.

    Raises ``ValueError`` for an item without a finite age.
    """
    groups: dict[str, list[TrainItem]] = {}
    for item in items:
        if not math.isfinite(float(item.age)):
            raise ValueError(f"item {item.id!r} has no valid age ({item.age!r})")
        groups.setdefault(item.group or item.id, []).append(item)
    return groups


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
    groups = group_items(items)
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


def check_split_sizes(train: Sequence[TrainItem], val: Sequence[TrainItem]) -> None:
    """Refuse a split with fewer than ``MIN_TRAIN`` training or ``MIN_VAL`` validation images."""
    for split, items, minimum in (("training", train, MIN_TRAIN), ("validation", val, MIN_VAL)):
        if len(items) < minimum:
            raise ValueError(f"need at least {minimum} {split} images, got {len(items)}")


def validate_items(train: Sequence[TrainItem], val: Sequence[TrainItem]) -> None:
    """Refuse too few items, bad ages, missing files, repeated ids and leaked groups."""
    from brainage_bids.config import MAX_AGE, MIN_AGE  # one rule for every age

    check_split_sizes(train, val)
    for items in (train, val):
        for item in items:
            if not isinstance(item, TrainItem):
                raise ValueError(f"expected TrainItem, got {type(item).__name__}")
            age = float(item.age)
            if not math.isfinite(age) or not MIN_AGE <= age <= MAX_AGE:
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

