"""What a card fits on held-out predictions: view choices, bias correction, uncertainty."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from brainage_bids.model.held_out import OUT_OF_FOLD, VALIDATION, card_entries, summarise
from brainage_bids.model.train_config import TrainItem


def _pred(age: float, error: float, spread: float) -> dict:
    return {"predicted_age": age + error, "mc_sd": spread, "raw_sd": spread, "member_sd": 0.0}


def _rows(n: int = 12, *, jitter: bool = True, missing: int = 0) -> dict:
    """Held-out rows whose flipped predictions are better and whose jitter changes little."""
    rng = np.random.default_rng(0)
    rows = {}
    for i in range(n):
        age, spread, noise = 20.0 + 5 * i, 1.0 + 0.1 * i, rng.normal(0, 4)
        item = TrainItem(id=f"s{i:02d}", image="x.nii.gz", mask="m.nii.gz", age=age)
        rows[item.id] = {"item": item, "fold": 0, "plain": _pred(age, noise + 3, spread),
                         "tta": _pred(age, noise, spread)}
        if jitter and i >= missing:
            rows[item.id] |= {"plain_jitter": _pred(age, noise + 2.9, spread),
                              "tta_jitter": _pred(age, noise + 0.1, spread)}
    return rows


def test_single_model_fits_on_its_validation_split():
    summary = summarise(_rows(), seeds_per_fold=1, held_out=VALIDATION, n_members=1)
    entries = card_entries(summary)
    assert entries["inference"]["flip_tta"] is True  # it lowers the held-out MAE here
    assert entries["inference"]["flip_tta_chosen_by"] == "validation MAE with and without the flip"
    jitter = entries["inference"]["grid_jitter"]
    assert jitter["n"] == 8 and {"validation_mae_with", "validation_mae_without"} <= set(jitter)
    assert entries["validation"]["kind"] == "validation split"
    assert entries["validation"]["mae"] == pytest.approx(jitter["validation_mae_with"])
    uncertainty = entries["uncertainty"]
    assert (uncertainty["method"], uncertainty["formula"]) == ("mc-dropout", "sd = k * mc_sd")
    assert uncertainty["fitted_on"].startswith("validation-split predictions")
    assert "with grid jitter (" in uncertainty["fitted_on"]
    assert entries["bias_correction"]["fitted_on"] == uncertainty["fitted_on"]
    errors = np.array([r["tta_jitter"]["predicted_age"] - r["item"].age for r in _rows().values()])
    spreads = np.array([r["tta_jitter"]["mc_sd"] for r in _rows().values()])
    assert uncertainty["calibration_scale"] == pytest.approx(
        np.sqrt(np.mean((errors / spreads) ** 2)))


def test_ensemble_labels_and_jitter_off_when_an_image_lacks_native_outputs(caplog):
    with caplog.at_level(logging.WARNING, logger="brainage_bids.model.held_out"):
        summary = summarise(_rows(missing=1), seeds_per_fold=1, held_out=OUT_OF_FOLD,
                            n_members=5)
    entries = card_entries(summary)
    assert "grid_jitter" not in entries["inference"]
    assert "1 of 12 held-out image(s) lack their native-space brain" in caplog.text
    assert "s00" in caplog.text
    assert entries["uncertainty"]["method"] == "ensemble+mc-dropout"
    assert entries["uncertainty"]["formula"] == "sd = sqrt((k * mc_sd)^2 + member_sd^2)"
    assert entries["validation"]["kind"] == "out-of-fold"
    assert entries["inference"]["flip_tta_chosen_by"].startswith("out-of-fold MAE")
    assert "with grid jitter" not in entries["uncertainty"]["fitted_on"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainage_bids.model.held_out"):
        summarise(_rows(jitter=False), seeds_per_fold=1, held_out=OUT_OF_FOLD, n_members=5)
    assert "12 of 12 held-out image(s)" in caplog.text


def test_a_model_without_dropout_gets_no_uncertainty_scale():
    rows = _rows()
    for row in rows.values():
        for key in ("plain", "tta", "plain_jitter", "tta_jitter"):
            row[key] = {**row[key], "mc_sd": 0.0, "raw_sd": 0.0}
    uncertainty = summarise(rows, seeds_per_fold=1, held_out=VALIDATION,
                            n_members=1)["uncertainty"]
    assert uncertainty["method"] == "none" and uncertainty["calibration_scale"] is None
    assert uncertainty["formula"] is None


def test_fitted_on_names_the_predictions_and_the_views():
    assert OUT_OF_FOLD.fitted_on(True) == ("out-of-fold predictions with grid jitter (each "
                                           "image by the members of its own fold)")
    assert VALIDATION.fitted_on(False) == ("validation-split predictions (the images that "
                                           "also chose the best epoch)")


def test_impossible_sample_counts_fail_before_any_training(tmp_path):
    from brainage_bids.model.cv import train_ensemble
    from brainage_bids.model.held_out import validation_fits
    from brainage_bids.model.train_config import TrainConfig

    items = [r["item"] for r in _rows().values()]
    with pytest.raises(ValueError, match="mc_samples must be at least 1, got 0"):
        validation_fits(TrainConfig(), items[:3], 0)
    with pytest.raises(ValueError, match="mc_samples must be at least 1, got 0"):
        train_ensemble(TrainConfig(), items, tmp_path / "out", work_dir=tmp_path / "work",
                       folds=3, mc_samples=0)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
