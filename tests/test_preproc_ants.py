"""The pure-pip preprocessing backend (antspyx) and registration QC, on real images only.

The shipped IXI sample (2 mm heads, PSR orientation) always runs; Colin27 from
``../shared/data`` runs when that folder is beside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from brainage_bids.model.jitter import resample_views
from brainage_bids.preproc import ants_backend
from brainage_bids.preproc.qc import dice, registration_qc
from brainage_bids.preproc.transforms import native_to_mni_ras
from brainage_bids.templates import GRID_SHAPE, template_path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_HEAD = REPO / "examples" / "ixi-sample" / "sub-IXI013" / "anat" / "sub-IXI013_T1w.nii.gz"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} beside the checkout")
    return path


def template_mask() -> np.ndarray:
    mask = np.asarray(nib.load(str(template_path("brain", "mask"))).dataobj) > 0
    return ndi.binary_fill_holes(mask)


def centroid_mm(path: str) -> np.ndarray:
    img = nib.load(path)
    return nib.affines.apply_affine(img.affine, np.argwhere(np.asarray(img.dataobj) > 0)
                                    .mean(axis=0))


@pytest.fixture(scope="module")
def ixi_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """N4 then extract/register of one shipped IXI head, through the nipype interfaces."""
    from brainage_bids.interfaces.ants import AntsExtractRegister, N4BiasCorrect

    work = tmp_path_factory.mktemp("ixi")
    (work / "n4").mkdir()
    (work / "reg").mkdir()
    n4 = N4BiasCorrect(in_file=str(SAMPLE_HEAD), num_threads=2).run(cwd=str(work / "n4"))
    reg = AntsExtractRegister(in_file=n4.outputs.out_file, num_threads=2).run(
        cwd=str(work / "reg"))
    return {"n4": n4.outputs, "reg": reg.outputs, "work": work}


# --------------------------------------------------------------------------- fast checks
@pytest.mark.parametrize("case", ["4d", "zeros", "nan", "inf"])
def test_unusable_images_raise_value_error(tmp_path: Path, case: str) -> None:
    data = np.random.default_rng(0).random((24, 24, 24), dtype=np.float32)
    if case == "4d":
        data = np.stack([data, data], axis=-1)
    elif case == "zeros":
        data[:] = 0
    elif case == "nan":
        data[3, 4, 5] = np.nan
    else:
        data[3, 4, 5] = np.inf
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(ValueError, match=r"bad\.nii\.gz"):
        ants_backend.extract_and_register(str(path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"bad\.nii\.gz"):
        ants_backend.n4_bias_correct(str(path), str(tmp_path / "n4.nii.gz"))


def test_itk_threads_is_scoped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ants_backend.ITK_THREADS_ENV, "7")
    with ants_backend.itk_threads(2):
        assert os.environ[ants_backend.ITK_THREADS_ENV] == "2"
    assert os.environ[ants_backend.ITK_THREADS_ENV] == "7"
    monkeypatch.delenv(ants_backend.ITK_THREADS_ENV)
    with ants_backend.itk_threads(3):
        assert os.environ[ants_backend.ITK_THREADS_ENV] == "3"
    assert ants_backend.ITK_THREADS_ENV not in os.environ


def test_detector_says_head_for_ixi() -> None:
    assert not ants_backend.looks_skull_stripped(SAMPLE_HEAD)


def test_detector_on_colin27() -> None:
    assert not ants_backend.looks_skull_stripped(shared("colin27", "ch2.nii.gz"))
    assert ants_backend.looks_skull_stripped(shared("colin27", "ch2bet.nii.gz"))


def test_a_stripped_brain_with_negative_values_stays_a_stripped_brain(tmp_path: Path) -> None:
    """A brain z-scored inside its mask (values below its background of 0) is standardised
    with an exactly-zero background, however it is stored, so it is still taken for a
    stripped brain and not sent through the head path."""
    from brainage_bids.preproc.intensity import standardise_intensity
    from brainage_bids.validation import load_valid_t1w

    img = nib.load(shared("colin27", "ch2bet.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float64)
    brain = data > 0
    zscored = np.zeros_like(data)
    zscored[brain] = (data[brain] - data[brain].mean()) / data[brain].std()
    outputs = []
    for name, values in (("z", zscored), ("z-scaled", 3.0 * zscored + 5.0)):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(values.astype(np.float32), img.affine), path)
        standardised = load_valid_t1w(path)
        assert ants_backend.looks_skull_stripped(standardised), name
        outputs.append(standardised.get_fdata())
    assert np.abs(outputs[0] - outputs[1]).max() < 1e-2  # on a scale of 0-1000
    head = np.asarray(nib.load(SAMPLE_HEAD).dataobj)  # a head's zero background: as before
    shifted = np.clip(head - np.percentile(head, 0.1), 0, None)
    expected = shifted * 1000.0 / np.percentile(shifted[shifted > 0], 99.5)
    assert np.allclose(standardise_intensity(head), expected, atol=1e-3)


def test_ras_conversion_of_an_ants_affine() -> None:
    """ANTs' fixed->moving LPS matrix becomes the moving->fixed RAS matrix."""
    ras_shift = nib.affines.from_matvec(np.eye(3), [5.0, -3.0, 2.0])  # native -> MNI in RAS
    lps_fixed_to_moving = np.diag([-1.0, -1, 1, 1]) @ np.linalg.inv(ras_shift) @ np.diag(
        [-1.0, -1, 1, 1])
    assert np.allclose(ants_backend.ants_affine_to_ras(lps_fixed_to_moving), ras_shift)


# --------------------------------------------------------------------------- pipeline
@pytest.mark.slow
def test_n4_keeps_grid_and_zeros(ixi_run: dict) -> None:
    src = nib.load(str(SAMPLE_HEAD))
    out = nib.load(ixi_run["n4"].out_file)
    assert out.shape == src.shape
    assert np.allclose(out.affine, src.affine)
    before, after = np.asarray(src.dataobj), np.asarray(out.dataobj)
    assert np.array_equal(before == 0, after == 0)
    ratio = after[before > np.percentile(before, 75)] / before[before > np.percentile(before, 75)]
    assert 0.3 < np.median(ratio) < 3  # a smooth field around 1, not a rescaling


@pytest.mark.slow
def test_outputs_on_template_grid(ixi_run: dict) -> None:
    reg = ixi_run["reg"]
    tpl = nib.load(str(template_path("brain")))
    brain, mask = nib.load(reg.out_brain_mni), nib.load(reg.out_mask_mni)
    for img in (brain, mask):
        assert img.shape == GRID_SHAPE
        assert np.allclose(img.affine, tpl.affine)
    assert brain.get_data_dtype() == np.float32
    assert mask.get_data_dtype() == np.uint8
    b, m = np.asarray(brain.dataobj), np.asarray(mask.dataobj)
    assert set(np.unique(m)) == {0, 1}
    assert not b[m == 0].any()  # zeros outside the brain
    assert dice(m > 0, template_mask()) > 0.93


@pytest.mark.slow
def test_native_outputs_and_qc(ixi_run: dict) -> None:
    reg = ixi_run["reg"]
    src = nib.load(str(SAMPLE_HEAD))
    for path in (reg.out_mask_native, reg.out_brain_native):
        img = nib.load(path)
        assert img.shape == src.shape
        assert np.allclose(img.affine, src.affine)
    volume_ml = (np.asarray(nib.load(reg.out_mask_native).dataobj) > 0).sum() * 8 / 1000
    assert 1000 < volume_ml < 2000  # an adult brain, not a head
    assert json.loads(Path(reg.out_qc).read_text()) == reg.qc
    assert reg.qc["qc_pass"] is True
    assert reg.qc["mask_volume_ml"] == pytest.approx(volume_ml, rel=1e-3)


@pytest.mark.slow
def test_transform_files_agree(ixi_run: dict) -> None:
    """The text matrix maps the native brain onto the registered brain (centroids)."""
    reg = ixi_run["reg"]
    to_mni = np.loadtxt(reg.out_transform_txt)
    assert to_mni.shape == (4, 4)
    assert np.allclose(to_mni, ants_backend.ants_affine_to_ras(
        ants_backend.read_ants_affine(reg.out_transform)), atol=1e-5)
    moved = nib.affines.apply_affine(to_mni, centroid_mm(reg.out_mask_native))
    assert np.linalg.norm(moved - centroid_mm(reg.out_mask_mni)) < 2.0
    # the torch-free reader used at prediction time agrees with antspyx's
    assert np.allclose(native_to_mni_ras(reg.out_transform, "ants", reg.out_brain_native,
                                         template_path("brain")), to_mni, atol=1e-5)


@pytest.mark.slow
def test_unjittered_view_is_the_registered_brain(ixi_run: dict) -> None:
    """Grid jitter's resampling with no offset reproduces antsApplyTransforms' brain_mni."""
    reg = ixi_run["reg"]
    native, mask = nib.load(reg.out_brain_native), nib.load(reg.out_mask_native)
    template = nib.load(template_path("brain"))
    to_mni = native_to_mni_ras(reg.out_transform, "ants", reg.out_brain_native,
                               template_path("brain"))
    brains, masks = resample_views(native.get_fdata(), mask.get_fdata() > 0, native.affine,
                                   to_mni, template.affine, template.shape, np.zeros((1, 3)))
    expected = nib.load(reg.out_brain_mni).get_fdata()
    expected_mask = nib.load(reg.out_mask_mni).get_fdata() > 0
    assert (masks[0] == expected_mask).mean() > 0.9999
    inside = masks[0] & expected_mask
    assert np.abs(brains[0][inside] - expected[inside]).max() < 1e-3 * expected.max()


@pytest.mark.slow
def test_grid_jitter_follows_ants_on_a_sheared_header(ixi_run: dict, tmp_path: Path) -> None:
    """ITK cannot store a shear: ANTs works in the nearest rotation's frame, and the jitter's
    resampling must too, or its views land millimetres off the registered brain."""
    from brainage_bids.model.intensity import normalise_intensity
    from brainage_bids.model.jitter import jitter_views

    reg = ixi_run["reg"]
    native = nib.load(reg.out_brain_native)
    centre = native.affine @ np.r_[(np.array(native.shape[:3]) - 1) / 2, 1.0]
    shear = np.eye(4)
    shear[1, 2] = 0.1  # y += 0.1 z about the head's centre, in the header only
    shear[:3, 3] = -shear[:3, :3] @ centre[:3] + centre[:3]
    sheared = shear @ native.affine
    brain, mask = tmp_path / "brain.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(native.get_fdata(dtype=np.float32), sheared), brain)
    nib.save(nib.Nifti1Image(np.asarray(nib.load(reg.out_mask_native).dataobj), sheared), mask)
    ants = ants_backend._ants()
    template = ants.image_read(str(template_path("brain")))
    moving = ants_backend.to_ants(native.get_fdata(dtype=np.float32), sheared)
    moved = ants.apply_transforms(fixed=template, moving=moving,
                                  transformlist=[reg.out_transform]).numpy()
    moved_mask = ants.apply_transforms(
        fixed=template, moving=ants_backend.to_ants(
            np.asarray(nib.load(reg.out_mask_native).dataobj, dtype=np.float32), sheared),
        transformlist=[reg.out_transform]).numpy() > 0.5
    expected = normalise_intensity(moved * moved_mask, moved_mask)
    (view,) = jitter_views(brain, mask, reg.out_transform, "ants",
                           {"n": 1, "max_mm": 0.0, "seed": 0})
    inside = moved_mask & (view != 0)
    assert inside.sum() > 0.95 * moved_mask.sum()
    assert np.corrcoef(view[inside], expected[inside])[0, 1] > 0.999


@pytest.mark.slow
def test_skull_stripped_input_gives_the_same_registration(ixi_run: dict,
                                                          tmp_path: Path) -> None:
    reg = ixi_run["reg"]
    result = ants_backend.extract_and_register(reg.out_brain_native, str(tmp_path), threads=2)
    assert result["info"]["skull_stripped_input"] is True
    points = nib.affines.apply_affine(nib.load(reg.out_mask_native).affine, np.argwhere(
        np.asarray(nib.load(reg.out_mask_native).dataobj) > 0)[::10])
    head, brain = np.loadtxt(reg.out_transform_txt), np.loadtxt(result["transform_txt"])
    shift = np.linalg.norm(nib.affines.apply_affine(head, points)
                           - nib.affines.apply_affine(brain, points), axis=1)
    assert shift.mean() < 2.0
    assert result["qc"]["qc_pass"] is True


@pytest.mark.slow
def test_one_thread_runs_repeat_exactly(ixi_run: dict, tmp_path: Path) -> None:
    """Same seed, one ITK thread: identical transforms in two fresh processes.

    Fresh processes, because ITK sizes its thread pool once per process (the fixture already
    used two threads here); with several threads ITK sums in a varying order, which moves the
    result by about 0.1 mm between runs.
    """
    code = ("import sys; from brainage_bids.preproc.ants_backend import extract_and_register; "
            "extract_and_register(sys.argv[1], sys.argv[2], threads=1, seed=7)")
    env = {k: v for k, v in os.environ.items() if k != ants_backend.ITK_THREADS_ENV}
    matrices = []
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, ixi_run["reg"].out_brain_native,
                        str(tmp_path / run)], check=True, env=env, capture_output=True,
                       cwd=REPO)
        matrices.append(np.loadtxt(tmp_path / run / ants_backend.OUTPUT_NAMES["transform_txt"]))
    assert np.array_equal(matrices[0], matrices[1])


@pytest.mark.slow
def test_registration_qc_interface_flags_a_shifted_brain(ixi_run: dict,
                                                         tmp_path: Path) -> None:
    from brainage_bids.interfaces.ants import RegistrationQC

    reg = ixi_run["reg"]
    good = RegistrationQC(brain_mni=reg.out_brain_mni, mask_mni=reg.out_mask_mni,
                          mask_native=reg.out_mask_native).run(cwd=str(tmp_path))
    assert Path(good.outputs.out_qc).is_file()
    assert good.outputs.qc == reg.qc
    brain, mask = nib.load(reg.out_brain_mni), nib.load(reg.out_mask_mni)
    shifted = {}
    for name, img, order in (("brain", brain, 1), ("mask", mask, 0)):
        data = ndi.shift(np.asarray(img.dataobj, dtype=np.float32), (0, 0, 5), order=order)
        shifted[name] = tmp_path / f"shifted_{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, img.affine), shifted[name])  # 10 mm upwards
    bad = registration_qc(shifted["brain"], shifted["mask"])
    assert bad["qc_pass"] is False
    assert bad["correlation"] < good.outputs.qc["correlation"] - 0.15


def test_registration_qc_rejects_another_grid(tmp_path: Path) -> None:
    path = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((90, 108, 90), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match="template grid"):
        registration_qc(path, path)


@pytest.mark.slow
def test_colin27_skull_strip_matches_ch2bet(tmp_path: Path) -> None:
    ch2 = shared("colin27", "ch2.nii.gz")
    bet = np.asarray(nib.load(str(shared("colin27", "ch2bet.nii.gz"))).dataobj) > 0
    result = ants_backend.extract_and_register(str(ch2), str(tmp_path), threads=2)
    mask = np.asarray(nib.load(result["mask_native"]).dataobj) > 0
    assert result["info"]["skull_stripped_input"] is False
    assert dice(mask, bet) >= 0.95
    # ch2 is already in an MNI space: the affine found is close to the identity
    points = nib.affines.apply_affine(nib.load(str(ch2)).affine, np.argwhere(bet)[::50])
    to_mni = np.loadtxt(result["transform_txt"])
    assert np.linalg.norm(nib.affines.apply_affine(to_mni, points) - points,
                          axis=1).mean() < 3.0
    assert result["qc"]["qc_pass"] is True
