"""Does fine-tuning help? Parent vs fine-tuned vs from scratch, on disjoint IXI participants.

The design (issue: site adaptation), all on the preprocessed IXI split:

1. A parent is trained on ``--parent-n`` (60) of the 120 train+validation participants of
   ``evaluation/ixi_split.json`` (age-stratified, seeded), validated on a fifth of them.
2. From the other 60, subsets of 10, 20 and 40 participants (``--sizes``) are drawn,
   ``--repeats`` (3) per size, each age-stratified with its own seed.
3. On each subset: fine-tune the parent (``--init-from``'s defaults: lr 1e-5, 60 epochs,
   patience 15; optionally ``--freeze-trunk``) and train from scratch (the paper's recipe),
   both early-stopped on a fifth of the subset.
4. Everything is scored once on the 30 test participants, beside the parent alone.

Finished runs are skipped and interrupted ones resume, so the command can be rerun::

    python evaluation/finetune_study.py --derivatives /work/runs/ixi2 --out /work/runs/ft \\
        --threads 2 --json docs/evaluation/finetune.json

On a GPU add ``--device cuda``. Prints one table (mean +- SD over the repeats).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from brainage_bids import evaluation as ev
from brainage_bids.metrics import regression_metrics
from brainage_bids.model.ensemble import members_of
from brainage_bids.model.train import TrainConfig, TrainItem, split_stratified, train_model
from brainage_bids.model.weights import load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import DEFAULT_BIDS  # noqa: E402

FINETUNE = {"epochs": 60, "lr": 1e-5, "patience": 15}
SCRATCH = {"epochs": 250, "lr": 1e-4, "patience": 40}


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
           parent: tuple[str, dict] | None = None) -> Path:
    out = args.out / "models" / name
    if (out / f"{name}.json").is_file():
        return out
    train, val = split_stratified(items, 0.2, args.seed)
    init_state, sha = None, None
    if parent is not None:
        model, card = load_model(parent[0])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--derivatives", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--split", type=Path, default=HERE / "ixi_split.json")
    parser.add_argument("--parent-n", type=int, default=60)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--freeze-trunk", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    split = json.loads(args.split.read_text())
    trainval = _items(args.derivatives, args.bids, split["trainval"])
    test = ev.preprocessed_items(args.derivatives, args.bids, split["test"])
    others, parent_items = split_stratified(trainval, args.parent_n / len(trainval), args.seed)
    parent = _train("ft-parent", parent_items, args, SCRATCH)
    rows: dict[str, list[dict]] = {"parent alone": [_score(parent, test, args)]}
    parent_spec = (str(parent), {})
    for size in args.sizes:
        for repeat in range(args.repeats):
            subset = _subset(others, size, args.seed + 1000 * size + repeat)
            tag = f"n{size}-r{repeat}"
            fine = _train(f"ft-fine-{tag}", subset, args, FINETUNE, parent=parent_spec)
            scratch = _train(f"ft-scratch-{tag}", subset, args, SCRATCH)
            for kind, path in (("fine-tuned", fine), ("from scratch", scratch)):
                rows.setdefault(f"{kind}, {size}", []).append(
                    {**_score(path, test, args), "subset": [i.id for i in subset]})
    print("| model | n | test MAE (mean +- SD) | test r | minutes per run |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        mae = np.array([r["mae"] for r in runs])
        spread = mae.std(ddof=1) if len(mae) > 1 else 0.0
        print(f"| {name} | {len(runs)} | {mae.mean():.2f} +- {spread:.2f} | "
              f"{np.mean([r['r'] for r in runs]):.3f} | "
              f"{np.mean([r['wall_time_s'] for r in runs]) / 60:.1f} |")
    if args.json:
        ev.write_json(args.json, {"design": {k: v for k, v in vars(args).items()
                                             if k not in ("json",)}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
