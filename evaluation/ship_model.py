"""Put a trained model into the package: weights, card, registry entry, and (optionally) default.

    python evaluation/ship_model.py /work/runs/ixi/models --default [--float16]

copies ``<name>.safetensors`` and ``<name>.json`` into ``brainage_bids/data/models/``, adds the
training data's licence and attribution to the card (IXI is CC BY-SA 3.0: weights trained on
it keep the attribution), and writes the registry entry (name, file, card, sha256, training
cohort, age range, licence), verified by loading the model back.

``--float16`` stores the weights as float16 (half the size: a 5-member ensemble is 54 MB
instead of 108 MB, under PyPI's 100 MB file limit). They are converted back to float32 when
loaded, so only the stored values are rounded; the card records ``storage_dtype`` and the
trained file's sha256 (``trained_sha256``). Evaluate the shipped file, not the trained one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from brainage_bids.io import atomic_write_bytes, atomic_write_text, sha256_file
from brainage_bids.model.weights import REGISTRY_FILE, ModelError, load_model, resolve_model

IXI_ATTRIBUTION = {
    "dataset": "IXI (Information eXtraction from Images), Hammersmith Hospital T1-weighted "
               "images, resampled to 2 mm",
    "url": "https://brain-development.org/ixi-dataset/",
    "licence": "CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/)",
    "attribution": "IXI data were collected as part of the IXI project (EPSRC GR/S21533/02) "
                   "by Imperial College London, King's College London and University College "
                   "London.",
}


def _cohort(card: dict) -> str:
    """One line for the registry: the data, and how it was split."""
    name, training = card["training_data"].get("name", "unknown"), card["training"]
    folds = training.get("folds", 1)
    if folds > 1:
        members = card.get("ensemble", {}).get("n_members", folds)
        return (f"{name}: {training['n_train']} participants, {folds}-fold cross-validated "
                f"ensemble of {members} members")
    return (f"{name}: {training['n_train']} training and {training['n_val']} validation "
            "participants")


def _write_float16(source: Path, dest: Path) -> None:
    """``source``'s tensors, floating ones as float16, with the same metadata, at ``dest``."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    state = {key: value.half() if value.is_floating_point() else value
             for key, value in sorted(state.items())}
    atomic_write_bytes(dest, save(state, metadata=metadata))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="trained model: directory, .safetensors or .json card")
    parser.add_argument("--default", action="store_true", help="make it --model's default")
    parser.add_argument("--registry", type=Path, default=REGISTRY_FILE)
    parser.add_argument("--float16", action="store_true",
                        help="store the weights as float16 (loaded back as float32)")
    args = parser.parse_args(argv)
    try:
        card_path, weights, _ = resolve_model(args.model)
        card = json.loads(card_path.read_text())
        if sha256_file(weights) != card["sha256"]:
            raise ModelError(f"{weights} does not match its card's sha256")
    except (ModelError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"ship_model: {exc}", file=sys.stderr)
        return 1

    name = card["name"]
    dest = args.registry.parent
    card.setdefault("training_data", {})
    card["training_data"].update({k: v for k, v in IXI_ATTRIBUTION.items()
                                  if k not in card["training_data"]})
    card["file"] = f"{name}.safetensors"
    if args.float16:
        _write_float16(weights, dest / card["file"])
        card["trained_sha256"] = card["sha256"]
        card["sha256"] = sha256_file(dest / card["file"])
        card["storage_dtype"] = "float16"
    else:
        shutil.copyfile(weights, dest / card["file"])
    atomic_write_text(dest / f"{name}.json", json.dumps(card, indent=2) + "\n")

    registry = json.loads(args.registry.read_text())
    entry = {
        "name": name, "file": card["file"], "card": f"{name}.json",
        "sha256": card["sha256"],
        "training_cohort": _cohort(card),
        "age_range": card["training"]["age_range"],
        "licence": IXI_ATTRIBUTION["licence"],
    }
    registry["models"] = [m for m in registry["models"] if m["name"] != name] + [entry]
    if args.default:
        registry["default"] = name
    atomic_write_text(args.registry, json.dumps(registry, indent=2) + "\n")
    _, loaded = load_model(name, registry_file=args.registry)
    print(f"shipped {name} ({loaded['sha256'][:12]}) to {dest}"
          f"{' as the default' if args.default else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
