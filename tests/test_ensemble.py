"""Ensembles: K-fold plans, training member by member, resume, the card, prediction.

Same tiny 32^3 data as tests/test_train.py (real template brain crops), so the whole K-fold
training runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainage_bids.model.cv import OOF_COLUMNS, plan_members, split_kfold, train_ensemble
from brainage_bids.model.ensemble import BrainAgeEnsemble
from brainage_bids.model.net import BrainAgeNet
from brainage_bids.model.predict import predict_age, predict_brain_age
from brainage_bids.model.train_config import TrainItem
from brainage_bids.model.uncertainty import calibrated_sd, coverage, fit_scale
from brainage_bids.model.weights import count_parameters, load_model
from tests.test_train import SHAPE, _config, _make_items


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[TrainItem]:
    return _make_items(tmp_path_factory.mktemp("data"), 15)


def _grouped(n: int) -> list[TrainItem]:
    """Two sessions for some participants, ages spread over 20-80."""
    out = []
    for i in range(n):
        for ses in range(1 + i % 2):
            out.append(TrainItem(f"sub-{i}_ses-{ses}", "x", "y", 20.0 + 3.0 * i + ses,
                                 group=f"sub-{i}"))
    return out


def test_kfold_groups_never_straddle_and_folds_span_ages() -> None:
    items = _grouped(20)
    folds = split_kfold(items, 5, seed=1)
    assert sorted(folds) == sorted({i.group for i in items})
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1
    for fold in range(5):  # every fold holds a participant from each age stratum of five
        ages = sorted(20.0 + 3.0 * int(g.split("-")[1]) for g, f in folds.items() if f == fold)
        assert ages[0] < 20 + 3 * 5 and ages[-1] >= 20 + 3 * 15
    assert split_kfold(list(reversed(items)), 5, seed=1) == folds
    assert split_kfold(items, 5, seed=2) != folds


def test_plans_cover_every_image_once_out_of_fold() -> None:
    items = _grouped(20)
    plans = plan_members(items, folds=4, seeds_per_fold=2, seed=7, val_fraction=0.2)
    assert len(plans) == 8 and [p.seed for p in plans] == list(range(7, 15))
    held_out = [i.id for p in plans[::2] for i in p.val]
    assert sorted(held_out) == sorted(i.id for i in items)
    for plan in plans:
        assert not {i.group for i in plan.train} & {i.group for i in plan.val}
    seeds = plan_members(items, folds=1, seeds_per_fold=3, seed=7, val_fraction=0.2)
    assert len({tuple(i.id for i in p.val) for p in seeds}) == 1


@pytest.mark.parametrize(("folds", "match"), [(1, "at least 2"), (9, "participants")])
def test_kfold_refuses_too_few(folds: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_kfold(_grouped(8), folds, seed=0)


def test_ensemble_forward_is_the_member_mean_and_counts_parameters() -> None:
    torch.manual_seed(0)
    members = [BrainAgeNet(dropout=0.2) for _ in range(3)]
    ensemble = BrainAgeEnsemble(members).eval()
    x = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        expected = torch.stack([m.eval()(x) for m in members]).mean(0)
        assert torch.allclose(ensemble(x), expected, atol=1e-5)
    assert count_parameters(ensemble) == 3 * 5_408_228


def test_flip_tta_averages_the_two_views() -> None:
    torch.manual_seed(1)
    model = BrainAgeNet(dropout=0.2).eval()
    volume = torch.randn(*SHAPE)
    plain = predict_age(model, volume, mc_samples=3)["predicted_age"]
    mirrored = predict_age(model, volume.flip(0), mc_samples=3)["predicted_age"]
    both = predict_age(model, volume, mc_samples=3, flip_tta=True)
    assert both["predicted_age"] == pytest.approx((plain + mirrored) / 2, abs=1e-4)
    assert both["mc_sd"] > 0


def test_calibration_rules() -> None:
    assert fit_scale([2.0, -4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert fit_scale([1.0], [1.0]) is None
    pred = {"mc_sd": 1.0, "member_sd": 3.0}
    mc = calibrated_sd(pred, {"calibration_scale": 4.0, "scaled": "mc_sd"})
    assert mc["sd"] == pytest.approx(5.0) and mc["calibrated"]
    raw = calibrated_sd(pred, {"calibration_scale": 2.0, "scaled": "raw_sd"})
    assert raw["sd"] == pytest.approx(2.0 * np.hypot(1.0, 3.0))
    v1 = calibrated_sd({"mc_sd": 1.5}, {"calibration_scale": 7.25})  # a version-1 card
    assert v1["sd"] == pytest.approx(1.5 * 7.25)
    assert not calibrated_sd(pred, None)["calibrated"]
    cov = coverage([1.0, -2.0, 3.0, 4.0], [2.0, 1.0, 3.5, 10.0])
    assert cov["within_1sd"] == 0.75 and cov["within_2sd"] == 1.0


def test_train_ensemble_writes_members_oof_and_card(items, tmp_path: Path) -> None:
    config = _config(epochs=2, model_name="ens")
    out, work = tmp_path / "models", tmp_path / "work"
    card = train_ensemble(config, items, out, work_dir=work, folds=3, mc_samples=3,
                          progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ens.safetensors"]
    assert card["architecture"]["name"] == "BrainAgeEnsemble"
    assert card["architecture"]["n_members"] == 3
    members = card["ensemble"]["members"]
    assert [m["fold"] for m in members] == [0, 1, 2]
    held = sorted(i for m in members for i in m["validation_ids"])
    assert held == sorted(i.id for i in items)
    assert all(len(m["sha256"]) == 64 and m["best_epoch"] in (1, 2) for m in members)
    rows = (out / "ens_oof.tsv").read_text().splitlines()
    assert rows[0].split("\t") == list(OOF_COLUMNS) and len(rows) == 1 + len(items)
    oof = {r.split("\t")[0]: r.split("\t") for r in rows[1:]}
    errors = [float(r[5]) for r in oof.values()]
    assert card["validation"]["mae"] == pytest.approx(np.mean(np.abs(errors)), abs=2e-3)
    assert card["validation"]["kind"] == "out-of-fold"
    assert card["uncertainty"]["scaled"] == "mc_sd"
    assert isinstance(card["inference"]["flip_tta"], bool)
    assert "beheshti" in card["bias_correction"]
    # the OOF prediction of an image is its own fold's member's, never another member's
    model, loaded = load_model(out)
    assert loaded["sha256"] == card["sha256"]
    fold_of = {i: m["index"] for m in members for i in m["validation_ids"]}
    from brainage_bids.model.data import read_volume
    item = items[4]
    volume = read_volume(item.image, item.mask, SHAPE)
    own = predict_brain_age(model.members[fold_of[item.id]], volume, mc_samples=3,
                            seed=config.seed, flip_tta=card["inference"]["flip_tta"])
    assert float(oof[item.id][4]) == pytest.approx(own["predicted_age"], abs=1e-3)
    whole = predict_brain_age(model, volume, mc_samples=3)
    assert whole["n_members"] == 3 and len(whole["member_predictions"]) == 3
    assert whole["predicted_age"] == pytest.approx(np.mean(whole["member_predictions"]))


def test_resume_reuses_finished_members(items, tmp_path: Path) -> None:
    config = _config(epochs=1, model_name="res")
    out, work = tmp_path / "models", tmp_path / "work"
    first = train_ensemble(config, items, out, work_dir=work, folds=3, mc_samples=2,
                           progress=False)
    member0 = work / "members" / "res-m0.safetensors"
    stamp = member0.stat().st_mtime_ns
    # a killed run: member 2's card is gone, its checkpoint stays
    (work / "members" / "res-m2.json").unlink()
    again = train_ensemble(config, items, out, work_dir=work, folds=3, mc_samples=2,
                           progress=False, resume=True)
    assert member0.stat().st_mtime_ns == stamp  # reused, not retrained
    assert again["sha256"] == first["sha256"]  # member 2 resumed to the same weights
    card = json.loads((out / "res.json").read_text())
    assert card["ensemble"]["members"][2]["sha256"] == first["ensemble"]["members"][2]["sha256"]
    # other options would mix two recipes in one ensemble: refused, naming the change
    with pytest.raises(ValueError, match=r"res-m0\.json \(member 0\) was trained with other "
                                         r"options \(lr 0\.0001 -> 0\.005"):
        train_ensemble(dataclasses.replace(config, lr=5e-3), items, out, work_dir=work,
                       folds=3, mc_samples=2, progress=False, resume=True)
    with pytest.raises(ValueError, match="trained on other participants or folds"):
        train_ensemble(config, items[:-2], out, work_dir=work, folds=3, mc_samples=2,
                       progress=False, resume=True)
