"""Safe model persistence: safetensors + card, sha256 verification, the registry."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from brainage_bids.io import sha256_file
from brainage_bids.model import weights
from brainage_bids.model.net import BrainAgeNet
from brainage_bids.model.weights import (
    ModelError,
    build_model,
    describe_architecture,
    load_model,
    registry,
    save_model,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One small-input BrainAgeNet saved once; tests copy it where they mutate it."""
    torch.manual_seed(0)
    model = BrainAgeNet(attention="separate", attention_kernel=3, dropout=0.2).eval()
    root = tmp_path_factory.mktemp("models")
    card = save_model(model, root / "m.safetensors", {"name": "m", "training": {"n": 1}})
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = model(x)
    return root, card, x, expected


def _copy(saved, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(saved[0], root)
    return root


def test_save_writes_card_with_sha256_and_architecture(saved):
    root, card, _, _ = saved
    on_disk = json.loads((root / "m.json").read_text())
    assert on_disk == card
    assert card["sha256"] == sha256_file(root / "m.safetensors")
    assert card["file"] == "m.safetensors"
    assert card["training"] == {"n": 1}
    arch = card["architecture"]
    assert arch["name"] == "BrainAgeNet"
    assert (arch["attention"], arch["attention_kernel"], arch["dropout"]) == ("separate", 3, 0.2)
    assert arch["n_parameters"] == sum(p.numel() for p in BrainAgeNet(
        attention="separate", attention_kernel=3).parameters())


def test_weights_file_is_plain_safetensors(saved):
    # 8-byte little-endian header length, then a JSON header: nothing executable inside
    data = (saved[0] / "m.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert json.loads(header["__metadata__"]["architecture"])["attention"] == "separate"
    assert "sa" not in header and "sas.0.conv.weight" in header


@pytest.mark.parametrize("spec", ["m.safetensors", "m.json", "."])
def test_load_by_weights_card_or_directory(saved, spec):
    root, card, x, expected = saved
    model, loaded_card = load_model(root / spec)
    assert not model.training
    assert loaded_card["sha256"] == card["sha256"]
    assert loaded_card["weights_path"] == str((root / "m.safetensors").resolve())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_channels_last_models_save_contiguous(tmp_path):
    model = BrainAgeNet(attention="none").to(memory_format=torch.channels_last_3d)
    save_model(model, tmp_path / "cl.safetensors", {})
    loaded, _ = load_model(tmp_path / "cl.safetensors")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_corrupted_weights_fail_sha256(saved, tmp_path):
    root = _copy(saved, tmp_path)
    path = root / "m.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"sha256 .* corrupt or was replaced"):
        load_model(path)


def test_missing_files_and_ambiguous_directories(saved, tmp_path):
    root = _copy(saved, tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_model(root / "absent.safetensors")
    shutil.copy(root / "m.safetensors", root / "n.safetensors")
    with pytest.raises(ModelError, match="exactly one"):
        load_model(root)
    with pytest.raises(ModelError, match=r"model card .*n\.json not found"):
        load_model(root / "n.safetensors")
    (root / "m.safetensors").unlink()
    with pytest.raises(ModelError, match=r"m\.safetensors .* not found"):
        load_model(root / "m.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="found none"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelError, match="not found"):
        load_model(root / "no" / "such")
    (root / "x.txt").write_text("hi")
    with pytest.raises(ModelError, match="cannot use"):
        load_model(root / "x.txt")


def test_card_that_does_not_fit_the_weights(saved, tmp_path):
    root = _copy(saved, tmp_path)
    card = json.loads((root / "m.json").read_text())
    card["architecture"]["attention"] = "shared"
    del card["architecture"]["n_parameters"]
    (root / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not fit"):
        load_model(root)
    card["architecture"]["n_parameters"] = 1
    (root / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="parameters but the card says 1"):
        load_model(root)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(architecture=["x"]), "'architecture' is not a JSON object"),
    (lambda c: c["architecture"].update(channels=[-4] * 7), "cannot build BrainAgeNet"),
    (lambda c: c["architecture"].update(n_parameters="many"), "n_parameters 'many' is not"),
    (lambda c: c.update(file=5), "'file' is not a string"),
    (lambda c: c.update(file="../m.safetensors"), "is not a file name beside the card"),
    (lambda c: c.update(bias_correction=["x"]), "'bias_correction' is not a JSON object"),
    (lambda c: c.update(bias_correction={"beheshti": {"slope": "x", "intercept": 1}}),
     "'bias_correction.beheshti' has no numeric slope and intercept"),
    (lambda c: c.update(bias_correction={"cole": {"slope": 0, "intercept": 1}}),
     "'bias_correction.cole' has slope 0"),
])
def test_a_malformed_card_is_one_line_naming_it(saved, tmp_path, change, message):
    root = _copy(saved, tmp_path)
    card = json.loads((root / "m.json").read_text())
    change(card)
    (root / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError) as exc:
        load_model(root)
    assert str(exc.value).startswith(str(root / "m.json")) and message in str(exc.value), exc
    # a card that is not UTF-8
    (root / "m.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ModelError, match=r"cannot read model card .*m\.json"):
        load_model(root)


def test_a_card_without_a_fitted_correction_is_fine():
    from brainage_bids.model.weights import card_problem

    assert card_problem({"bias_correction": {"beheshti": {"error": "too few"},
                                             "fitted_on": "validation"}}) is None


def test_build_model_extension_point(monkeypatch):
    assert isinstance(build_model({"name": "BrainAgeNet", "attention": "none"}), BrainAgeNet)
    with pytest.raises(ModelError, match="unknown architecture 'ResNet'"):
        build_model({"name": "ResNet"})
    monkeypatch.setitem(weights.ARCHITECTURES, "Tiny", lambda arch: torch.nn.Linear(2, arch["k"]))
    assert build_model({"name": "Tiny", "k": 3}).out_features == 3
    with pytest.raises(ModelError, match="cannot build BrainAgeNet"):
        build_model({"name": "BrainAgeNet", "attention": "everywhere"})


def test_describe_architecture_round_trips():
    model = BrainAgeNet(attention="none", dropout=0.1)
    arch = describe_architecture(model)
    assert "attention_kernel" not in arch
    rebuilt = build_model(arch)
    assert describe_architecture(rebuilt) == arch


def test_sfcn_peer_round_trips(tmp_path):
    sfcn = pytest.importorskip("brainage_bids.model.sfcn")
    torch.manual_seed(0)
    model = sfcn.SFCN(age_range=(20, 80), bin_width=3.0, dropout=0.3).eval()
    card = save_model(model, tmp_path / "sfcn.safetensors", {})
    assert card["architecture"]["name"] == "SFCN"
    loaded, _ = load_model(tmp_path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- registry

def test_shipped_default_model_is_verified_and_documented():
    data = registry()
    entry = next(m for m in data["models"] if m["name"] == data["default"])
    assert {"name", "file", "card", "sha256", "training_cohort", "age_range",
            "licence"} <= set(entry)
    _, card = load_model("default")  # verifies the sha256 against card and registry
    assert card["uncertainty"]["calibration_scale"] > 0
    assert card["sha256"] == entry["sha256"] and card["name"] == entry["name"]
    assert card["architecture"]["name"] == "BrainAgeEnsemble"
    assert card["architecture"]["n_members"] == len(card["ensemble"]["members"]) == 5
    member = card["architecture"]["member"]
    assert member["name"] == "BrainAgeNet" and member["attention"] == "shared"
    assert member["n_parameters"] == 5408228
    assert "CC BY-SA 3.0" in card["training_data"]["licence"]
    assert entry["age_range"] == card["training"]["age_range"]
    test = set(json.loads((REPO / "evaluation" / "ixi_split.json").read_text())["test"])
    seen = {i.removeprefix("sub-") for i in (card["training_data"]["train_ids"]
                                            + card["training_data"]["validation_ids"])}
    assert not test & seen, "the default model saw test participants"
    with pytest.raises(ModelError, match="known names: default"):
        load_model("ixi-2026")


def test_registry_entries_are_verified(saved, tmp_path):
    _copy(saved, tmp_path)
    entry = {"name": "ixi", "file": "models/m.safetensors", "card": "models/m.json",
             "sha256": saved[1]["sha256"], "training_cohort": "IXI", "age_range": [20, 80]}
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"default": "ixi", "models": [entry]}))
    model, card = load_model("default", registry_file=reg)
    assert card["sha256"] == entry["sha256"] and not model.training
    assert load_model("ixi", registry_file=reg)[1]["file"] == "m.safetensors"
    with pytest.raises(ModelError, match=r"known names: default, ixi"):
        load_model("other", registry_file=reg)
    # the card and weights agree, but the registry vouches for other bytes
    reg.write_text(json.dumps({"default": None, "models": [{**entry, "sha256": "0" * 64}]}))
    with pytest.raises(ModelError, match="the registry expects 0000"):
        load_model("ixi", registry_file=reg)
    reg.write_text(json.dumps({"default": None, "models": [{"name": "bad"}]}))
    with pytest.raises(ModelError, match="lacks"):
        registry(reg)
    reg.write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        registry(reg)


def test_model_error_is_a_value_error():
    assert issubclass(ModelError, ValueError)
