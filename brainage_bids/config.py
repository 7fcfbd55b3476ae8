"""Run settings: one frozen object built once by the parser and passed down.

There is no global configuration module: every function that needs a setting receives it
as an argument, so workflows stay pure functions of their inputs and runs are reproducible
from the ``logs/config-<uuid>.toml`` file that :func:`write_settings` leaves behind.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainage_bids.io import atomic_write_text

#: Valid ages in years (anything else is a typo or a unit mix-up: months, days), for the
#: ages read from a dataset and for training alike.
MIN_AGE, MAX_AGE = 0.0, 120.0

LEVELS = ("participant", "group", "train")
PREPROC_BACKENDS = ("auto", "fsl", "ants")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_VARIANTS = ("shared", "separate", "none")
#: The train level's losses. It trains BrainAgeNet only, so SFCN's soft-label "kl" (in
#: ``model.train_config.LOSSES``, used by the ablation) is not offered here.
REGRESSION_LOSSES = ("l1", "mse", "smoothl1")
BIAS_METHODS = ("beheshti", "cole", "smith")


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to know, resolved to absolute paths and concrete values."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    bids_filters: dict[str, Any] = field(default_factory=dict)
    work_dir: Path = Path("work")
    nprocs: int = 1
    #: threads per image for the model (the preprocessing runs on one); ``None``: chosen
    #: per run from ``nprocs`` and the number of images (:func:`with_threads`)
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    skip_bids_validation: bool = False
    preproc: str = "auto"
    model: str = "default"
    device: str = "auto"
    seed: int = 42
    verbose: int = 0
    mc_samples: int = 20
    saliency: bool = True
    reports: bool = True
    reports_only: bool = False
    # train level
    epochs: int = 250
    batch_size: int = 4
    lr: float = 1e-4
    loss: str = "l1"
    val_fraction: float = 0.2
    attention: str = "shared"
    resume: bool = False
    patience: int | None = None
    dropout: float = 0.2
    augment: bool = True
    folds: int = 1
    ensemble: int = 1
    init_from: str | None = None
    freeze_trunk: bool = False
    model_name: str | None = None
    # group level
    bias_method: str = "beheshti"
    bias_reference: str | None = None
    skip_unreadable: bool = False
    run_uuid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def logs_dir(self) -> Path:
        return self.output_dir / "logs"

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for the provenance file and the JSON records."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _toml_value(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        # inline table of JSON strings keeps arbitrary filter values lossless
        return json.dumps(json.dumps(value))
    return json.dumps(str(value))


def write_settings(settings: Settings) -> Path:
    """Write ``logs/config-<uuid>.toml`` (atomically) for provenance, seeds included."""
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    target = settings.logs_dir / f"config-{settings.run_uuid}.toml"
    lines = ["# brainage-bids run settings (None is written as an empty string)", "[settings]"]
    lines += [f"{key} = {_toml_value(val)}" for key, val in settings.to_dict().items()]
    return atomic_write_text(target, "\n".join(lines) + "\n")


def with_threads(settings: Settings, n_images: int) -> Settings:
    """``settings`` with ``omp_nthreads`` decided: as given, or by default the cores left
    to each image when every image runs at once (at most 8; at least 1).

    The preprocessing of an image runs on one thread whatever this says (ANTs is kept to
    one for reproducibility, FSL's bet and flirt use one), so a whole cohort on many cores
    is fastest with one thread per image and ``nprocs`` images at once, and a single image
    gets the cores for the model.
    """
    if settings.omp_nthreads is not None:
        return settings
    threads = max(1, min(8, settings.nprocs // max(1, n_images)))
    return dataclasses.replace(settings, omp_nthreads=threads)


def parse_reference(spec: str) -> tuple[str, str]:
    """``"group=control"`` -> ``("group", "control")``."""
    column, sep, value = spec.partition("=")
    if not sep or not column.strip() or not value.strip():
        raise ValueError(f"--bias-reference {spec!r} is not of the form COLUMN=VALUE "
                         "(e.g. group=control)")
    return column.strip(), value.strip()
