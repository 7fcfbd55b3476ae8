"""Fine-tuning (``train --init-from``): start from a parent's weights, freeze, resume, lineage.

The engine parts run on the tiny 32^3 data of tests/test_train.py; the CLI checks use the
shipped model's card (no training).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brainage_bids.cli.parser import FINETUNE_DEFAULTS, UsageError, parse_settings
from brainage_bids.cli.run import main
from brainage_bids.model.train import train_model
from brainage_bids.model.train_config import split_stratified
from tests.test_train import _config, _make_items


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    items = _make_items(tmp_path_factory.mktemp("data"), 12)
    return split_stratified(items, 0.25, seed=3)


@pytest.fixture(scope="module")
def parent(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parent")
    train, val = data
    card = train_model(_config(epochs=2, model_name="parent"), train, val, root / "models",
                       work_dir=root / "work", progress=False)
    return root / "models" / card["file"]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_fine_tuning_starts_from_the_parent(data, parent, tmp_path: Path) -> None:
    train, val = data
    state = _state(parent)
    config = _config(epochs=1, model_name="child", lr=1e-5, init_from_sha256="abc")
    card = train_model(config, train, val, tmp_path / "m", work_dir=tmp_path / "w",
                       progress=False, init_state=state)
    child = _state(tmp_path / "m" / card["file"])
    # one epoch at lr 1e-5 from the parent: close to it, not a fresh initialisation
    moved = max(float((child[k] - state[k]).abs().max()) for k in state)
    assert 0 < moved < 1e-2
    assert card["training"]["init"] == "parent model"
    assert card["training"]["output_bias_init"] is None


def test_freeze_trunk_trains_only_the_head(data, parent, tmp_path: Path) -> None:
    train, val = data
    state = _state(parent)
    config = _config(epochs=1, model_name="frozen", lr=1e-3, init_from_sha256="abc",
                     freeze_trunk=True)
    card = train_model(config, train, val, tmp_path / "m", work_dir=tmp_path / "w",
                       progress=False, init_state=state)
    child = _state(tmp_path / "m" / card["file"])
    for key in state:
        same = torch.equal(child[key], state[key])
        assert same != key.startswith("dense."), key
    assert card["training"]["freeze_trunk"] is True


def test_parent_and_sha_go_together(data, parent, tmp_path: Path) -> None:
    train, val = data
    with pytest.raises(ValueError, match="go together"):
        train_model(_config(epochs=1), train, val, tmp_path / "m", work_dir=tmp_path / "w",
                    init_state=_state(parent))
    with pytest.raises(ValueError, match="freeze_trunk needs"):
        _config(freeze_trunk=True)


def test_resume_refuses_another_parent(data, parent, tmp_path: Path) -> None:
    train, val = data
    config = _config(epochs=1, model_name="child", init_from_sha256="parent-a")
    train_model(config, train, val, tmp_path / "m", work_dir=tmp_path / "w",
                progress=False, init_state=_state(parent))
    other = dataclasses.replace(config, epochs=2, init_from_sha256="parent-b")
    with pytest.raises(ValueError, match="different training options"):
        train_model(other, train, val, tmp_path / "m", work_dir=tmp_path / "w",
                    progress=False, init_state=_state(parent), resume=True)
    # the same parent resumes: one more epoch on top of the checkpoint
    longer = dataclasses.replace(config, epochs=2)
    card = train_model(longer, train, val, tmp_path / "m", work_dir=tmp_path / "w",
                       progress=False, init_state=_state(parent), resume=True)
    assert card["training"]["epochs_run"] == 2


def _args(tmp_path: Path, sample_bids: Path, *extra: str) -> list[str]:
    return [str(sample_bids), str(tmp_path / "out"), "train", *extra]


def test_fine_tuning_defaults_come_from_the_parent(tmp_path, sample_bids) -> None:
    settings = parse_settings(_args(tmp_path, sample_bids, "--init-from", "default"))
    assert settings.epochs == FINETUNE_DEFAULTS["epochs"]
    assert settings.lr == FINETUNE_DEFAULTS["lr"]
    assert settings.patience == FINETUNE_DEFAULTS["patience"]
    assert settings.attention == "shared" and settings.dropout == 0.2
    # the default parent is the 5-member ixi-2mm-v2: every member is fine-tuned, one per fold
    assert settings.folds == 5
    plain = parse_settings(_args(tmp_path, sample_bids))
    assert (plain.epochs, plain.lr, plain.folds) == (250, 1e-4, 1)


@pytest.mark.parametrize(("extra", "match"), [
    (["--init-from", "default", "--attention", "none"], "contradicts the parent"),
    (["--init-from", "default", "--dropout", "0.5"], "contradicts the parent"),
    (["--init-from", "default", "--folds", "3"], "has 5 members"),
    (["--init-from", "no-such-model"], "unknown model"),
    (["--freeze-trunk"], "needs --init-from"),
])
def test_contradicting_options_are_usage_errors(tmp_path, sample_bids, extra, match) -> None:
    with pytest.raises(UsageError, match=match):
        parse_settings(_args(tmp_path, sample_bids, *extra))


@pytest.mark.parametrize(("change", "match"), [
    (lambda card: card.update(architecture=["x"]), "'architecture' is not a JSON object"),
    (lambda card: card["architecture"].update(n_members="two"), "n_members 'two' is not"),
    (lambda card: card.update(file=5), "'file' is not a string"),
])
def test_a_malformed_parent_card_is_a_usage_error(tmp_path, sample_bids, change, match) -> None:
    from brainage_bids.model.weights import resolve_model

    card_path, weights, _ = resolve_model("default")
    parent = tmp_path / "parent"
    parent.mkdir()
    card = json.loads(card_path.read_text())
    change(card)
    (parent / card_path.name).write_text(json.dumps(card))
    (parent / weights.name).symlink_to(weights)
    with pytest.raises(UsageError, match=match):
        parse_settings(_args(tmp_path, sample_bids, "--init-from", str(parent / card_path.name)))


def test_usage_error_exit_code(tmp_path, sample_bids, capsys) -> None:
    code = main(_args(tmp_path, sample_bids, "--init-from", "default", "--attention", "none"))
    assert code == 2
    assert "contradicts the parent" in capsys.readouterr().err
