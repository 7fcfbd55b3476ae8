"""Safe persistence of trained models and the registry of shipped ones.

Weights are data, not code: they are stored as safetensors (a flat tensor container that
cannot execute anything on load) beside a JSON model card, and every load verifies the
weights' sha256 against the card (and the registry, for shipped models) so that a truncated
download or a swapped file is an error rather than a silent wrong prediction. Nothing here
unpickles anything.

A model on disk is two files with one stem::

    <name>.safetensors   the state dict (contiguous tensors, metadata: architecture JSON)
    <name>.json          the model card (architecture, training, metrics, ``sha256``)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainage_bids.io import atomic_write_bytes, atomic_write_json, sha256_file
from brainage_bids.model.predict import resolve_device

WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
#: The registry of shipped models (``brainage_bids/data/models/registry.json``).
REGISTRY_FILE = Path(str(resources.files("brainage_bids") / "data" / "models" / "registry.json"))


class ModelError(ValueError):
    """A model that cannot be found, verified or built; the message is meant for users."""


# --------------------------------------------------------------------------- architectures

def _build_brainagenet(arch: dict[str, Any]) -> nn.Module:
    from brainage_bids.model.net import BrainAgeNet

    kwargs = {key: arch[key] for key in ("attention", "attention_kernel", "dropout",
                                         "in_channels", "channels") if key in arch}
    return BrainAgeNet(**kwargs)


def _build_sfcn(arch: dict[str, Any]) -> nn.Module:
    # Imported lazily: the peer architecture lives in its own module and may be absent.
    from brainage_bids.model.sfcn import SFCN

    kwargs = {key: value for key, value in arch.items() if key not in _CARD_ONLY_KEYS}
    return SFCN(**kwargs)


def _build_ensemble(arch: dict[str, Any]) -> nn.Module:
    from brainage_bids.model.ensemble import ENSEMBLE_NAME, BrainAgeEnsemble

    member = dict(arch.get("member") or {})
    count = arch.get("n_members")
    if member.get("name") in (None, ENSEMBLE_NAME) or not isinstance(count, int) or count < 1:
        raise ValueError("an ensemble needs 'n_members' >= 1 and a 'member' architecture")
    return BrainAgeEnsemble([build_model(member) for _ in range(count)])


#: Extension point: architecture name in a model card -> builder taking the card's
#: ``architecture`` dict. Builders import their network lazily and ignore card-only keys.
ARCHITECTURES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "BrainAgeNet": _build_brainagenet,
    "SFCN": _build_sfcn,
    "BrainAgeEnsemble": _build_ensemble,
}
_CARD_ONLY_KEYS = frozenset({"name", "n_parameters"})


def count_parameters(model: nn.Module) -> int:
    """All parameters, each shared tensor counted once (as the paper counts them).

    Frozen ones count too: freezing the trunk for fine-tuning does not change the model.
    """
    return sum(p.numel() for p in model.parameters())


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """The card's ``architecture`` entry: everything :func:`build_model` needs, plus a count.

    Unwraps ``DistributedDataParallel``/``torch.compile`` wrappers first.
    """
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    from brainage_bids.model.ensemble import ENSEMBLE_NAME, BrainAgeEnsemble
    from brainage_bids.model.net import BrainAgeNet

    if isinstance(model, BrainAgeEnsemble):
        arch = {"name": ENSEMBLE_NAME, "n_members": len(model),
                "member": describe_architecture(model.members[0])}
    elif isinstance(model, BrainAgeNet):
        sa = model.attention_module(0)
        arch: dict[str, Any] = {
            "name": "BrainAgeNet",
            "attention": model.attention,
            "attention_kernel": int(sa.conv.kernel_size[0]) if sa is not None else None,
            "dropout": float(model.dropout_conv.p),
            "in_channels": int(model.blocks[0].conv.in_channels),
            "channels": [int(block.conv.out_channels) for block in model.blocks],
        }
        if arch["attention_kernel"] is None:
            del arch["attention_kernel"]
    elif type(model).__name__ == "SFCN":  # by name: its module is imported lazily
        convs = [m for m in model.feature_extractor.modules() if isinstance(m, nn.Conv3d)]
        arch = {"name": "SFCN", "age_range": [float(v) for v in model.age_range],
                "bin_width": float(model.bin_width), "dropout": float(model.classifier[1].p),
                "in_channels": int(convs[0].in_channels),
                "channels": [int(c.out_channels) for c in convs]}
    elif hasattr(model, "architecture"):  # peers may describe themselves
        arch = dict(model.architecture())
    else:
        raise ModelError(f"cannot describe a {type(model).__name__}; give save_model a card "
                         "with an 'architecture' entry")
    arch["n_parameters"] = count_parameters(model)
    return arch


def build_model(architecture: dict[str, Any]) -> nn.Module:
    """Instantiate the (untrained) network a card's ``architecture`` entry describes.

    When the card records ``n_parameters`` the built network must have exactly that many,
    which catches weights that were trained with a different version of the code.
    """
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    try:
        model = ARCHITECTURES[name](architecture)
    except ModelError:
        raise
    except Exception as exc:  # whatever a malformed entry makes the network raise
        raise ModelError(f"cannot build {name} from {architecture}: {exc}") from exc
    expected = architecture.get("n_parameters")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
        raise ModelError(f"n_parameters {expected!r} is not an integer")
    if expected is not None and count_parameters(model) != expected:
        raise ModelError(f"{name} built from the card has {count_parameters(model)} "
                         f"parameters but the card says {expected}")
    return model


# --------------------------------------------------------------------------- save / load

def save_model(model: nn.Module, path: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (safetensors) and the card beside it; return the completed card.

    The card gets ``file`` (the weights' file name), ``sha256`` and, when absent, an
    ``architecture`` derived from the model. Both files are written atomically and the card
    last, so an interrupted save never leaves a card that vouches for missing weights.
    """
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise ValueError(f"weights must be saved as *{WEIGHTS_SUFFIX}, got {path.name}")
    card = dict(card)
    card.setdefault("architecture", describe_architecture(model))
    module = getattr(model, "module", model)
    module = getattr(module, "_orig_mod", module)
    # safetensors wants contiguous, unshared CPU tensors (channels_last params are not).
    state = {key: value.detach().to("cpu").contiguous().clone()
             for key, value in module.state_dict().items()}
    # One metadata key only: safetensors writes metadata in hash-map order, which varies
    # between processes, and identical weights should give identical bytes (and sha256).
    metadata = {"architecture": json.dumps(card["architecture"], sort_keys=True)}
    atomic_write_bytes(path, safetensors_bytes(state, metadata=metadata))
    card["file"] = path.name
    card["sha256"] = sha256_file(path)
    atomic_write_json(path.with_suffix(CARD_SUFFIX), card)
    return card


def registry(registry_file: str | Path | None = None) -> dict[str, Any]:
    """The registry of shipped models: ``{"default": name | None, "models": [entry, ...]}``.

    Each entry has ``name``, ``file`` and ``card`` (paths relative to the registry),
    ``sha256``, ``training_cohort`` and ``age_range``.
    """
    path = Path(registry_file) if registry_file is not None else REGISTRY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"the model registry {path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"the model registry {path} is not valid JSON: {exc}") from exc
    models = data.get("models")
    if not isinstance(models, list):
        raise ModelError(f"the model registry {path} has no 'models' list")
    for entry in models:
        missing = {"name", "file", "card", "sha256"} - set(entry)
        if missing:
            raise ModelError(f"registry entry {entry.get('name', entry)!r} lacks "
                             f"{sorted(missing)}")
    return data


def _resolve_registry(name: str, registry_file: str | Path | None) -> tuple[Path, str]:
    """Registry name -> (card path, sha256 the registry vouches for)."""
    path = Path(registry_file) if registry_file is not None else REGISTRY_FILE
    data = registry(path)
    entries = {entry["name"]: entry for entry in data["models"]}
    if name == "default":
        if data.get("default") is None:
            raise ModelError("no model ships yet; pass --model PATH (a .safetensors file, its "
                             ".json card, or a train-level OUTPUT_DIR/models directory)")
        name = data["default"]
    if name not in entries:
        known = ", ".join(["default", *sorted(entries)])
        raise ModelError(f"unknown model {name!r}: not a file and not in the registry "
                         f"(known names: {known})")
    entry = entries[name]
    card = path.parent / entry["card"]
    weights = path.parent / entry["file"]
    if not weights.is_file():
        raise ModelError(f"model {name!r} is registered but its weights {weights} are missing")
    return card, entry["sha256"]


def _find_in_directory(directory: Path) -> Path:
    cards = sorted(p.with_suffix(CARD_SUFFIX) for p in directory.glob(f"*{WEIGHTS_SUFFIX}")
                   if not p.name.startswith("."))
    if len(cards) != 1:
        found = ", ".join(p.name for p in cards) or "none"
        raise ModelError(f"{directory} must hold exactly one *{WEIGHTS_SUFFIX} model; "
                         f"found {found}. Pass the model's file instead")
    return cards[0]


_MODEL_SPECS = ("--model takes a shipped name ('default', or a name 'brainage-bids --help' "
                "and docs/usage.md list), a .safetensors file with its .json card beside it, "
                "or a train level's OUTPUT_DIR/models folder")


def resolve_model(spec: str | Path, *,
                  registry_file: str | Path | None = None) -> tuple[Path, Path, str | None]:
    """``spec`` -> (card path, weights path, sha256 vouched for by the registry or None)."""
    path = Path(spec)
    registry_sha = None
    if path.is_dir():
        card_path = _find_in_directory(path)
    elif path.suffix == WEIGHTS_SUFFIX:
        card_path = path.with_suffix(CARD_SUFFIX)
        if not path.is_file():
            raise ModelError(f"model weights {path} not found; {_MODEL_SPECS}")
    elif path.suffix == CARD_SUFFIX:
        card_path = path
    elif path.exists():
        raise ModelError(f"cannot use {spec!s} as a model: give a registry name, a "
                         f"*{WEIGHTS_SUFFIX} file, its *{CARD_SUFFIX} card or a directory")
    elif len(path.parts) > 1:
        raise ModelError(f"model {spec!s} not found; {_MODEL_SPECS}")
    else:
        card_path, registry_sha = _resolve_registry(str(spec), registry_file)
    if not card_path.is_file():
        raise ModelError(f"model card {card_path} not found (a model is a *{WEIGHTS_SUFFIX} "
                         f"file with its *{CARD_SUFFIX} card beside it)")
    card = read_card(card_path)
    weights = card_path.parent / card.get("file", card_path.with_suffix(WEIGHTS_SUFFIX).name)
    if not weights.is_file():
        raise ModelError(f"model weights {weights} (named by {card_path.name}) not found")
    return card_path, weights, registry_sha


def _is_number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def card_problem(card: dict[str, Any]) -> str | None:
    """What makes a parsed card unusable, checking the entries it has and the code reads:
    ``None`` when there is nothing wrong with them."""
    for key in ("name", "sha256", "file"):
        if key in card and not isinstance(card[key], str):
            return f"{key!r} is not a string"
    if "file" in card and (Path(card["file"]).name != card["file"]
                           or card["file"] in ("", ".", "..")):
        return f"'file' {card['file']!r} is not a file name beside the card"
    arch = card.get("architecture")
    if arch is not None:
        if not isinstance(arch, dict):
            return "'architecture' is not a JSON object"
        if "member" in arch and not isinstance(arch["member"], dict):
            return "'architecture.member' is not a JSON object"
    bias = card.get("bias_correction")
    if bias is not None:
        if not isinstance(bias, dict):
            return "'bias_correction' is not a JSON object"
        for method in ("beheshti", "cole"):
            coefs = bias.get(method)
            if coefs is None or (isinstance(coefs, dict) and "error" in coefs):
                continue  # none fitted: the group level fits its own
            if not isinstance(coefs, dict) or not all(
                    _is_number(coefs.get(k)) for k in ("slope", "intercept")):
                return f"'bias_correction.{method}' has no numeric slope and intercept"
            if method == "cole" and coefs["slope"] == 0:
                return "'bias_correction.cole' has slope 0 (its correction divides by it)"
    return None


def parse_card(card_path: str | Path) -> dict[str, Any]:
    """A card file as a checked JSON object (:func:`card_problem`), or a :class:`ModelError`
    naming the file; it may lack the weights' entries (a group level needs only its name,
    checksum and bias correction)."""
    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model card {card_path}: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelError(f"{card_path} is not a model card (not a JSON object)")
    if (problem := card_problem(card)) is not None:
        raise ModelError(f"{card_path}: {problem}")
    return card


def read_card(card_path: str | Path) -> dict[str, Any]:
    """Parse a model card, with a user-facing error for anything that is not one."""
    card_path = Path(card_path)
    card = parse_card(card_path)
    if "architecture" not in card or "sha256" not in card:
        raise ModelError(f"{card_path} is not a model card (needs 'architecture' and 'sha256')")
    if card.get("input_reference") is not None:  # its intensity QC must work for every image
        from brainage_bids.model.input_reference import check_reference

        try:
            check_reference(card["input_reference"])
        except ValueError as exc:
            raise ModelError(f"{card_path}: {exc}") from exc
    return card


def load_model(spec: str | Path, device: str | torch.device = "cpu", *,
               registry_file: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a verified model in eval mode, with its card.

    Parameters
    ----------
    spec:
        A registry name (``"default"`` or an entry's name), a ``.safetensors`` file, its
        ``.json`` card, or a directory holding exactly one model (the train level's
        ``OUTPUT_DIR/models``).
    device:
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.

    Returns
    -------
    (model, card)
        The card as stored, plus ``weights_path`` (absolute) for provenance records.

    Raises
    ------
    ModelError
        Unknown name, missing file, empty registry, a sha256 that does not match the card
        or the registry, or weights that do not fit the card's architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path, weights, registry_sha = resolve_model(spec, registry_file=registry_file)
    card = read_card(card_path)
    digest = sha256_file(weights)
    for source, expected in (("model card", card["sha256"]), ("registry", registry_sha)):
        if expected is not None and digest != expected:
            raise ModelError(f"sha256 of {weights} is {digest} but the {source} expects "
                             f"{expected}: the file is corrupt or was replaced")
    try:
        model = build_model(card["architecture"])
    except ModelError as exc:
        raise ModelError(f"{card_path}: {exc}") from exc
    try:
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise ModelError(f"the weights in {weights} do not fit the card's architecture: "
                         f"{exc}") from exc
    model.to(resolve_device(device)).eval()
    card = dict(card)
    card["weights_path"] = str(weights.resolve())
    return model, card
