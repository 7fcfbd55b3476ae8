"""The paper's ablation on the IXI split: attention shared / separate / none, and SFCN.

Every variant trains with the same engine, split, optimiser (Adam), learning rate, batch
size, augmentation and number of epochs (an equal budget), selects its epoch on the same
validation set, and is then scored once on the held-out test split. The training and
validation images are those of a reference model card (the shipped model's by default), so
the ablation and the shipped model see exactly the same data.

SFCN (Peng et al. 2021) is trained as in its paper (soft labels, KL divergence over 2-year
age bins) but with the shared budget and optimiser, not its own 130-epoch SGD schedule.

With ``--shared-from-reference`` the reference model itself is the "shared" row, after a
check that it was trained with the same budget (epochs, patience, batch size, learning rate,
seed); the shipped model is then one of the compared models, not a retrained copy. With
``--shared-from DIR`` a network already trained in that directory (the shipped ensemble's
members in ``training-runs/ixi-2mm-v2/members``) is the "shared" row of a seed when it is
that run exactly: the same training and validation participants, seed and budget. v2's
member 0 is the "shared" run with seed 42 on the ablation's split, so it is not trained
twice.

Finished variants are skipped and interrupted ones resume, so the command can be rerun. With
``--json``, each finished run is written there as soon as it is scored, and a rerun keeps the
runs that the file already holds (made with the same settings) without their models: a run
of about an hour survives the loss of ``--out`` once its line is committed::

    python evaluation/ablation.py --derivatives /work/runs/ixi --out /work/runs/ablation \\
        --epochs 60 --patience 60 --seeds 42 --threads 2 --json docs/evaluation/ablation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from brainage_bids import evaluation as ev
from brainage_bids.metrics import regression_metrics
from brainage_bids.model.train import train_model
from brainage_bids.model.train_config import TrainConfig, TrainItem
from brainage_bids.model.weights import (
    ModelError,
    count_parameters,
    load_model,
    read_card,
    resolve_model,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import DEFAULT_BIDS, split_subjects, subjects_of  # noqa: E402

VARIANTS: dict[str, dict] = {
    "shared": {"architecture": "BrainAgeNet", "attention": "shared", "loss": "l1"},
    "separate": {"architecture": "BrainAgeNet", "attention": "separate", "loss": "l1"},
    "none": {"architecture": "BrainAgeNet", "attention": "none", "loss": "l1"},
    "sfcn": {"architecture": "SFCN", "loss": "kl"},
}
LABELS = {"shared": "BrainAgeNet, one shared attention module (the paper)",
          "separate": "BrainAgeNet, seven separate attention modules",
          "none": "BrainAgeNet, no attention",
          "sfcn": "SFCN (Peng et al. 2021)"}


def reference_split(card: dict, split: dict) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) subjects of the reference model's training.

    A cross-validated ensemble (the shipped ``ixi-2mm-v2``) lists every image as training and
    none as validation; each of its members trained on four folds and early-stopped on the
    fifth, so the ablation trains on its first member's split (96 and 24 for v2), which is the
    shipped recipe for one network.
    """
    train, val, test = split_subjects(card, split)
    members = (card.get("ensemble") or {}).get("members") or []
    if not val and members:
        held = set(subjects_of(members[0]["validation_ids"]))
        val = [s for s in train if s in held]
        train = [s for s in train if s not in held]
    return train, val, test


#: Training options (besides the budget and seed) that make a run the ablation's "shared" run.
RECIPE_OPTIONS = ("architecture", "attention", "loss", "dropout", "attention_kernel",
                  "weight_decay", "lr_schedule", "init", "init_from_sha256", "freeze_trunk")


def _items(derivatives: Path, bids: Path, subjects: list[str]) -> list[TrainItem]:
    return [TrainItem(id=f"sub-{it.id}", image=it.image, mask=it.mask, age=it.age,
                      group=it.id)
            for it in ev.preprocessed_items(derivatives, bids, subjects)]


def _check_budget(card: dict, args: argparse.Namespace, seed: int) -> None:
    """A trained model must have had the ablation's recipe to stand in for "shared": the
    budget, the seed, and every training option the ablation leaves at its default."""
    config = card["training"]["config"]
    defaults = TrainConfig(**VARIANTS["shared"])
    wanted = {"epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size,
              "lr": args.lr, "seed": seed, "augment": True,
              **{key: getattr(defaults, key) for key in RECIPE_OPTIONS}}
    differing = {k: (config.get(k), v) for k, v in wanted.items() if config.get(k) != v}
    if differing:
        raise ValueError(f"the reference model was trained differently (card, ablation): "
                         f"{differing}")


def trained_shared_run(directory: Path, seed: int, args: argparse.Namespace,
                       train: list[TrainItem], val: list[TrainItem]) -> Path | None:
    """The card in ``directory`` of a finished "shared" run with this seed on this split.

    A card qualifies when it trained on exactly these participants, early-stopped on exactly
    these, with this seed; it must then also have the ablation's budget (else ValueError).
    """
    if not directory.is_dir():
        raise ValueError(f"--shared-from {directory}: no such directory")
    wanted = (sorted(i.id for i in train), sorted(i.id for i in val))
    for card_path in sorted(directory.glob("*.json")):
        card = read_card(card_path)
        data = card.get("training_data") or {}
        config = (card.get("training") or {}).get("config") or {}
        split = (sorted(data.get("train_ids") or []), sorted(data.get("validation_ids") or []))
        if split == wanted and config.get("seed") == seed:
            _check_budget(card, args, seed)
            return card_path
    return None


def run_variant(name: str, seed: int, args: argparse.Namespace, train: list[TrainItem],
                val: list[TrainItem], test: list[ev.EvalItem]) -> dict:
    """Train (or reuse) one variant with one seed and score it on the test split."""
    model_name = f"ablation-{name}-seed{seed}"
    out = args.out / "models" / model_name
    card_path = out / f"{model_name}.json"
    trained = (trained_shared_run(args.shared_from, seed, args, train, val)
               if name == "shared" and args.shared_from else None)
    if name == "shared" and args.shared_from_reference:
        reference_card, out, _ = resolve_model(args.reference)  # loaded (and verified) below
        _check_budget(read_card(reference_card), args, seed)
    elif trained is not None:
        logging.info("%s: %s is this run, already trained", model_name, trained)
        out = trained
    elif not card_path.is_file():
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             seed=seed, device=args.device, model_name=model_name,
                             patience=args.patience, num_threads=args.threads,
                             **VARIANTS[name])
        logging.info("training %s (%d epochs)", model_name, args.epochs)
        train_model(config, train, val, out, work_dir=args.out / "work" / model_name,
                    resume=True, progress=sys.stderr.isatty(),
                    card_extra={"training_data": {"train_ids": [i.id for i in train],
                                                  "validation_ids": [i.id for i in val]}})
    model, card = load_model(out)
    started = time.perf_counter()
    pred, _ = ev.predict_items(model, test, mc_samples=1, device=args.device)
    seconds = time.perf_counter() - started
    metrics = regression_metrics([it.age for it in test], pred)
    training = card["training"]
    return {"variant": name, "seed": seed, "model": card.get("name"),
            "n_parameters": count_parameters(model),
            "epochs": training["epochs_run"], "best_epoch": training["best_epoch"],
            "train_wall_s": training["wall_time_s"], "device": training["device"],
            "val_mae": card["validation"]["mae"], "test": metrics,
            "test_predict_s_per_image": seconds / len(test), "sha256": card["sha256"]}


def settings(args: argparse.Namespace, card: dict) -> dict:
    """What makes two ablation runs comparable: the budget and the reference split."""
    return {"epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size,
            "lr": args.lr, "reference_model": card.get("name"),
            "shared_is_reference": args.shared_from_reference}


def recorded_runs(path: Path | None, wanted: dict) -> dict[tuple[str, int], dict]:
    """The finished runs of an earlier results file, by (variant, seed).

    A file written with other settings is refused rather than mixed in: its runs would not
    be comparable with the new ones.
    """
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        differing = {k: (data.get(k), v) for k, v in wanted.items() if data.get(k) != v}
        runs = {(r["variant"], int(r["seed"])): r for r in data.get("runs", [])}
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not an ablation results file ({exc})") from exc
    if differing:
        raise ValueError(f"{path} holds runs made with other settings (file, now): "
                         f"{differing}; choose another --json")
    return runs


def write_results(path: Path, wanted: dict, results: list[dict]) -> None:
    """The settings, the summary over seeds and every run, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ev.write_json(path, {**wanted, "summary": summarise(results), "runs": results})


def summarise(results: list[dict]) -> list[dict]:
    """Mean and sample SD over seeds per variant (SD is None for a single seed)."""
    rows = []
    for name in VARIANTS:
        runs = [r for r in results if r["variant"] == name]
        if not runs:
            continue
        row = {"variant": name, "label": LABELS[name], "seeds": [r["seed"] for r in runs],
               "n_parameters": runs[0]["n_parameters"],
               "epochs_run": [r["epochs"] for r in runs],
               "best_epochs": [r["best_epoch"] for r in runs],
               "train_minutes": float(np.mean([r["train_wall_s"] for r in runs])) / 60}
        for key in ("mae", "rmse", "r"):
            values = np.array([r["test"][key] for r in runs])
            row[key] = float(values.mean())
            row[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None
        row["val_mae"] = float(np.mean([r["val_mae"] for r in runs]))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(row: dict, key: str, digits: int) -> str:
        sd = row[f"{key}_sd"]
        return f"{row[key]:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")

    lines = ["| Variant | Parameters | Seeds | Test MAE | Test RMSE | Test r | "
             "Validation MAE | Training (min) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['n_parameters']:,} | {len(row['seeds'])} | "
                     f"{cell(row, 'mae', 2)} | {cell(row, 'rmse', 2)} | {cell(row, 'r', 3)} | "
                     f"{row['val_mae']:.2f} | {row['train_minutes']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--derivatives", type=Path, required=True,
                        help="participant-level output directory with preprocessed images")
    parser.add_argument("--out", type=Path, required=True,
                        help="where the variants' models and work files go")
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--split", type=Path, default=HERE / "ixi_split.json")
    parser.add_argument("--reference", default="default",
                        help="model whose card gives the training/validation images")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=None,
                        help="early stopping on the validation MAE (as the train level)")
    shared = parser.add_mutually_exclusive_group()
    shared.add_argument("--shared-from-reference", action="store_true",
                        help="use the reference model as the 'shared' row")
    shared.add_argument("--shared-from", type=Path, metavar="DIR",
                        help="reuse a network trained there as the 'shared' row of a seed "
                             "when it is exactly that run (same split, seed and recipe)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    try:
        _, card = load_model(args.reference)
        split = json.loads(args.split.read_text())
        train_ids, val_ids, test_ids = reference_split(card, split)
        train = _items(args.derivatives, args.bids, train_ids)
        val = _items(args.derivatives, args.bids, val_ids)
        test = ev.preprocessed_items(args.derivatives, args.bids, test_ids)
        wanted = settings(args, card)
        recorded = recorded_runs(args.json, wanted)
    except (ModelError, ValueError, OSError) as exc:
        print(f"ablation: {exc}", file=sys.stderr)
        return 1
    logging.info("%d train, %d validation, %d test images", len(train), len(val), len(test))
    results = dict(recorded)  # every recorded run stays in the file, asked for or not
    try:
        for name in args.variants:
            for seed in args.seeds:
                if (name, seed) in recorded:
                    logging.info("%s seed %d: kept from %s", name, seed, args.json)
                    continue
                results[(name, seed)] = run_variant(name, seed, args, train, val, test)
                if args.json:
                    write_results(args.json, wanted, list(results.values()))
    except (ModelError, ValueError) as exc:
        print(f"ablation: {exc}", file=sys.stderr)
        return 1
    print(table(summarise(list(results.values()))))
    if args.json:
        write_results(args.json, wanted, list(results.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
