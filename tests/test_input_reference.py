"""The intensity QC reference: percentiles, distance, threshold from training images only."""

from __future__ import annotations

import numpy as np
import pytest

from brainage_bids.model.input_reference import (
    LEVELS,
    THRESHOLD_FACTOR,
    distance,
    fit_reference,
    input_quantiles,
    intensity_check,
)
from brainage_bids.model.intensity import normalise_intensity


def _brain(rng: np.random.Generator, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A two-tissue 'brain' (grey and white matter intensities) inside a cubic mask."""
    mask = np.zeros((20, 20, 20), bool)
    mask[3:17, 3:17, 3:17] = True
    volume = np.where(rng.random(mask.shape) < 0.45, 60.0, 60.0 + 40.0 * contrast)
    volume = volume + rng.normal(0, 6, mask.shape)
    return np.where(mask, volume, 0.0), mask


def test_the_threshold_comes_from_the_training_images_alone():
    rng = np.random.default_rng(0)
    training = [normalise_intensity(*_brain(rng)) for _ in range(12)]
    mask = _brain(rng)[1]
    quantiles = [input_quantiles(v, mask) for v in training]
    reference = fit_reference(quantiles)
    assert len(reference["quantiles"]) == len(LEVELS) == 99
    loo = reference["distance_leave_one_out"]
    assert reference["threshold"] == pytest.approx(THRESHOLD_FACTOR * loo["max"], abs=1e-4)
    assert 0 < loo["median"] <= loo["p95"] <= loo["max"]
    assert reference["n_images"] == reference["n_participants"] == 12
    with pytest.raises(ValueError, match="at least 5 participants"):
        fit_reference(quantiles[:4])


def test_a_participants_other_sessions_are_left_out_with_it():
    rng = np.random.default_rng(3)
    mask = _brain(rng)[1]
    odd = input_quantiles(normalise_intensity(*_brain(rng, contrast=0.5)), mask)
    others = [input_quantiles(normalise_intensity(*_brain(rng)), mask) for _ in range(8)]
    by_image = fit_reference([odd, odd, *others])  # one odd participant, scanned twice
    by_participant = fit_reference([odd, odd, *others], groups=["a", "a", *"bcdefghi"])
    assert by_participant["n_participants"] == 9 and by_participant["n_images"] == 10
    # counted as two participants, each session of the odd one hides behind the other
    assert by_participant["distance_leave_one_out"]["max"] > (
        by_image["distance_leave_one_out"]["max"] + 0.01)
    with pytest.raises(ValueError, match="participant labels"):
        fit_reference(others, groups=["a"])


def test_offset_and_scale_do_not_move_the_distance_but_a_contrast_change_fails():
    rng = np.random.default_rng(1)
    mask = _brain(rng)[1]
    reference = fit_reference(input_quantiles(normalise_intensity(*_brain(rng)), mask)
                              for _ in range(12))
    volume, _ = _brain(rng)
    plain = intensity_check(normalise_intensity(volume, mask), mask, reference)
    stored = intensity_check(normalise_intensity(volume * 0.37 - 100, mask), mask, reference)
    assert stored["intensity_distance"] == pytest.approx(plain["intensity_distance"], abs=1e-4)
    assert plain["intensity_distance_ok"]
    flat, _ = _brain(rng, contrast=0.3)  # grey and white matter barely apart: another shape
    other = intensity_check(normalise_intensity(flat, mask), mask, reference)
    assert not other["intensity_distance_ok"]
    assert other["intensity_distance"] > reference["threshold"]


def test_a_card_without_a_reference_adds_no_check():
    rng = np.random.default_rng(2)
    volume, mask = _brain(rng)
    assert intensity_check(normalise_intensity(volume, mask), mask, None) == {}
    reference = fit_reference(input_quantiles(normalise_intensity(*_brain(rng)), mask)
                              for _ in range(6))
    for broken in ({"quantiles": [0.0]}, {**reference, "levels": [], "quantiles": []},
                   {**reference, "levels": reference["levels"][1:]},
                   {**reference, "threshold": float("nan")}, {**reference, "threshold": -1},
                   {**reference, "levels": [2.0] * 99}, "not a dict"):
        with pytest.raises(ValueError, match="input_reference is malformed"):
            intensity_check(normalise_intensity(volume, mask), mask, broken)
    coarse = {**reference, "levels": reference["levels"][::2],
              "quantiles": reference["quantiles"][::2]}  # a card with other levels still works
    assert intensity_check(normalise_intensity(volume, mask), mask, coarse)[
        "intensity_distance"] == pytest.approx(intensity_check(
            normalise_intensity(volume, mask), mask, reference)["intensity_distance"], abs=0.01)
    with pytest.raises(ValueError, match="differ in length"):
        distance([0.0, 1.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        input_quantiles(volume, np.zeros_like(mask))
