"""Input checks on damaged copies of a real head: each failure class has its own reason.

Fast: nothing here preprocesses. The end-to-end runs of the same damage (one good head in the
same run finishing) are in ``test_reliability.py``.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.bids import T1wImage
from brainage_bids.validation import (
    ImageError,
    check_header,
    load_valid_t1w,
    path_problem,
    screen_images,
)

from .conftest import SAMPLE

HEAD = SAMPLE / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"


def damaged_heads(folder: Path) -> dict[str, tuple[Path, str]]:
    """Damaged copies of a real IXI head: ``{case: (path, expected reason fragment)}``.

    Shared with ``test_reliability.py``, which puts them in a BIDS dataset.
    """
    folder.mkdir(parents=True, exist_ok=True)
    head = nib.load(HEAD)
    data = np.asarray(head.dataobj)
    cases: dict[str, tuple[Path, str]] = {}

    def save(case: str, array, affine=None, *, header=None) -> Path:
        path = folder / f"{case}.nii.gz"
        img = nib.Nifti1Image(array, head.affine if affine is None else affine, header=header)
        nib.save(img, path)
        return path

    raw = HEAD.read_bytes()
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 8])
    cases["truncated"] = (truncated, "cannot be read (truncated or corrupt?)")
    not_nifti = folder / "notnifti.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"this is not a NIfTI file\n" * 40))
    cases["notnifti"] = (not_nifti, "cannot be read as NIfTI")
    cases["fourd"] = (save("fourd", np.stack([data] * 3, axis=-1)), "expected a 3D image")
    cases["twod"] = (save("twod", data[:, :, 45]), "expected a 3D image, got 2D")
    cases["slab"] = (save("slab", data[:, :, 40:43]), "too small for a brain image")
    cases["zeros"] = (save("zeros", np.zeros_like(data)), "the image is all zero")
    with_nans = data.astype(np.float32)
    with_nans[40:45, 40:45, 40:45] = np.nan
    cases["nans"] = (save("nans", with_nans), "125 NaN or infinite values")
    with_inf = data.astype(np.float32)
    with_inf[50, 50, 50] = np.inf
    cases["inf"] = (save("inf", with_inf), "1 NaN or infinite values")
    bad_affine = head.affine.copy()
    bad_affine[0, 3] = np.nan
    cases["nanaffine"] = (save("nanaffine", data, bad_affine), "NaN or infinite values")
    big = head.affine.copy()
    big[:3, :3] *= 5  # 2 mm voxels claimed to be 10 mm
    cases["tenmm"] = (save("tenmm", data, big), "implausible voxel size 10 x 10 x 10 mm")
    small = head.affine.copy()
    small[:3, :3] *= 0.15  # 0.3 mm voxels: a 36 mm head
    cases["tinyfov"] = (save("tinyfov", data, small), "does not fit a human head")
    huge = nib.Nifti1Header()
    huge.set_data_dtype(np.uint8)
    huge.set_data_shape((2700, 2700, 2700))
    huge.set_zooms((0.1, 0.1, 0.1))
    header_only = folder / "huge.nii.gz"
    with gzip.open(header_only, "wb") as fh:  # the header and a few bytes: 0.4 kB on disk
        fh.write(huge.binaryblock + b"\0" * 4 + b"\0" * 1000)
    cases["huge"] = (header_only, "2700 x 2700 x 2700 voxels")
    return cases


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return damaged_heads(tmp_path_factory.mktemp("damaged"))


def test_the_real_head_passes(tmp_path):
    img = load_valid_t1w(HEAD)
    assert sorted(img.shape) == sorted(nib.load(HEAD).shape)  # reoriented to RAS
    assert np.isfinite(img.get_fdata()).all()
    assert check_header(nib.load(HEAD), HEAD.name) == (120, 120, 90)


@pytest.mark.parametrize("case", ["truncated", "notnifti", "fourd", "twod", "slab", "zeros",
                                  "nans", "inf", "nanaffine", "tenmm", "tinyfov", "huge"])
def test_each_damage_has_its_reason(damaged, case):
    path, reason = damaged[case]
    with pytest.raises(ImageError) as exc:
        load_valid_t1w(path)
    message = str(exc.value)
    assert message.startswith(f"{path.name}: "), message  # the line names the file
    assert reason in message, message
    assert "\n" not in message


def test_voxel_sizes_come_from_the_affine_every_step_uses(tmp_path):
    """pixdim (the qform's) and the sform can disagree; the sform is what is processed."""
    head = nib.load(HEAD)
    data = np.asarray(head.dataobj)
    wrong_sform = nib.Nifti1Image(data, None, header=head.header.copy())
    scaled = head.affine.copy()
    scaled[:3, :3] *= 10  # 20 mm voxels in the sform, pixdim still 2 mm
    wrong_sform.set_sform(scaled, code=1)
    wrong_sform.set_qform(head.affine, code=1)
    nib.save(wrong_sform, tmp_path / "sform.nii.gz")
    with pytest.raises(ImageError, match=r"sform\.nii\.gz: implausible voxel size 20 x 20 x 20 "
                                         r"mm in its affine"):
        load_valid_t1w(tmp_path / "sform.nii.gz")
    wrong_pixdim = nib.Nifti1Image(data, head.affine)
    wrong_pixdim.header.set_zooms((0.2, 0.2, 0.2))  # the affine, which is used, is right
    wrong_pixdim.set_sform(head.affine, code=1)
    nib.save(wrong_pixdim, tmp_path / "pixdim.nii.gz")
    assert load_valid_t1w(tmp_path / "pixdim.nii.gz").shape == load_valid_t1w(HEAD).shape


def test_float64_beyond_float32_is_named_as_such(tmp_path):
    head = nib.load(HEAD)
    data = np.asarray(head.dataobj, dtype=np.float64)
    nib.save(nib.Nifti1Image(data * 1e37, head.affine), tmp_path / "huge.nii.gz")
    with pytest.raises(ImageError, match=r"huge\.nii\.gz: values up to .*e\+40, beyond what "
                                         r"float32 holds"):
        load_valid_t1w(tmp_path / "huge.nii.gz")


def test_a_4d_file_with_one_volume_is_a_3d_image(tmp_path):
    head = nib.load(HEAD)
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(head.dataobj)[..., None], head.affine), path)
    assert sorted(load_valid_t1w(path).shape) == sorted(head.shape)


def test_huge_header_fails_fast_without_reading_voxels(damaged):
    path, _ = damaged["huge"]
    assert path.stat().st_size < 1024
    started = time.monotonic()
    with pytest.raises(ImageError, match="more than any head image has"):
        load_valid_t1w(path)
    assert time.monotonic() - started < 0.5


def test_truncated_uncompressed_nifti_is_caught_by_its_size(tmp_path):
    path = tmp_path / "t.nii"
    nib.save(nib.load(HEAD), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"t\.nii: truncated: the header needs"):
        load_valid_t1w(path)


def test_unsupported_data_type(tmp_path):
    head = nib.load(HEAD)
    path = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(head.dataobj).astype(np.complex64), head.affine), path)
    with pytest.raises(ImageError, match="unsupported data type complex64"):
        load_valid_t1w(path)


def special_files(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    dangling = folder / "dangling_T1w.nii.gz"
    dangling.symlink_to(folder / "gone.nii.gz")
    fifo = folder / "fifo_T1w.nii.gz"
    os.mkfifo(fifo)
    device = folder / "device_T1w.nii.gz"
    device.symlink_to("/dev/zero")
    directory = folder / "dir_T1w.nii.gz"
    directory.mkdir()
    empty = folder / "empty_T1w.nii.gz"
    empty.write_bytes(b"")
    loop = folder / "loop_T1w.nii.gz"
    loop.symlink_to(loop)
    return {
        "missing": (folder / "missing_T1w.nii.gz", "missing_T1w.nii.gz does not exist"),
        "dangling": (dangling, f"is a symbolic link to {folder / 'gone.nii.gz'}, which does "
                               "not exist"),
        "fifo": (fifo, "fifo_T1w.nii.gz is a FIFO (named pipe), not a NIfTI file"),
        "device": (device, "device_T1w.nii.gz (a symbolic link to /dev/zero) is a character "
                           "device, not a NIfTI file"),
        "directory": (directory, "dir_T1w.nii.gz is a directory, not a NIfTI file"),
        "empty": (empty, "empty_T1w.nii.gz is empty (0 bytes)"),
        "loop": (loop, "loops back on itself"),
    }


def test_path_problems_are_named_without_reading(tmp_path):
    cases = special_files(tmp_path)
    for case, (path, reason) in cases.items():
        problem = path_problem(path)
        assert problem is not None and reason in problem, (case, problem)
        with pytest.raises(ImageError) as exc:
            load_valid_t1w(path)  # the node says the same, never blocks on the FIFO
        assert str(exc.value) == problem
    assert path_problem(HEAD) is None


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked_T1w.nii.gz"
    path.write_bytes(HEAD.read_bytes())
    if os.geteuid() != 0:  # a real refusal (CI runs the suite as an ordinary user)
        path.chmod(0)
    else:  # root reads any file whatever its mode, so the refusal is simulated at open()
        real_open = open

        def refuse(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", refuse)
    assert path_problem(path) == "locked_T1w.nii.gz cannot be read: permission denied"


def test_screen_images_keeps_order_and_gives_reasons(tmp_path):
    cases = special_files(tmp_path)
    images = [T1wImage(path=HEAD, entities={"subject": "good"})]
    images += [T1wImage(path=path, entities={"subject": case})
               for case, (path, _) in cases.items()]
    usable, rejected = screen_images(images)
    assert [im.subject for im in usable] == ["good"]
    assert [im.subject for im, _ in rejected] == list(cases)
    for image, reason in rejected:
        assert cases[image.subject][1] in reason
