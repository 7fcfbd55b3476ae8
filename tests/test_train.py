"""The training engine: validation, caching, augmentation, determinism, resume, DDP.

The data are 32^3 crops of the real MNI152 2 mm template brain (BrainAgeNet reaches 1x1x1
on 32^3), with per-item intensity perturbations and an age-dependent gradient, so that a
few epochs run in seconds on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage

import brainage_bids
from brainage_bids.io import sha256_file
from brainage_bids.model import data as data_module
from brainage_bids.model import step as step_module
from brainage_bids.model import train as train_module
from brainage_bids.model.checkpoint import checkpoint_path
from brainage_bids.model.data import (
    AUGMENTATION,
    AUGMENTATION_V1,
    Augmenter,
    VolumeCache,
    build_cache,
)
from brainage_bids.model.distributed import DistEnv, shard
from brainage_bids.model.train import train_model
from brainage_bids.model.train_config import TrainConfig, TrainItem, split_stratified
from brainage_bids.model.train_record import METRIC_COLUMNS
from brainage_bids.model.weights import load_model

REPO = Path(brainage_bids.__file__).resolve().parents[1]
SHAPE = (32, 32, 32)
TEMPLATES = resources.files("brainage_bids") / "data" / "templates"


def _make_items(root: Path, n: int) -> list[TrainItem]:
    brain = nib.load(TEMPLATES / "tpl-MNI152NLin6Asym_res-02_desc-brain_T1w.nii.gz")
    mask = nib.load(TEMPLATES / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")
    zoom = [t / s for t, s in zip(SHAPE, brain.shape, strict=True)]
    small = ndimage.zoom(brain.get_fdata(dtype=np.float32), zoom, order=1)
    inside = ndimage.zoom(mask.get_fdata(dtype=np.float32), zoom, order=0) > 0
    affine = np.diag([2 / z for z in zoom] + [1.0])
    rng = np.random.default_rng(0)
    ramp = np.linspace(-1, 1, SHAPE[0])[:, None, None]
    items = []
    for i in range(n):
        age = 20.0 + 60.0 * i / (n - 1)
        volume = small * (1 + 0.004 * (age - 50) * ramp) * rng.uniform(0.8, 1.2)
        volume = np.where(inside, volume + rng.normal(0, 5, SHAPE), 0).astype(np.float32)
        image, msk = root / f"sub-{i:02d}_T1w.nii.gz", root / f"sub-{i:02d}_mask.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), image)
        nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), msk)
        items.append(TrainItem(f"sub-{i:02d}", str(image), str(msk), age))
    return items


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[TrainItem]:
    return _make_items(tmp_path_factory.mktemp("data"), 16)


@pytest.fixture(scope="module")
def split(items) -> tuple[list[TrainItem], list[TrainItem]]:
    return split_stratified(items, 0.25, seed=3)


def _config(**kw) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 4, "input_shape": SHAPE, "num_threads": 1,
            "model_name": "tiny"}
    return TrainConfig(**{**base, **kw})


def _run_cli(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True, **popen)


def _write_inputs(tmp_path: Path, train, val, config: TrainConfig) -> list[str]:
    for name, rows in (("train", train), ("val", val)):
        (tmp_path / f"{name}.json").write_text(
            json.dumps([dataclasses.asdict(i) for i in rows]))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    return ["--train", str(tmp_path / "train.json"), "--val", str(tmp_path / "val.json"),
            "--config", str(tmp_path / "config.json"), "--no-progress"]


def _assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, f"weights differ by up to {worst}"
    return worst


# --------------------------------------------------------------------------- config, split

@pytest.mark.parametrize(("kw", "match"), [
    ({"epochs": 0}, "epochs"), ({"batch_size": 2.5}, "batch_size"), ({"lr": -1}, "lr"),
    ({"loss": "huber"}, "loss"), ({"attention": "both"}, "attention"),
    ({"dropout": 1.0}, "dropout"), ({"patience": 0}, "patience"),
    ({"val_fraction": 1.0}, "val_fraction"), ({"model_name": "a/b"}, "model_name"),
    ({"input_shape": (32, 32)}, "input_shape"), ({"device": "tpu"}, "device"),
    ({"attention_kernel": 4}, "odd"), ({"seed": -1}, "seed"), ({"precision": "fp8"}, "prec"),
    ({"architecture": "ResNet"}, "architecture"), ({"architecture": "SFCN"}, "kl"),
    ({"loss": "kl"}, "kl"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_config_round_trip_and_unknown_keys():
    config = _config(patience=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})


def test_split_is_stratified_seeded_and_order_independent(items):
    train, val = split_stratified(items, 0.25, seed=1)
    assert len(val) == 4 and len(train) == 12
    assert {i.id for i in train}.isdisjoint({i.id for i in val})
    ages = sorted(i.age for i in val)  # one per age quartile
    quartiles = np.array_split(sorted(i.age for i in items), 4)
    assert all(q.min() <= a <= q.max() for a, q in zip(ages, quartiles, strict=True))
    assert split_stratified(items[::-1], 0.25, seed=1)[1] == val[::-1]
    assert split_stratified(items, 0.25, seed=1) == (train, val)
    others = [split_stratified(items, 0.25, seed=s)[1] for s in range(2, 6)]
    assert any({i.id for i in o} != {i.id for i in val} for o in others)


def test_split_keeps_groups_together(items):
    grouped = [dataclasses.replace(i, group=f"p{k // 2}") for k, i in enumerate(items)]
    train, val = split_stratified(grouped, 0.25, seed=0)
    assert {i.group for i in train}.isdisjoint({i.group for i in val})
    assert len(val) % 2 == 0
    with pytest.raises(ValueError, match="no valid age"):
        split_stratified([*items[:3], dataclasses.replace(items[3], age=float("nan"))], 0.5, 0)


# --------------------------------------------------------------------------- data

def test_cache_reads_each_nifti_once_and_is_reused(items, tmp_path, monkeypatch):
    calls = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: calls.append(path) or
                        real_load(path, *a, **k))
    sources = [(i.image, i.mask) for i in items[:3]]
    path = build_cache(sources, tmp_path, shape=SHAPE, dtype="float16")
    assert len(calls) == 6
    assert build_cache(sources, tmp_path, shape=SHAPE, dtype="float16") == path
    assert len(calls) == 6
    cache = VolumeCache(path)
    assert cache.array.dtype == np.float16 and len(cache) == 3
    expected = data_module.read_volume(*sources[1], SHAPE)
    np.testing.assert_allclose(cache.volume(1)[0].numpy(), expected, atol=2e-3)
    assert cache.batch([0, 2]).shape == (2, 1, *SHAPE)
    with pytest.raises(ValueError, match="model grid"):
        build_cache(sources, tmp_path, shape=(91, 109, 91))


def test_augmentation_is_a_pure_function_of_seed_epoch_index(items):
    volume = torch.from_numpy(data_module.read_volume(items[0].image, items[0].mask))[None]
    aug = Augmenter()
    a = aug(volume, 42, 1, 5)
    assert a.shape == volume.shape and a.dtype == torch.float32
    assert torch.equal(a, Augmenter()(volume.clone(), 42, 1, 5))
    assert not torch.equal(a, aug(volume, 42, 2, 5))
    assert not torch.equal(a, aug(volume, 42, 1, 6))
    assert torch.equal(aug(volume, 7, 0, 0), aug(volume, 7, 0, 0))


def test_augmentation_transforms_do_what_the_card_says(items):
    volume = torch.from_numpy(data_module.read_volume(items[0].image, items[0].mask))[None]
    flip = Augmenter({**AUGMENTATION, "order": ["flip"],
                      "flip": {**AUGMENTATION["flip"], "prob": 1.0}})
    assert torch.equal(flip(volume, 0, 0, 0), torch.flip(volume, [1]))
    shift = Augmenter({**AUGMENTATION, "order": ["shift"]})
    padded = torch.nn.functional.pad(volume, [3] * 6)
    offsets = set()
    for index in range(6):
        out = shift(volume, 0, 0, index)
        matches = [(a, b, c) for a in range(7) for b in range(7) for c in range(7)
                   if torch.equal(out, padded[:, a:a + 32, b:b + 32, c:c + 32])]
        assert len(matches) == 1  # an integer shift of at most 3 voxels, zero-filled
        offsets.add(matches[0])
    assert len(offsets) > 1
    scale = Augmenter({**AUGMENTATION_V1, "order": ["intensity_scale"]})
    ratios = [float(scale(volume, 0, 0, i).abs().sum() / volume.abs().sum()) for i in range(16)]
    assert all(0.9 <= r <= 1.1 for r in ratios) and np.std(ratios) > 0.02  # v * U(0.9, 1.1)


def test_ranks_share_each_global_batch_without_overlap():
    batch = np.array([7, 3, 9, 1, 4])
    shares = [shard(batch, DistEnv(r, 2, r, torch.device("cpu"), False)) for r in range(2)]
    assert np.concatenate([s for s, _ in shares]).tolist() == batch.tolist()
    assert [w.tolist() for _, w in shares] == [[1, 1, 1], [1, 1]]
    tiny = [shard(batch[:1], DistEnv(r, 2, r, torch.device("cpu"), False)) for r in range(2)]
    assert tiny[0][1].tolist() == [1] and tiny[1][1].tolist() == [0]  # padded, weight 0


# --------------------------------------------------------------------------- training

def test_too_few_items_fail_before_writing(items, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    with pytest.raises(ValueError, match="at least 4 training"):
        train_model(_config(), items[:3], items[3:6], out, work_dir=work)
    with pytest.raises(ValueError, match="at least 2 validation"):
        train_model(_config(), items[:6], items[6:7], out, work_dir=work)
    with pytest.raises(ValueError, match="unique"):
        train_model(_config(), items[:6], items[5:8], out, work_dir=work)
    with pytest.raises(ValueError, match="does not exist"):
        train_model(_config(), [*items[:5], dataclasses.replace(items[5], image="/no.nii")],
                    items[6:8], out, work_dir=work)
    with pytest.raises(ValueError, match="card_extra may not set"):
        train_model(_config(), items[:6], items[6:8], out, work_dir=work,
                    card_extra={"sha256": "x"})
    assert not out.exists() and not work.exists()


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    """One complete 3-epoch run shared by the artefact tests."""
    root = tmp_path_factory.mktemp("trained")
    train, val = split
    card = train_model(_config(), train, val, root / "models", work_dir=root / "work",
                       progress=False, card_extra={"training_data": "synthetic-template",
                                                   "preprocessing": {"backend": "none"}})
    return root, card


def test_training_writes_finished_artefacts_and_card(trained, split):
    root, card = trained
    out = root / "models"
    assert sorted(p.name for p in out.iterdir()) == [
        "tiny.json", "tiny.safetensors", "tiny_curve.svg", "tiny_metrics.tsv"]
    assert json.loads((out / "tiny.json").read_text()) == card
    assert card["sha256"] == sha256_file(out / "tiny.safetensors")
    assert card["training_data"] == "synthetic-template"
    arch = card["architecture"]
    assert (arch["name"], arch["attention"], arch["n_parameters"]) == (
        "BrainAgeNet", "shared", 5408228)
    assert card["input"]["shape"] == list(SHAPE)
    assert card["input"]["intensity_normalisation"]["name"] == "robust-zscore-in-mask"
    training = card["training"]
    assert (training["n_train"], training["n_val"]) == (12, 4)
    assert training["epochs_run"] == training["epochs_requested"] == 3
    assert training["optimizer"] == "Adam" and training["augmentation"] == AUGMENTATION
    assert 1 <= training["best_epoch"] <= 3
    assert set(card["software"]) >= {"torch", "monai", "brainage_bids", "python"}
    for key in ("mae", "rmse", "r", "r2", "r_gap_age"):
        assert key in card["validation"]
    for method in ("beheshti", "cole"):
        assert {"slope", "intercept"} <= set(card["bias_correction"][method])
        assert abs(card["validation"]["corrected"][method]["r_gap_age"]) < 1e-6
    rows = (out / "tiny_metrics.tsv").read_text().splitlines()
    assert rows[0].split("\t") == list(METRIC_COLUMNS) and len(rows) == 4
    best = rows[training["best_epoch"]].split("\t")
    assert float(best[2]) == pytest.approx(card["validation"]["mae"], rel=1e-5)
    svg = (out / "tiny_curve.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "Validation MAE" in svg


def test_saved_model_reproduces_the_card(trained, split):
    root, card = trained
    model, loaded = load_model(root / "models")
    assert loaded["sha256"] == card["sha256"]
    _, val = split
    x = torch.stack([torch.from_numpy(data_module.read_volume(i.image, i.mask))[None]
                     for i in val])
    with torch.no_grad():
        pred = model(x).squeeze(1).double().numpy()
    ages = np.array([i.age for i in val])
    # the card's MAE came from the float16 cache; here from float32 volumes
    assert np.abs(pred - ages).mean() == pytest.approx(card["validation"]["mae"], abs=0.05)
    checkpoint = torch.load(checkpoint_path(root / "work", "tiny"), weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["finished"]
    saved = load_file(str(root / "models" / "tiny.safetensors"))
    assert all(torch.equal(saved[k], checkpoint["best_model"][k].contiguous()) for k in saved)


def test_resuming_a_finished_run_only_rewrites_its_artefacts(trained, split, tmp_path):
    root, card = trained
    train, val = split
    again = train_model(_config(), train, val, tmp_path / "again", work_dir=root / "work",
                        resume=True, progress=False)
    assert again["sha256"] == card["sha256"]  # same bytes: nothing was trained
    assert again["training"]["epochs_run"] == 3


def test_finish_amends_the_card_before_it_is_written(trained, split, tmp_path):
    """The train level's validation fits run on the best epoch's model; the card on disk is
    the amended one, and a failing finish leaves no card looking complete."""
    root, card = trained
    train, val = split
    seen = {}

    def finish(model, draft):
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return {**draft, "inference": {"flip_tta": False}}

    again = train_model(_config(), train, val, tmp_path / "a", work_dir=root / "work",
                        resume=True, progress=False, finish=finish)
    assert again["inference"] == {"flip_tta": False} and again["sha256"] == card["sha256"]
    assert json.loads((tmp_path / "a" / "tiny.json").read_text()) == again
    saved = load_file(str(tmp_path / "a" / "tiny.safetensors"))
    assert all(torch.equal(saved[k], seen["state"][k].contiguous()) for k in saved)

    def broken(model, draft):
        raise RuntimeError("validation predictions failed")

    with pytest.raises(RuntimeError, match="validation predictions failed"):
        train_model(_config(), train, val, tmp_path / "b", work_dir=root / "work",
                    resume=True, progress=False, finish=broken)
    assert not (tmp_path / "b" / "tiny.json").exists()


def test_early_stopping_keeps_the_best_epoch(split, tmp_path, monkeypatch):
    maes = iter([5.0, 4.0, 4.5, 4.6, 3.0, 2.0])
    real = train_module.regression_metrics
    monkeypatch.setattr(train_module, "regression_metrics",
                        lambda age, pred: {**real(age, pred), "mae": next(maes)})
    train, val = split
    card = train_model(_config(epochs=6, patience=2, augment=False), train, val,
                       tmp_path / "out", work_dir=tmp_path / "work", progress=False)
    training = card["training"]
    assert (training["epochs_run"], training["best_epoch"], training["stopped_early"]) == (
        4, 2, True)
    checkpoint = torch.load(checkpoint_path(tmp_path / "work", "tiny"), weights_only=True)
    saved = load_file(str(tmp_path / "out" / "tiny.safetensors"))
    assert all(torch.equal(saved[k], checkpoint["best_model"][k].contiguous()) for k in saved)
    assert not all(torch.equal(saved[k], checkpoint["model"][k].contiguous()) for k in saved)


def test_resume_refuses_a_different_configuration(trained, split, tmp_path):
    root, _ = trained
    train, val = split
    with pytest.raises(ValueError, match="different training options"):
        train_model(_config(lr=3e-4), train, val, tmp_path / "out", work_dir=root / "work",
                    resume=True, progress=False)
    assert not (tmp_path / "out").exists()
    # fewer epochs than the checkpoint ran: its best epoch may lie beyond them
    with pytest.raises(ValueError, match=r"it has run 3 epochs, more than the 2 asked for"):
        train_model(_config(epochs=2), train, val, tmp_path / "out", work_dir=root / "work",
                    resume=True, progress=False)


def test_a_damaged_checkpoint_is_named(trained, split, tmp_path):
    root, _ = trained
    train, val = split
    payload = torch.load(checkpoint_path(root / "work", "tiny"), weights_only=True)
    work = tmp_path / "work"
    target = checkpoint_path(work, "tiny")
    target.parent.mkdir(parents=True)
    for damaged, message in (([1, 2], "is not a brainage-bids checkpoint"),
                             ({k: v for k, v in payload.items() if k != "history"},
                              r"it is damaged \(KeyError")):
        torch.save(damaged, target)
        with pytest.raises(ValueError, match=rf"{target}.*{message}"):
            train_model(_config(), train, val, tmp_path / "out", work_dir=work, resume=True,
                        progress=False)


def test_progress_bar_goes_to_stderr(split, tmp_path, capsys):
    train, val = split
    train_model(_config(epochs=1, augment=False), train, val, tmp_path / "out",
                work_dir=tmp_path / "work", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "tiny" in captured.err and "val_mae" in captured.err


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_matches_uninterrupted_run(split, tmp_path):
    """SIGKILL during epoch 2, resume: bitwise the same model as a run never interrupted."""
    train, val = split
    config = _config(batch_size=2, dropout=0.5, augment=True)
    out, work = tmp_path / "out", tmp_path / "work"
    args = _write_inputs(tmp_path, train, val, config)
    proc = _run_cli(["-m", "brainage_bids.model.train", *args, "--out", str(out),
                     "--work-dir", str(work), "-vv"], stderr=subprocess.PIPE)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "epoch 2 batch 3/6" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    checkpoint = torch.load(checkpoint_path(work, "tiny"), weights_only=True)
    assert checkpoint["epoch"] == 1  # killed inside epoch 2, after epoch 1's checkpoint
    assert not out.exists()  # nothing that looks like a finished model

    resumed = train_model(config, train, val, out, work_dir=work, resume=True, progress=False)
    reference = train_model(config, train, val, tmp_path / "ref", work_dir=tmp_path / "w2",
                            progress=False)
    _assert_same_weights(out / "tiny.safetensors", tmp_path / "ref" / "tiny.safetensors")
    assert resumed["sha256"] == reference["sha256"]
    final = torch.load(checkpoint_path(work, "tiny"), weights_only=True)
    final_ref = torch.load(checkpoint_path(tmp_path / "w2", "tiny"), weights_only=True)
    assert all(torch.equal(final["model"][k], final_ref["model"][k]) for k in final["model"])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in final["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"}
                     for row in final_ref["history"]]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(split, tmp_path):
    """DDP (gloo, 2 ranks x half the global batch) trains the same model as one process."""
    train, val = split
    # 12 items in global batches of 5, 5, 2: uneven shares (3+2, 1+1) test the loss weighting
    config = _config(batch_size=5, dropout=0.0, augment=False, epochs=2)
    args = _write_inputs(tmp_path, train, val, config)
    proc = _run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "brainage_bids.model.train", *args, "--out", str(tmp_path / "ddp"),
                     "--work-dir", str(tmp_path / "wddp")],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "tiny.json").read_text())
    assert ddp["training"]["world_size"] == 2
    single = train_model(config, train, val, tmp_path / "one", work_dir=tmp_path / "w1",
                         progress=False)
    assert single["training"]["world_size"] == 1
    worst = _assert_same_weights(tmp_path / "ddp" / "tiny.safetensors",
                                 tmp_path / "one" / "tiny.safetensors", atol=1e-4)
    print(f"largest weight difference DDP vs one process: {worst:.3g}")
    assert ddp["validation"]["mae"] == pytest.approx(single["validation"]["mae"], abs=1e-3)
    ddp_rows = (tmp_path / "ddp" / "tiny_metrics.tsv").read_text().splitlines()[1:]
    one_rows = (tmp_path / "one" / "tiny_metrics.tsv").read_text().splitlines()[1:]
    for a, b in zip(ddp_rows, one_rows, strict=True):
        assert float(a.split("\t")[1]) == pytest.approx(float(b.split("\t")[1]), rel=1e-4)


# --------------------------------------------------------------------------- the SFCN peer

def test_kl_loss_per_sample_matches_the_reference_mean():
    from brainage_bids.model.sfcn import SFCN, soft_label_loss

    torch.manual_seed(0)
    model = SFCN()
    log_probs = torch.log_softmax(torch.randn(5, model.n_bins), dim=1)
    ages = torch.tensor([[21.0], [37.5], [50.0], [66.2], [93.0]])
    per_sample = step_module._per_sample_loss("kl", log_probs, ages, model.bin_centers)
    assert per_sample.shape == (5, 1) and bool((per_sample >= 0).all())
    expected = soft_label_loss(log_probs, ages, model.bin_centers)
    assert float(per_sample.mean()) == pytest.approx(float(expected), rel=1e-6)


def test_engine_trains_sfcn_with_soft_labels(split, tmp_path):
    train, val = split
    card = train_model(_config(architecture="SFCN", loss="kl", epochs=2), train, val,
                       tmp_path / "models", work_dir=tmp_path / "work", progress=False)
    assert card["architecture"]["name"] == "SFCN"
    assert card["architecture"]["n_parameters"] == 2952936
    assert card["training"]["loss"] == "kl" and card["training"]["output_bias_init"] is None
    rows = (tmp_path / "models" / "tiny_metrics.tsv").read_text().splitlines()[1:]
    losses = [float(r.split("\t")[1]) for r in rows]
    assert all(np.isfinite(losses)) and all(v > 0 for v in losses)
    model, _ = load_model(tmp_path / "models")
    x = torch.stack([torch.from_numpy(data_module.read_volume(i.image, i.mask))[None]
                     for i in val])
    with torch.no_grad():
        pred = model(x).squeeze(1).double().numpy()
    # expected ages over the bins: inside the bins' range, and the card's MAE reproduces
    assert bool(((pred > 14) & (pred < 94)).all())
    ages = np.array([i.age for i in val])
    assert np.abs(pred - ages).mean() == pytest.approx(card["validation"]["mae"], abs=0.05)


@pytest.mark.parametrize(("options", "message"), [
    ({"folds": 5}, r"7 participant\(s\) with an age cannot be split as asked \(--folds 5"),
    ({"val_fraction": 0.1}, r"need at least 2 validation images, got 1"),
    ({"model_name": ".hidden"}, r"model_name must be a non-empty file stem"),
])
def test_train_level_checks_its_splits_before_any_preprocessing(tmp_path, options, message):
    """Hours of preprocessing must not come before an error the labels alone could give."""
    from brainage_bids.bids import T1wImage
    from brainage_bids.config import Settings
    from brainage_bids.training import train_from_bids

    images = [T1wImage(path=tmp_path / f"sub-{i:02d}_T1w.nii.gz", entities={"subject": f"{i:02d}"},
                       age=20.0 + 7 * i) for i in range(7)]
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="train",
                        work_dir=tmp_path / "work", **options)

    def execute(*args):
        raise AssertionError("preprocessing ran")

    with pytest.raises(ValueError, match=message):
        train_from_bids(settings, images, execute=execute)


def test_a_failed_preprocessing_under_torchrun_stops_rank_0(tmp_path, monkeypatch):
    """The other ranks wait for every image's outputs; rank 0 must not go on without one."""
    from brainage_bids.bids import T1wImage
    from brainage_bids.config import Settings
    from brainage_bids.training import TrainDataError, ensure_preprocessed

    t1w = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    t1w.parent.mkdir(parents=True)
    t1w.write_bytes(b"not a nifti")
    image = T1wImage(path=t1w, entities={"subject": "01"}, age=30.0)
    settings = Settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                        analysis_level="train", work_dir=tmp_path / "work", omp_nthreads=1,
                        preproc="ants")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainDataError, match=r"1 image\(s\) failed preprocessing \(e\.g\. "
                                             r"sub-01: boom\); under torchrun"):
        ensure_preprocessed(settings, [image], lambda s, images, args: {image.node_name: "boom"})
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, the image is skipped and named
    done, failures = ensure_preprocessed(settings, [image],
                                         lambda s, images, args: {image.node_name: "boom"})
    assert done == [] and failures == {"sub-01": "boom"}
