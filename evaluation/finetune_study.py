"""Does fine-tuning help? Parent vs fine-tuned vs from scratch, on disjoint IXI participants.

The design (issue: site adaptation), all on the preprocessed IXI split:

1. A parent is trained on ``--parent-n`` (60) of the 120 train+validation participants of
   ``evaluation/ixi_split.json`` (age-stratified, seeded), validated on a fifth of them.
2. From the other 60, subsets of 10, 20 and 40 participants (``--sizes``) are drawn,
   ``--repeats`` (3) per size, each age-stratified with its own seed.
3. On each subset: fine-tune the parent (``--init-from``'s defaults: lr 1e-5, 60 epochs,
   patience 15; optionally ``--freeze-trunk``) and train from scratch (the paper's recipe),
   both early-stopped on a fifth of the subset.
4. Everything is scored once on the 30 test participants, beside the parent alone and beside
   the parent with the de Lange & Cole bias correction fitted on the same subset (the group
   level's ``--bias-method cole --bias-reference``: no training, the lighter remedy).

``--site-gamma G`` simulates a second site: the subsets and the test participants (never the
parent's training data) get a monotone contrast change, ``x -> x**G`` on the brain's
intensities scaled to [0, 1] (G > 1 brightens white matter relative to grey matter, as on the
other site's scans that the shipped model aged by 15 years). Its models are named
``ft-gammaG-...`` and share the parent with the plain study; use another ``--json``.

Finished runs are skipped and interrupted ones resume, so the command can be rerun::

    python evaluation/finetune_study.py --derivatives /work/runs/ixi2 --out /work/runs/ft \\
        --threads 2 --json docs/evaluation/finetune.json

On a GPU add ``--device cuda``. Prints one table (mean +- SD over the repeats). The JSON is
rewritten after every run and finished runs are not repeated, so with the JSON and the parent
(``--parent``, e.g. a committed copy) the study continues on another machine or session.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TypeVar

import numpy as np

from brainage_bids import evaluation as ev
from brainage_bids.io import sha256_file
from brainage_bids.metrics import apply_bias, fit_bias, regression_metrics
from brainage_bids.model.ensemble import members_of
from brainage_bids.model.train import train_model
from brainage_bids.model.train_config import TrainConfig, TrainItem, split_stratified
from brainage_bids.model.weights import load_model, read_card, resolve_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import DEFAULT_BIDS  # noqa: E402

FINETUNE = {"epochs": 60, "lr": 1e-5, "patience": 15}
SCRATCH = {"epochs": 250, "lr": 1e-4, "patience": 40}
#: The kinds of run made from the parent (training from scratch is not one of them).
PARENT_KINDS = ("fine", "biascorr")

Item = TypeVar("Item", TrainItem, ev.EvalItem)


def contrast_shift(volume: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """``x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma`` inside the mask (lo, hi: its
    minimum and maximum); outside the mask unchanged. Monotone, so no normalisation undoes it."""
    out = np.asarray(volume, dtype=np.float32).copy()
    inside = np.asarray(mask) > 0
    lo, hi = float(out[inside].min()), float(out[inside].max())
    out[inside] = lo + (hi - lo) * ((out[inside] - lo) / (hi - lo)) ** gamma
    return out


def _at_site(items: list[Item], gamma: float, root: Path) -> list[Item]:
    """``items`` with their images contrast-shifted (written once under ``root``)."""
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    shifted = []
    for item in items:
        target = root / Path(item.image).name
        if not target.is_file():
            image = nib.load(item.image)
            mask = np.asanyarray(nib.load(item.mask).dataobj)
            out = nib.Nifti1Image(contrast_shift(np.asanyarray(image.dataobj), mask, gamma),
                                  image.affine)
            partial = target.with_name(f".{target.name}.partial.nii.gz")
            nib.save(out, partial)
            os.replace(partial, target)  # a killed run never leaves a half-written image
        shifted.append(dataclasses.replace(item, image=str(target)))
    return shifted


def _items(derivatives: Path, bids: Path, subjects: list[str]) -> list[TrainItem]:
    return [TrainItem(id=f"sub-{it.id}", image=it.image, mask=it.mask, age=it.age,
                      group=it.id)
            for it in ev.preprocessed_items(derivatives, bids, subjects)]


def _subset(pool: list[TrainItem], n: int, seed: int) -> list[TrainItem]:
    """``n`` participants of ``pool``, one per age stratum (same rule as the splits)."""
    if n >= len(pool):
        return list(pool)
    _rest, chosen = split_stratified(pool, n / len(pool), seed)
    return chosen


def _train(name: str, items: list[TrainItem], args: argparse.Namespace, recipe: dict,
           parent: str | None = None) -> Path:
    out = args.out / "models" / name
    if (out / f"{name}.json").is_file():
        return out
    train, val = split_stratified(items, 0.2, args.seed)
    init_state, sha = None, None
    if parent is not None:
        model, card = load_model(parent)
        init_state = {k: v.clone() for k, v in members_of(model)[0].state_dict().items()}
        sha = card["sha256"]
    config = TrainConfig(seed=args.seed, device=args.device, model_name=name,
                         num_threads=args.threads, init_from_sha256=sha,
                         freeze_trunk=bool(parent and args.freeze_trunk), **recipe)
    logging.info("training %s on %d (+%d validation)", name, len(train), len(val))
    train_model(config, train, val, out, work_dir=args.out / "work" / name, resume=True,
                progress=sys.stderr.isatty(), init_state=init_state,
                card_extra={"training_data": {"train_ids": [i.id for i in train],
                                              "validation_ids": [i.id for i in val]}})
    return out


def _score(path: Path, test: list[ev.EvalItem], args: argparse.Namespace) -> dict:
    model, card = load_model(path)
    pred, _ = ev.predict_items(model, test, mc_samples=1, device=args.device)
    metrics = regression_metrics([it.age for it in test], pred)
    return {"mae": metrics["mae"], "r": metrics["r"], "best_epoch":
            card["training"]["best_epoch"], "wall_time_s": card["training"]["wall_time_s"]}


def _run_name(kind: str, size: int, repeat: int, gamma: float | None = None) -> str:
    site = "" if gamma is None else f"-gamma{gamma:g}"
    return f"ft{site}-{kind}-n{size}-r{repeat}"


def _made_by_other_parent(done: dict[str, dict], parent_sha: str) -> list[str]:
    """The finished runs that came from a parent other than ``parent_sha`` (none if same).

    The parent row, the fine-tunes and the bias corrections depend on the parent; training
    from scratch does not. Training is not bit-reproducible across hosts, so a parent retrained
    in another session is another model and what it made before must be redone, not mixed.
    """
    recorded = done.get("ft-parent", {}).get("sha256")
    if recorded is None or recorded == parent_sha:
        return []
    return [run for run in done
            if run == "ft-parent" or any(f"-{kind}-" in run for kind in PARENT_KINDS)]


def _bias_corrected(subset: list[TrainItem], test: list[ev.EvalItem],
                    parent_pred: dict[str, float], test_pred: np.ndarray) -> dict:
    """The parent with the de Lange & Cole correction fitted on ``subset``, on ``test``."""
    coefs = fit_bias("cole", [i.age for i in subset], [parent_pred[i.id] for i in subset])
    age = np.array([it.age for it in test])
    corrected = apply_bias("cole", coefs, age, test_pred) + age
    metrics = regression_metrics(age, corrected)
    return {"mae": metrics["mae"], "r": metrics["r"], "best_epoch": None, "wall_time_s": None,
            "slope": coefs["slope"], "intercept": coefs["intercept"]}


def _table(rows: dict[str, list[dict]]) -> str:
    """The markdown table of docs/fine-tuning.md."""
    lines = ["| model | runs | test MAE, mean (SD over subsets) | test r | best epoch | "
             "minutes per run |", "|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        mae = np.array([r["mae"] for r in runs])
        spread = f" ({mae.std(ddof=1):.2f})" if len(mae) > 1 else ""
        trained = runs[0]["best_epoch"] is not None  # a bias correction trains nothing
        epochs = ", ".join(str(r["best_epoch"]) for r in runs) if trained else "-"
        minutes = (f"{np.mean([r['wall_time_s'] for r in runs]) / 60:.1f}" if trained
                   else "-")
        lines.append(f"| {name} | {len(runs)} | {mae.mean():.2f}{spread} | "
                     f"{np.mean([r['r'] for r in runs]):.3f} | {epochs} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--derivatives", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--split", type=Path, default=HERE / "ixi_split.json")
    parser.add_argument("--parent-n", type=int, default=60)
    parser.add_argument("--parent", type=Path,
                        help="an already trained parent (its card must name the same "
                             "participants); default: train it under --out")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--scratch-sizes", type=int, nargs="+", default=None,
                        help="subset sizes trained from scratch (default: --sizes)")
    parser.add_argument("--site-gamma", type=float, default=None,
                        help="simulate a second site: this contrast change (x**G) on the "
                             "subsets and the test participants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--freeze-trunk", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, required=True,
                        help="results; rewritten after every run, and the runs it already "
                             "holds are not run again (the study resumes across machines "
                             "from this file and the parent alone)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    split = json.loads(args.split.read_text())
    trainval = _items(args.derivatives, args.bids, split["trainval"])
    test = ev.preprocessed_items(args.derivatives, args.bids, split["test"])
    others, parent_items = split_stratified(trainval, args.parent_n / len(trainval), args.seed)
    if args.site_gamma is not None:
        site_root = args.out / "site" / f"gamma{args.site_gamma:g}"
        others = _at_site(others, args.site_gamma, site_root)
        test = _at_site(test, args.site_gamma, site_root)
    # What the numbers depend on; where things are and how fast they run are left out, and
    # so are options left unset (a design recorded before they existed stays the same).
    design = {k: v for k, v in vars(args).items()
              if k not in ("json", "parent", "out", "device", "threads", "derivatives", "bids",
                           "split") and not (k in ("scratch_sizes", "site_gamma") and v is None)}
    design["split_sha256"] = sha256_file(args.split)
    done: dict[str, dict] = {}
    if args.json.is_file():
        previous = json.loads(args.json.read_text())
        if previous.get("design") != design:
            print(f"finetune_study: {args.json} holds another design; use another --json",
                  file=sys.stderr)
            return 2
        done = previous.get("runs", {})

    def record(name: str, result: dict) -> None:
        done[name] = result
        ev.write_json(args.json, {"design": design, "runs": done,
                                  "rows": _rows(done, args)})

    def name(kind: str, size: int, repeat: int) -> str:
        return _run_name(kind, size, repeat, args.site_gamma)

    def subset(size: int, repeat: int) -> list[TrainItem]:
        return _subset(others, size, args.seed + 1000 * size + repeat)

    needs_parent = [name(kind, size, r) for kind in PARENT_KINDS
                    for size in args.sizes for r in range(args.repeats)]
    parent_spec = None
    if "ft-parent" not in done or any(n not in done for n in needs_parent):
        parent = args.parent or _train("ft-parent", parent_items, args, SCRATCH)
        parent_card = read_card(resolve_model(parent)[0])
        trained_on = (parent_card["training_data"]["train_ids"]
                      + parent_card["training_data"]["validation_ids"])
        if sorted(trained_on) != sorted(i.id for i in parent_items):
            print(f"finetune_study: {parent} was not trained on this design's parent set",
                  file=sys.stderr)
            return 2
        stale = _made_by_other_parent(done, parent_card["sha256"])
        if stale:
            logging.warning("the parent %s (sha256 %s) is not the one recorded in %s; redoing "
                            "the %d runs that depend on it", parent, parent_card["sha256"][:12],
                            args.json, len(stale))
            for run in stale:
                del done[run]
        if "ft-parent" not in done:
            record("ft-parent", {**_score(Path(parent), test, args),
                                 "sha256": parent_card["sha256"]})
        parent_spec = str(parent)
        bias_names = [(size, r) for size in args.sizes for r in range(args.repeats)
                      if name("biascorr", size, r) not in done]
        if bias_names:  # the parent's predictions on every participant a subset can hold
            model, _card = load_model(parent)
            pool = [ev.EvalItem(i.id, i.image, i.mask, i.age) for i in others]
            pooled, _ = ev.predict_items(model, pool, mc_samples=1, device=args.device)
            test_pred, _ = ev.predict_items(model, test, mc_samples=1, device=args.device)
            parent_pred = dict(zip([i.id for i in pool], pooled.tolist(), strict=True))
            for size, r in bias_names:
                chosen = subset(size, r)
                record(name("biascorr", size, r),
                       {**_bias_corrected(chosen, test, parent_pred, test_pred),
                        "subset": [i.id for i in chosen]})
    # Cheap runs first: every fine-tune, then training from scratch, smallest subsets first.
    scratch_sizes = args.scratch_sizes or args.sizes
    for kind, recipe, sizes in (("fine", FINETUNE, args.sizes),
                                ("scratch", SCRATCH, scratch_sizes)):
        for size in sizes:
            for repeat in range(args.repeats):
                run = name(kind, size, repeat)
                if run in done:
                    continue
                chosen = subset(size, repeat)
                path = _train(run, chosen, args, recipe,
                              parent=parent_spec if kind == "fine" else None)
                record(run, {**_score(path, test, args), "subset": [i.id for i in chosen]})
    print(_table(_rows(done, args)))
    return 0


def _rows(done: dict[str, dict], args: argparse.Namespace) -> dict[str, list[dict]]:
    """The finished runs grouped into the table's rows."""
    rows: dict[str, list[dict]] = {}
    if "ft-parent" in done:
        rows["parent alone"] = [done["ft-parent"]]
    for kind, label in (("biascorr", "parent + bias correction"),
                        ("fine", "fine-tuned"), ("scratch", "from scratch")):
        for size in sorted(set(args.sizes) | set(args.scratch_sizes or [])):
            names = [_run_name(kind, size, r, args.site_gamma) for r in range(args.repeats)]
            runs = [done[name] for name in names if name in done]
            if runs:
                rows[f"{label}, {size}"] = runs
    return rows


if __name__ == "__main__":
    sys.exit(main())
