"""Inference and explanation: predict_age with MC-dropout, device choice, Grad-CAM and the
spatial-attention maps.

Inputs are the shipped MNI152NLin6Asym 2 mm brain (a real 91x109x91 image) normalised as at
run time, and a 32^3 crop of it for the quick tests.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from brainage_bids.model import BrainAgeNet
from brainage_bids.model.intensity import normalise_intensity
from brainage_bids.model.net import INPUT_SHAPE
from brainage_bids.model.predict import predict_age, resolve_device
from brainage_bids.model.saliency import (
    attention_maps,
    feature_geometry,
    gradcam_maps,
    interpolation_matrix,
    to_input_grid,
)
from brainage_bids.model.sfcn import SFCN

TEMPLATES = Path(__file__).resolve().parents[1] / "brainage_bids" / "data" / "templates"
BLOCKS = [f"block{i}" for i in range(1, 8)]


@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    """The template brain, normalised exactly as the participant level does."""
    stem = "tpl-MNI152NLin6Asym_res-02_desc-brain"
    image = np.asanyarray(nib.load(TEMPLATES / f"{stem}_T1w.nii.gz").dataobj)
    mask = np.asanyarray(nib.load(TEMPLATES / f"{stem}_mask.nii.gz").dataobj)
    volume = normalise_intensity(image, mask)
    assert volume.shape == INPUT_SHAPE
    return volume


@pytest.fixture(scope="module")
def crop(brain: np.ndarray) -> np.ndarray:
    """A 32^3 block of real brain (through the ventricles): small enough for quick tests."""
    return np.ascontiguousarray(brain[30:62, 40:72, 30:62])


def make_model(attention: str = "shared", seed: int = 0) -> BrainAgeNet:
    torch.manual_seed(seed)
    return BrainAgeNet(attention=attention)


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            assert not getattr(module, attr, {}), f"{attr} left on {name or 'model'}"


def flags(model: nn.Module) -> list[tuple[str, bool, bool]]:
    """requires_grad, training and .grad presence: what explanation must leave untouched."""
    params = [(n, p.requires_grad, p.grad is not None) for n, p in model.named_parameters()]
    return params + [(n, m.training, False) for n, m in model.named_modules()]


# --- predict_age ---------------------------------------------------------------------------

def test_eval_prediction_is_deterministic_and_matches_the_model(crop: np.ndarray) -> None:
    model = make_model()
    first = predict_age(model, crop, mc_samples=2)
    second = predict_age(model, torch.from_numpy(crop)[None], mc_samples=2)
    assert first["predicted_age"] == second["predicted_age"]
    with torch.no_grad():
        direct = model.eval()(torch.from_numpy(crop)[None, None]).item()
    assert first["predicted_age"] == pytest.approx(direct, rel=1e-6)


def test_mc_dropout_spread_and_repeatability(crop: np.ndarray) -> None:
    model = make_model()
    rng_before = torch.get_rng_state()
    result = predict_age(model, crop, mc_samples=7, seed=3, mc_batch_size=3)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG was disturbed"
    assert result["mc_samples"] == 7
    assert result["uncertainty_method"] == "mc-dropout"
    assert result["mc_sd"] > 0
    assert set(result) == {"predicted_age", "mc_mean", "mc_sd", "mc_samples",
                           "uncertainty_method", "flip_tta", "n_views", "view_sd"}
    again = predict_age(model, crop, mc_samples=7, seed=3, mc_batch_size=3)
    assert again == result
    other = predict_age(model, crop, mc_samples=7, seed=4, mc_batch_size=3)
    assert other["mc_mean"] != result["mc_mean"]
    assert other["predicted_age"] == result["predicted_age"]


class _Whole(nn.Module):
    """The same network without its trunk split: predict_age must run it whole."""

    def __init__(self, net: BrainAgeNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_trunk_once_gives_the_same_samples_as_whole_passes(crop: np.ndarray) -> None:
    """The trunk has no dropout, so running it once draws the very same dropout masks."""
    model = make_model()
    split = predict_age(model, crop, mc_samples=7, seed=3, mc_batch_size=3)
    whole = predict_age(_Whole(model), crop, mc_samples=7, seed=3, mc_batch_size=3)
    for key in ("predicted_age", "mc_mean", "mc_sd"):
        assert split[key] == pytest.approx(whole[key], abs=1e-4)
    assert split["mc_sd"] > 0


def test_single_mc_sample(crop: np.ndarray) -> None:
    result = predict_age(make_model(), crop, mc_samples=1)
    assert result["mc_samples"] == 1
    assert result["mc_sd"] == 0.0
    assert np.isfinite(result["mc_mean"])


def test_training_flags_are_restored(crop: np.ndarray) -> None:
    """Validation during training calls predict_age on a model in train mode."""
    model = make_model().train()
    before = flags(model)
    predict_age(model, crop, mc_samples=2)
    assert flags(model) == before


@pytest.mark.parametrize(("volume", "match"), [
    (np.zeros((2, 32, 32, 32), np.float32), "volume"),
    (np.zeros((32, 32), np.float32), "volume"),
    (np.full((32, 32, 32), np.nan, np.float32), "non-finite"),
])
def test_bad_volumes(volume: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        predict_age(make_model(), volume, mc_samples=1)


def test_bad_sample_count(crop: np.ndarray) -> None:
    with pytest.raises(ValueError, match="mc_samples"):
        predict_age(make_model(), crop, mc_samples=0)


def test_model_without_dropout_says_so(crop: np.ndarray) -> None:
    torch.manual_seed(0)
    model = BrainAgeNet(dropout=0.0)
    with pytest.warns(RuntimeWarning, match="no active dropout"):
        result = predict_age(model, crop, mc_samples=3)
    assert result["uncertainty_method"] == "none"
    assert result["mc_sd"] == 0.0


def test_sfcn_is_a_drop_in_peer(crop: np.ndarray) -> None:
    torch.manual_seed(0)
    result = predict_age(SFCN(), crop, mc_samples=4, mc_batch_size=4)
    assert 14.0 < result["predicted_age"] < 94.0
    assert result["mc_sd"] > 0


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.gpu
def test_gpu_prediction_matches_cpu(crop: np.ndarray) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = make_model()
    cpu = predict_age(model, crop, mc_samples=2, device="cpu")
    gpu = predict_age(model, crop, mc_samples=2, device="cuda")
    assert gpu["predicted_age"] == pytest.approx(cpu["predicted_age"], abs=1e-4)


# --- geometry of the saliency maps ---------------------------------------------------------

def test_interpolation_is_exact_on_feature_centres() -> None:
    weights = interpolation_matrix(9, 5, scale=2.0, offset=0.0)
    assert np.allclose(weights.sum(1), 1.0)
    assert np.allclose(weights[::2], np.eye(5))
    assert np.allclose(weights[1], [0.5, 0.5, 0, 0, 0])
    feature = np.arange(8, dtype=float).reshape(2, 2, 2)
    assert np.allclose(to_input_grid(feature, ((1, 1, 1), (0, 0, 0)), (2, 2, 2)), feature)


def test_feature_geometry_matches_receptive_fields() -> None:
    """The centre of each block's receptive field is where feature_geometry puts it.

    A one-channel copy of the trunk with all-ones kernels and average pooling (same kernel,
    stride and padding as the network) has receptive fields with no holes; the gradient of
    one feature voxel w.r.t. the input marks its field.
    """
    model = BrainAgeNet(attention="none")
    before, after = feature_geometry(model)
    layers: list[nn.Module] = []
    for index, block in enumerate(model.blocks[:4]):
        conv = nn.Conv3d(1, 1, block.conv.kernel_size, block.conv.stride, block.conv.padding,
                         bias=False)
        nn.init.ones_(conv.weight)
        layers.append(conv)
        for stage, geometry in (("conv", before[index]), ("pool", after[index])):
            if stage == "pool":
                layers.append(nn.AvgPool3d(block.pool.kernel_size, block.pool.stride))
            x = torch.zeros(1, 1, 40, 40, 40, requires_grad=True)
            out = nn.Sequential(*layers)(x)
            j = out.shape[2] // 2
            out[0, 0, j, j, j].backward()
            support = x.grad[0, 0].sum(dim=(1, 2)).nonzero()[:, 0].float()
            centre = float(support.min() + support.max()) / 2
            (scale, *_), (offset, *_) = geometry
            assert centre == pytest.approx(scale * j + offset), (index, stage)


# --- Grad-CAM ------------------------------------------------------------------------------

def negated(model: BrainAgeNet) -> BrainAgeNet:
    """The same network predicting minus the age: Grad-CAM must now show the other regions."""
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.dense[-1].weight.neg_()
        flipped.dense[-1].bias.neg_()
    return flipped


def assert_unit_maps(maps: dict[str, np.ndarray], keys: list[str], shape: tuple) -> None:
    assert list(maps) == keys
    for key, value in maps.items():
        assert value.shape == shape, key
        assert value.dtype == np.float32, key
        assert value.min() >= 0.0 and value.max() <= 1.0 + 1e-6, key


def test_gradcam_maps(crop: np.ndarray) -> None:
    model = make_model()
    before = flags(model)
    maps = gradcam_maps(model, crop)
    assert_unit_maps(maps, BLOCKS, crop.shape)
    assert flags(model) == before
    assert_no_hooks(model)
    flipped = gradcam_maps(negated(model), crop)
    for key in BLOCKS:
        # ReLU keeps the regions that push the age up: at random initialisation a block may
        # have none, but then the negated network must have some, and a map peaks at 1.
        peaks = (float(maps[key].max()), float(flipped[key].max()))
        assert all(p == 0.0 or p == pytest.approx(1.0) for p in peaks), key
        assert max(peaks) == pytest.approx(1.0), key
        assert not np.array_equal(maps[key], flipped[key]), key


def test_gradcam_on_a_frozen_model_in_inference_mode(crop: np.ndarray) -> None:
    """Frozen weights (requires_grad False) and a caller inside inference_mode still work."""
    model = make_model()
    model.requires_grad_(False)
    with torch.inference_mode():
        maps = gradcam_maps(model, crop)
    assert not any(p.requires_grad for p in model.parameters())
    assert_unit_maps(maps, BLOCKS, crop.shape)


def test_gradcam_refuses_other_networks(crop: np.ndarray) -> None:
    with pytest.raises(TypeError, match="no conv/act/pool blocks"):
        gradcam_maps(SFCN(), crop)


# --- attention maps ------------------------------------------------------------------------

def test_shared_attention_maps(crop: np.ndarray) -> None:
    model = make_model("shared").train()
    before = flags(model)
    maps = attention_maps(model, crop)
    assert_unit_maps(maps, [*BLOCKS, "mean"], crop.shape)
    assert flags(model) == before
    assert_no_hooks(model)
    assert all(value.max() > 0 for value in maps.values())
    assert np.allclose(maps["mean"], np.mean([maps[k] for k in BLOCKS], axis=0), atol=1e-6)
    assert np.ptp(maps["block7"]) == 0  # block 7 attends over a single voxel
    # Block 1's output voxel j sits on input voxel 2j: the map reproduces it there exactly.
    with torch.no_grad():
        features = model.blocks[0](torch.from_numpy(crop)[None, None])
        expected = model.sa.attention_map(features)[0, 0].numpy()
    assert np.allclose(maps["block1"][::2, ::2, ::2], expected, atol=1e-6)


def test_separate_attention_maps_have_no_mean(crop: np.ndarray) -> None:
    model = make_model("separate")
    maps = attention_maps(model, crop)
    assert_unit_maps(maps, BLOCKS, crop.shape)
    assert_no_hooks(model)


def test_no_attention_to_show(crop: np.ndarray) -> None:
    with pytest.raises(ValueError, match="no spatial attention"):
        attention_maps(make_model("none"), crop)


def test_maps_on_the_full_grid(brain: np.ndarray) -> None:
    """One full-size pass each: the maps land on the 91x109x91 template grid."""
    model = make_model()
    cams = gradcam_maps(model, brain)
    attention = attention_maps(model, brain)
    assert_unit_maps(cams, BLOCKS, INPUT_SHAPE)
    assert_unit_maps(attention, [*BLOCKS, "mean"], INPUT_SHAPE)
    assert any(cam.max() > 0 for cam in cams.values())
    assert_no_hooks(model)
