"""The BIDS-App command line: argparse, validators, and the one frozen :class:`Settings`."""

from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brainage_bids import __version__
from brainage_bids.config import (
    ATTENTION_VARIANTS,
    BIAS_METHODS,
    DEVICES,
    LEVELS,
    PREPROC_BACKENDS,
    REGRESSION_LOSSES,
    Settings,
    parse_reference,
)

#: The paper's training recipe, and the fine-tuning defaults used with --init-from
#: (lower learning rate, fewer epochs, early stopping on the site's validation data).
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 250, "lr": 1e-4, "patience": None}
FINETUNE_DEFAULTS: dict[str, Any] = {"epochs": 60, "lr": 1e-5, "patience": 15}


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not for flags, not for an empty or
    unset one (decided later), and not twice when the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.nargs == 0 or default in (None, [], ()) or "default" in text
                or default is argparse.SUPPRESS):  # nargs 0: a flag (-v, --no-reports)
            return text
        return super()._get_help_string(action)


def _shipped_models() -> str:
    """The registry's names for --help, read as plain JSON (the loader imports torch)."""
    from importlib import resources

    try:
        registry = json.loads((resources.files("brainage_bids") / "data" / "models"
                               / "registry.json").read_text(encoding="utf-8"))
        names = [str(entry["name"]) for entry in registry["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        return "see docs/usage.md"
    default = registry.get("default")
    others = [name for name in names if name != default]
    return f"default: {default}" + (f"; also {', '.join(others)}" if others else "")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


def _dropout(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {value}")
    return value


def _label(prefix: str):
    def strip(text: str) -> str:
        label = text.removeprefix(f"{prefix}-")
        if not label or not label.isalnum():
            raise argparse.ArgumentTypeError(
                f"{prefix} labels are alphanumeric (with or without '{prefix}-'), got {text!r}")
        return label
    strip.__name__ = f"{prefix} label"
    return strip


def build_parser() -> argparse.ArgumentParser:
    """The parser; its help text is the reference for every option."""
    parser = argparse.ArgumentParser(
        prog="brainage-bids",
        description=(
            "brainage-bids: brain age from T1-weighted MRI with a weight-shared "
            "spatial-attention 3D CNN (Kancharla & Sinha, 2024), as a BIDS App. "
            "Run 'participant' to preprocess and predict each T1w image, then 'group' to "
            "gather brain-age-gap tables and reports; 'train' fits the model to your own "
            "cohort from participants.tsv."),
        epilog="Documentation: docs/usage.md. Report problems with the log in OUTPUT_DIR/logs.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("bids_dir", type=Path,
                        help="the root of the BIDS dataset (read only, never written)")
    parser.add_argument("output_dir", type=Path,
                        help="where derivatives go (must not be inside bids_dir)")
    parser.add_argument("analysis_level", choices=LEVELS,
                        help="participant: per-image preprocessing and prediction; group: "
                             "tables and reports over all participants; train: fit a model")
    parser.add_argument("--version", action="version", version=f"brainage-bids {__version__}")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", default=[],
                     type=_label("sub"), metavar="LABEL",
                     help="participants to process (with or without 'sub-'); default: all")
    sel.add_argument("--session-label", nargs="+", default=[], type=_label("ses"),
                     metavar="LABEL", help="sessions to process (with or without 'ses-')")
    sel.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                     help="JSON of pybids entity filters for the T1w query, e.g. "
                          '{"t1w": {"acquisition": "mprage"}}')
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                     help="do not require dataset_description.json and BIDS validity")

    perf = parser.add_argument_group("performance")
    perf.add_argument("-w", "--work-dir", type=Path, default=None,
                      help="intermediate files; reuse it to resume (default: "
                           "$BRAINAGE_WORK_DIR when set, as in the container, else "
                           "OUTPUT_DIR_work beside OUTPUT_DIR)")
    perf.add_argument("--nprocs", "--n-cpus", type=_positive_int, default=os.cpu_count() or 1,
                      help="the CPU budget: NPROCS / OMP_NTHREADS images run at once, each in "
                           "its own process (default: all cores)")
    perf.add_argument("--omp-nthreads", type=_positive_int, default=None,
                      help="threads per image for the model; the preprocessing uses one "
                           "(default: NPROCS / number of images, between 1 and 8)")
    perf.add_argument("--mem-gb", type=_positive_float, default=None,
                      help="memory budget: at most MEM_GB / 1.5 images run at once")
    perf.add_argument("--device", choices=DEVICES, default="auto",
                      help="where the model runs")

    model = parser.add_argument_group("preprocessing and model")
    model.add_argument("--preproc", choices=PREPROC_BACKENDS, default="auto",
                       help="fsl: FSL bet + flirt (as in the paper); ants: pure-pip ANTs "
                            "backend; auto: fsl when bet and flirt are on PATH, else ants. The "
                            "shipped models were trained on ants inputs")
    model.add_argument("--model", default="default", metavar="PATH|NAME",
                       help=f"a shipped model ({_shipped_models()}), or a model file or "
                            "models/ folder written by the train level")
    model.add_argument("--mc-samples", type=_positive_int, default=20,
                       help="Monte-Carlo dropout samples for the uncertainty")
    model.add_argument("--no-saliency", dest="saliency", action="store_false",
                       help="skip Grad-CAM and attention maps")
    model.add_argument("--no-reports", dest="reports", action="store_false",
                       help="skip HTML reports")
    model.add_argument("--reports-only", action="store_true",
                       help="participant level: re-render the HTML reports (and "
                            "logs/CITATION.md) from existing derivatives, without "
                            "preprocessing or predicting")
    model.add_argument("--seed", type=_non_negative_int, default=42,
                       help="random seed (recorded in logs)")

    train = parser.add_argument_group("train level")
    train.add_argument("--epochs", type=_positive_int, default=None,
                       help=f"default {TRAIN_DEFAULTS['epochs']} as the paper; "
                            f"{FINETUNE_DEFAULTS['epochs']} with --init-from")
    train.add_argument("--batch-size", type=_positive_int, default=4,
                       help="images per optimisation step (the paper's 4); under torchrun "
                            "the global batch, split across processes")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help=f"Adam learning rate (default {TRAIN_DEFAULTS['lr']:g}; "
                            f"{FINETUNE_DEFAULTS['lr']:g} with --init-from)")
    train.add_argument("--loss", choices=REGRESSION_LOSSES, default="l1",
                       help="regression loss on the age in years (l1: mean absolute error, "
                            "as the paper)")
    train.add_argument("--val-fraction", type=_fraction, default=0.2,
                       help="validation share, stratified by age")
    train.add_argument("--attention", choices=ATTENTION_VARIANTS, default=None,
                       help="the paper's ablation variants (default shared; with "
                            "--init-from: the parent's)")
    train.add_argument("--dropout", type=_dropout, default=None,
                       help="dropout probability of the two dropout layers (also the "
                            "MC-dropout of the uncertainty; default 0.2; with --init-from: "
                            "the parent's)")
    train.add_argument("--patience", type=_positive_int, default=None,
                       help="early stopping after this many epochs without a better "
                            "validation MAE (default: off; "
                            f"{FINETUNE_DEFAULTS['patience']} with --init-from)")
    train.add_argument("--no-augment", dest="augment", action="store_false",
                       help="train without data augmentation")
    train.add_argument("--folds", type=_positive_int, default=None,
                       help="train an ensemble of K members on a K-fold split (grouped by "
                            "participant, stratified by age), each early-stopped on its own "
                            "fold; writes out-of-fold predictions (default 1: one model; "
                            "with an ensemble --init-from: its number of members)")
    train.add_argument("--ensemble", type=_positive_int, default=1, metavar="N",
                       help="members per fold with different seeds (with --folds 1: a seed "
                            "ensemble on one validation split)")
    train.add_argument("--init-from", default=None, metavar="MODEL",
                       help="fine-tune: start from a trained model's weights (default, a "
                            "shipped name, or a path; every member of an ensemble) instead "
                            "of a fresh initialisation; the architecture is the parent's")
    train.add_argument("--freeze-trunk", action="store_true",
                       help="with --init-from: train only the dense head")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted training run from its work-dir "
                            "checkpoint (an ensemble: member by member)")
    train.add_argument("--model-name", default=None,
                       help="file name stem of the trained model (default: from the dataset)")

    group = parser.add_argument_group("group level")
    group.add_argument("--bias-method", choices=BIAS_METHODS, default="beheshti",
                       help="bias correction reported as the main corrected gap")
    group.add_argument("--skip-unreadable", action="store_true",
                       help="write the group table without the brain-age records that cannot "
                            "be read (each is still named); by default such a record is an "
                            "error and no table is written")
    group.add_argument("--bias-reference", default=None, metavar="COLUMN=VALUE",
                       help="fit the bias correction on participants with this "
                            "participants.tsv value (e.g. group=control) instead of the "
                            "model card's coefficients")

    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: debug messages; -vv: also tracebacks and nipype's log on "
                             "the terminal")
    return parser


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
    except ValueError:
        return False
    return True


def _parent_architecture(spec: str) -> tuple[str, dict[str, Any], int]:
    """The parent model's name, member architecture and number of members (card only)."""
    from brainage_bids.model.weights import ModelError, read_card, resolve_model

    try:
        card = read_card(resolve_model(spec)[0])
    except ModelError as err:
        raise UsageError(f"--init-from {spec}: {err}") from None
    arch = card["architecture"]
    member = arch.get("member", arch)
    count = arch.get("n_members", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UsageError(f"--init-from {spec}: its card's n_members {count!r} is not a "
                         "positive integer")
    return str(card.get("name", spec)), member, count


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    """Training options with their defaults: the paper's, or fine-tuning's with --init-from.

    With --init-from the architecture is the parent's: an option that contradicts it is a
    usage error, not something to silently override.
    """
    given = {key: getattr(args, key) for key in ("epochs", "lr", "patience", "attention",
                                                   "dropout", "folds")}
    if not args.init_from:
        if args.freeze_trunk:
            raise UsageError("--freeze-trunk needs --init-from (a trained model to start from)")
        defaults = {**TRAIN_DEFAULTS, "attention": "shared", "dropout": 0.2, "folds": 1}
        return {key: defaults[key] if value is None else value for key, value in given.items()}
    name, member, n_members = _parent_architecture(args.init_from)
    if member.get("name") != "BrainAgeNet":
        raise UsageError(f"--init-from {args.init_from}: fine-tuning supports BrainAgeNet "
                         f"models; {name} is {member.get('name')}")
    for option in ("attention", "dropout"):
        if given[option] is not None and given[option] != member.get(option):
            raise UsageError(f"--{option} {given[option]} contradicts the parent model {name} "
                             f"({option} {member.get(option)}); the architecture comes from "
                             "the parent, so leave it out")
    if n_members > 1 and given["folds"] not in (None, n_members):
        raise UsageError(f"--folds {given['folds']}: the parent {name} has {n_members} "
                         f"members and each seeds one fold, so use --folds {n_members} or "
                         "leave it out")
    defaults = {**FINETUNE_DEFAULTS, "attention": member.get("attention"),
                "dropout": member.get("dropout"), "folds": n_members}
    return {key: defaults[key] if value is None else value for key, value in given.items()}


def _read_filters(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if path.is_dir():
        raise UsageError(f"--bids-filter-file {path} is a directory, not a JSON file")
    try:
        filters = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--bids-filter-file {path} does not exist") from None
    except OSError as err:
        raise UsageError(f"--bids-filter-file {path} cannot be read: "
                         f"{(err.strerror or str(err)).lower()}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {err}") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(
            f'--bids-filter-file {path} must map a query name to entity filters, e.g. '
            '{"t1w": {"acquisition": "mprage"}}')
    if "t1w" not in filters:  # a typo ("T1w") would otherwise select every image
        raise UsageError(
            f'--bids-filter-file {path} has no "t1w" query (it has '
            f'{", ".join(repr(k) for k in filters) or "none"}): brainage-bids reads only '
            '"t1w", e.g. {"t1w": {"acquisition": "mprage"}}')
    from bids.layout.models import Config

    known = {e for name in ("bids", "derivatives") for e in Config.load(name).entities}
    known |= {"regex_search", "scope", "invalid_filters", "absolute_paths"}  # get()'s options
    taken = sorted(set(filters["t1w"]) & {"return_type", "target"})
    if taken:
        raise UsageError(f"--bids-filter-file {path}: {taken[0]!r} cannot be set there "
                         "(brainage-bids asks pybids for file names itself)")
    # BIDS sidecar metadata (RepetitionTime, ...) is CamelCase and may be filtered on too;
    # a lowercase key that is no entity is a typo of one
    unknown = sorted(k for k in set(filters["t1w"]) - known if not k[:1].isupper())
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"--bids-filter-file {path}: {unknown[0]!r} is not a BIDS entity"
                         f"{hint}; pybids names them in full: subject, session, "
                         "acquisition, reconstruction, run, ...")
    return filters


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse ``argv`` and check the paths; raise :class:`UsageError` on a user mistake."""
    args = build_parser().parse_args(argv)
    bids_dir = args.bids_dir.expanduser().resolve()
    output_dir = args.output_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS directory {args.bids_dir} does not exist or is not a directory")
    if not args.skip_bids_validation and not (bids_dir / "dataset_description.json").is_file():
        raise UsageError(
            f"{args.bids_dir} has no dataset_description.json, so it is not a BIDS dataset "
            "(use --skip-bids-validation to run anyway)")
    if _inside(output_dir, bids_dir):
        raise UsageError(
            f"output directory {args.output_dir} is inside the BIDS directory; choose a "
            "directory outside it (the input dataset is never written)")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output directory {args.output_dir} exists and is not a directory")
    env_work = os.environ.get("BRAINAGE_WORK_DIR")
    if args.work_dir:
        work_dir = args.work_dir.expanduser().resolve()
    elif env_work:
        work_dir = Path(env_work).expanduser().resolve()
    else:
        work_dir = output_dir.parent / f"{output_dir.name}_work"
    if _inside(work_dir, bids_dir):
        raise UsageError(f"work directory {work_dir} is inside the BIDS directory; choose a "
                         "directory outside it (the input dataset is never written)")
    if args.bias_reference:
        try:
            parse_reference(args.bias_reference)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if work_dir.exists() and not work_dir.is_dir():
        raise UsageError(f"work directory {work_dir} exists and is not a directory")
    if work_dir == output_dir:
        raise UsageError(f"work directory {work_dir} is the output directory: intermediate "
                         "files would mix with the derivatives; choose another -w")
    if args.reports_only and (not args.reports or args.analysis_level != "participant"):
        raise UsageError("--reports-only re-renders the participant reports: use it at the "
                         "participant level and without --no-reports")
    if args.model_name is not None:
        from brainage_bids.model.train_config import model_name_problem

        if (problem := model_name_problem(args.model_name)) is not None:
            raise UsageError(f"--model-name {problem}")
    train = _train_options(args)
    return Settings(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=args.analysis_level,
        participant_label=tuple(dict.fromkeys(args.participant_label)),
        session_label=tuple(dict.fromkeys(args.session_label)),
        bids_filters=_read_filters(args.bids_filter_file),
        work_dir=work_dir,
        nprocs=args.nprocs,
        omp_nthreads=args.omp_nthreads,
        mem_gb=args.mem_gb,
        skip_bids_validation=args.skip_bids_validation,
        preproc=args.preproc,
        model=args.model,
        device=args.device,
        seed=args.seed,
        verbose=args.verbose,
        mc_samples=args.mc_samples,
        saliency=args.saliency,
        reports=args.reports,
        reports_only=args.reports_only,
        epochs=train["epochs"],
        batch_size=args.batch_size,
        lr=train["lr"],
        loss=args.loss,
        val_fraction=args.val_fraction,
        attention=train["attention"],
        resume=args.resume,
        patience=train["patience"],
        dropout=train["dropout"],
        augment=args.augment,
        folds=train["folds"],
        init_from=args.init_from,
        freeze_trunk=args.freeze_trunk,
        ensemble=args.ensemble,
        model_name=args.model_name,
        bias_method=args.bias_method,
        bias_reference=args.bias_reference,
        skip_unreadable=args.skip_unreadable,
    )
