"""The held-out evaluation: metrics with the card's coefficients, baseline, calibration."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_bids import evaluation as ev
from brainage_bids.interfaces.model import _uncertainty
from brainage_bids.metrics import fit_bias

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "evaluation" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uncertainty_scale_recovers_a_known_factor():
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 80, 400)
    sd = rng.uniform(0.5, 2.0, 400)
    pred = age + 3.0 * sd * rng.standard_normal(400)
    scale = ev.fit_uncertainty_scale(age, pred, sd)
    assert scale == pytest.approx(3.0, rel=0.1)
    report = ev.uncertainty_report(age, pred, sd, scale)
    assert report["coverage_1sd"] == pytest.approx(0.683, abs=0.06)
    assert report["coverage_2sd"] == pytest.approx(0.954, abs=0.04)
    assert report["coverage_1sd_uncalibrated"] < 0.4
    with pytest.raises(ValueError, match="positive"):
        ev.fit_uncertainty_scale(age, pred, np.zeros(400))


def test_evaluate_uses_the_cards_coefficients_and_the_training_mean():
    rng = np.random.default_rng(1)
    val_age, test_age = rng.uniform(20, 80, 60), rng.uniform(20, 80, 40)

    def shrunk(a):  # regression to the mean, as brain-age models do
        return 0.6 * a + 20 + rng.normal(0, 2, a.size)

    val_pred, test_pred = shrunk(val_age), shrunk(test_age)
    card = {"bias_correction": {"beheshti": fit_bias("beheshti", val_age, val_pred),
                                "cole": fit_bias("cole", val_age, val_pred),
                                "smith": {"method": "smith", "error": "too few"}}}
    report = ev.evaluate(test_age, test_pred, card, train_mean_age=50.0)
    assert report["n"] == 40
    assert report["uncorrected"]["r_gap_age"] < -0.7
    assert set(report["corrected"]) == {"beheshti", "cole"}
    for method in ("beheshti", "cole"):
        # coefficients from other data: the dependence shrinks but is not exactly zero
        assert abs(report["corrected"][method]["r_gap_age"]) < 0.4
        assert report["corrected"][method]["r_gap_age"] != pytest.approx(0.0, abs=1e-9)
    assert report["baseline"]["mae"] == pytest.approx(np.abs(test_age - 50.0).mean())
    assert report["mae_over_baseline"] == pytest.approx(
        report["uncorrected"]["mae"] / report["baseline"]["mae"])


def test_record_sd_is_calibrated_only_with_a_card_scale():
    pred = {"uncertainty_method": "mc-dropout", "mc_samples": 20, "mc_mean": 50.2,
            "mc_sd": 1.5}
    raw = _uncertainty(pred, {})
    assert (raw["sd"], raw["mc_sd"], raw["calibrated"], raw["calibration_scale"]) == (
        1.5, 1.5, False, None)
    scaled = _uncertainty(pred, {"uncertainty": {"calibration_scale": 4.0}})
    assert (scaled["sd"], scaled["mc_sd"], scaled["calibrated"]) == (6.0, 1.5, True)


def test_split_subjects_refuses_test_participants_seen_in_training():
    evaluate = _script("evaluate")
    split = json.loads((REPO / "evaluation" / "ixi_split.json").read_text())
    card = {"training_data": {"train_ids": [f"sub-{s}" for s in split["trainval"][:100]],
                              "validation_ids": [f"sub-{s}" for s in split["trainval"][100:]]}}
    train, val, test = evaluate.split_subjects(card, split)
    assert len(train) == 100 and len(val) == 20 and len(test) >= 25
    card["training_data"]["validation_ids"].append(f"sub-{split['test'][0]}")
    with pytest.raises(ValueError, match=split["test"][0]):
        evaluate.split_subjects(card, split)
    with pytest.raises(ValueError, match="train_ids"):
        evaluate.split_subjects({}, split)


def test_split_is_disjoint_stratified_and_large_enough():
    split = json.loads((REPO / "evaluation" / "ixi_split.json").read_text())
    assert not set(split["test"]) & set(split["trainval"])
    assert len(split["test"]) >= 25
    sample = sorted(p.name.removeprefix("sub-")
                    for p in (REPO / "examples" / "ixi-sample").glob("sub-*"))
    assert set(sample) <= set(split["test"])  # the shipped sample is never trained on


def test_missing_preprocessing_is_named(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t40\nsub-02\tn/a\n")
    with pytest.raises(ValueError, match=r"sub-01: not preprocessed.*sub-02: no age"):
        ev.preprocessed_items(tmp_path / "out", bids, ["01", "sub-02"])


def test_native_outputs_are_found_and_required_for_grid_jitter(tmp_path):
    """Derivatives with the native brain, mask and transform give grid-jitter inputs; older
    derivatives without them are refused by name, never silently predicted without it."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t40\n")
    anat = tmp_path / "out" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    mni = "sub-01_space-MNI152NLin6Asym_res-2_desc-"
    for name in (f"{mni}preproc_T1w", f"{mni}brain_mask"):
        nib.save(img, anat / f"{name}.nii.gz")
    [item] = ev.preprocessed_items(tmp_path / "out", bids, ["01"])
    assert item.native is None
    with pytest.raises(ValueError, match="sub-01: grid jitter needs the native brain"):
        ev.predict_records(None, [item], jitter={"n": 2, "max_mm": 1.0, "seed": 0})
    for name in ("sub-01_desc-preproc_T1w", "sub-01_desc-brain_mask"):
        nib.save(img, anat / f"{name}.nii.gz")
    xfm = anat / "sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm"
    xfm.with_suffix(".mat").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    xfm.with_suffix(".json").write_text(json.dumps({"Software": "FSL flirt"}))
    [item] = ev.preprocessed_items(tmp_path / "out", bids, ["01"])
    assert item.native == (str(anat / "sub-01_desc-preproc_T1w.nii.gz"),
                           str(anat / "sub-01_desc-brain_mask.nii.gz"),
                           str(xfm.with_suffix(".mat")), "fsl")


def test_scatter_plot_is_an_svg_with_the_metrics(tmp_path):
    age = np.array([25.0, 40.0, 60.0, 75.0])
    ev.scatter_plot(tmp_path / "s.svg", age, age + np.array([1, -2, 3, -1]), title="t",
                    sd=np.ones(4))
    svg = (tmp_path / "s.svg").read_text()
    assert "<svg" in svg and "MAE 1.75" in svg


def test_ablation_of_an_ensemble_reference_uses_its_first_members_split():
    ablation = _script("ablation")
    split = json.loads((REPO / "evaluation" / "ixi_split.json").read_text())
    models = REPO / "brainage_bids" / "data" / "models"
    card = json.loads((models / "ixi-2mm-v2.json").read_text())
    train, val, test = ablation.reference_split(card, split)
    held = card["ensemble"]["members"][0]["validation_ids"]
    assert sorted(f"sub-{s}" for s in val) == sorted(held) and len(val) == 24
    assert len(train) == 96 and not set(train) & set(val)
    assert sorted(train + val) == sorted(s.removeprefix("sub-") for s in split["trainval"])
    assert sorted(test) == sorted(s.removeprefix("sub-") for s in split["test"])
    v1 = json.loads((models / "ixi-2mm-v1.json").read_text())  # a single model: its own split
    assert ablation.reference_split(v1, split) == _script("evaluate").split_subjects(v1, split)


def test_ablation_reuses_v2s_member_0_as_the_shared_run_with_seed_42():
    import argparse

    ablation = _script("ablation")
    card = json.loads((REPO / "brainage_bids/data/models/ixi-2mm-v2.json").read_text())
    split = json.loads((REPO / "evaluation/ixi_split.json").read_text())
    train, val, _ = ablation.reference_split(card, split)

    def items(subjects):
        return [ablation.TrainItem(id=f"sub-{s}", image="x", mask="y", age=50.0, group=s)
                for s in subjects]

    members = REPO / "training-runs/ixi-2mm-v2/members"
    args = argparse.Namespace(epochs=250, patience=40, batch_size=4, lr=1e-4)
    found = ablation.trained_shared_run(members, 42, args, items(train), items(val))
    assert found == members / "ixi-2mm-v2-m0.json"
    assert ablation.trained_shared_run(members, 43, args, items(train), items(val)) is None
    swapped = items(val[:1] + train[1:]), items(train[:1] + val[1:])
    assert ablation.trained_shared_run(members, 42, args, *swapped) is None  # another split
    with pytest.raises(ValueError, match="trained differently"):
        ablation.trained_shared_run(members, 42, argparse.Namespace(
            epochs=60, patience=40, batch_size=4, lr=1e-4), items(train), items(val))


def test_ablation_summary_gives_mean_and_spread_over_seeds():
    ablation = _script("ablation")

    def run(variant, seed, mae):
        return {"variant": variant, "seed": seed, "n_parameters": 10, "epochs": 3 + seed,
                "best_epoch": 2 + seed, "train_wall_s": 60.0, "val_mae": mae,
                "test": {"mae": mae, "rmse": mae + 1, "r": 0.9}}

    rows = ablation.summarise([run("shared", 0, 5.0), run("shared", 1, 7.0),
                               run("sfcn", 0, 6.0)])
    assert [r["variant"] for r in rows] == ["shared", "sfcn"]
    assert rows[0]["epochs_run"] == [3, 4] and rows[0]["best_epochs"] == [2, 3]  # every seed's
    assert rows[0]["mae"] == 6.0 and rows[0]["mae_sd"] == pytest.approx(np.sqrt(2))
    assert rows[1]["mae_sd"] is None
    text = ablation.table(rows)
    assert "6.00 ± 1.41" in text and "SFCN (Peng et al. 2021)" in text


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # constant gaps: r is NaN
def test_seed_vs_fold_averages_members_and_every_equal_sized_choice_of_folds():
    svf = _script("seed_vs_fold")
    age = np.array([20.0, 40.0, 60.0, 80.0])
    folds = np.array([age + 2, age - 2, age + 4, age - 4, age + 6])  # members x participants
    seeds = np.array([age + 1, age + 3, age + 5])
    report = svf.compare(age, folds, seeds)
    assert report["seed_ensemble"]["mae"] == pytest.approx(3.0)  # the mean of the members
    assert report["fold_ensemble"]["mae"] == pytest.approx(1.2)
    subsets = report["fold_subsets"]
    assert subsets["size"] == 3 and subsets["count"] == 10  # every 3 of 5, none picked
    expected = np.mean([abs(np.mean(c)) for c in itertools.combinations([2, -2, 4, -4, 6], 3)])
    assert subsets["mean"]["mae"] == pytest.approx(expected)
    assert subsets["min_mae"] == pytest.approx(0.0) and subsets["max_mae"] == pytest.approx(4.0)
    diff = report["paired_mae_difference"]["seed_minus_fold_ensemble"]
    assert diff["mean"] == pytest.approx(1.8) and diff["se"] == pytest.approx(0.0)
    assert report["seed_ensemble"]["mean_member_sd"] == pytest.approx(2.0)
    assert [m["mae"] for m in report["single_seed_members"]] == pytest.approx([1, 3, 5])
    assert "mean of 10" in svf.table(report)


def test_seed_vs_fold_refuses_networks_that_are_not_what_it_compares():
    svf = _script("seed_vs_fold")
    split = json.loads((REPO / "evaluation" / "ixi_split.json").read_text())
    v2 = json.loads((REPO / "brainage_bids/data/models/ixi-2mm-v2.json").read_text())
    member = json.loads((REPO / "training-runs/ixi-2mm-v2/members/ixi-2mm-v2-m0.json")
                        .read_text())
    test = svf.check_networks(v2, [member, member], split)
    assert sorted(test) == sorted(s.removeprefix("sub-") for s in split["test"])
    other = json.loads((REPO / "training-runs/ixi-2mm-v2/members/ixi-2mm-v2-m1.json")
                       .read_text())
    with pytest.raises(ValueError, match="one split"):
        svf.check_networks(v2, [member, other], split)
    with pytest.raises(ValueError, match="cross-validated ensemble"):
        svf.check_networks(member, [member, member], split)
    leaked = {**member, "training_data": {**member["training_data"],
              "train_ids": member["training_data"]["train_ids"] + [split["test"][0]]}}
    with pytest.raises(ValueError, match="test participants were used"):
        svf.check_networks(v2, [leaked, leaked], split)


def test_ablation_keeps_recorded_runs_and_writes_each_new_one_at_once(tmp_path, monkeypatch):
    ablation = _script("ablation")
    results = tmp_path / "ablation.json"
    monkeypatch.setattr(ablation, "load_model", lambda ref: (None, {"name": "ref"}))
    monkeypatch.setattr(ablation, "reference_split", lambda card, split: (["a"], ["b"], ["c"]))
    monkeypatch.setattr(ablation, "_items", lambda *a: [])
    monkeypatch.setattr(ablation.ev, "preprocessed_items", lambda *a: [])
    trained = []

    def run_variant(name, seed, *rest):
        if name == "none":  # the session stops here: the finished runs must be on disk
            raise ValueError("stopped")
        trained.append((name, seed))
        return {"variant": name, "seed": seed, "n_parameters": 10, "epochs": 3,
                "best_epoch": 2, "train_wall_s": 60.0, "val_mae": 5.0, "test": {"mae": 5.0 + seed,
                                                               "rmse": 6.0, "r": 0.9}}

    monkeypatch.setattr(ablation, "run_variant", run_variant)
    split = tmp_path / "split.json"
    split.write_text("{}")

    def argv(*extra, epochs="250"):
        return ["--derivatives", str(tmp_path), "--out", str(tmp_path / "out"), "--split",
                str(split), "--epochs", epochs, "--seeds", "1", "2", "--json", str(results),
                *extra]

    assert ablation.main(argv("--variants", "shared", "none")) == 1
    assert trained == [("shared", 1), ("shared", 2)]
    written = json.loads(results.read_text())
    assert [(r["variant"], r["seed"]) for r in written["runs"]] == trained
    assert written["summary"][0]["mae"] == 6.5 and written["epochs"] == 250

    trained.clear()  # the next session: --out is gone, the file is not
    assert ablation.main(argv("--variants", "shared", "sfcn")) == 0
    assert trained == [("sfcn", 1), ("sfcn", 2)]
    runs = json.loads(results.read_text())["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [
        ("sfcn", 1), ("sfcn", 2), ("shared", 1), ("shared", 2)]

    assert ablation.main(argv("--variants", "sfcn", epochs="60")) == 1  # not mixed in
    assert len(json.loads(results.read_text())["runs"]) == 4

    # a new run written before the loop reaches recorded ones, then a failure: nothing lost
    assert ablation.main(argv("--variants", "separate", "shared", "none")) == 1
    runs = json.loads(results.read_text())["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [
        ("separate", 1), ("separate", 2), ("sfcn", 1), ("sfcn", 2), ("shared", 1),
        ("shared", 2)]
    with pytest.raises(ValueError, match="other settings"):
        ablation.recorded_runs(results, {"epochs": 60})


def test_ship_model_float16_halves_the_file_and_loads_back(tmp_path):
    from brainage_bids.model.net import BrainAgeNet
    from brainage_bids.model.weights import load_model, save_model

    torch.manual_seed(0)
    model = BrainAgeNet(attention_kernel=3).eval()
    trained = save_model(model, tmp_path / "trained" / "m.safetensors",
                         {"name": "m", "training": {"n_train": 4, "n_val": 2,
                                                    "age_range": [20.0, 70.0]}})
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    registry = shipped / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "default": None, "models": []}))
    ship = _script("ship_model")
    assert ship.main([str(tmp_path / "trained" / "m.json"), "--registry", str(registry),
                      "--float16", "--default"]) == 0

    card = json.loads((shipped / "m.json").read_text())
    assert card["storage_dtype"] == "float16"
    assert card["trained_sha256"] == trained["sha256"]
    assert card["sha256"] != trained["sha256"]
    assert card["training_data"]["licence"].startswith("CC BY-SA 3.0")
    size = (shipped / "m.safetensors").stat().st_size
    assert size < 0.55 * (tmp_path / "trained" / "m.safetensors").stat().st_size
    loaded, _ = load_model("default", registry_file=registry)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert abs(loaded(x).item() - model(x).item()) < 0.05


def test_site_contrast_shift_is_monotone_inside_the_mask_and_keeps_the_rest():
    study = _script("finetune_study")
    rng = np.random.default_rng(0)
    volume = rng.uniform(10, 200, size=(8, 8, 8)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[2:6, 2:6, 2:6] = True
    shifted = study.contrast_shift(volume, mask, 2.0)
    inside, before = shifted[mask], volume[mask]
    order = np.argsort(before)
    assert np.all(np.diff(inside[order]) >= 0)  # same ranks: a contrast change, not noise
    assert inside.min() == pytest.approx(before.min()) and inside.max() == pytest.approx(
        before.max())
    mid = (before.min() + before.max()) / 2
    assert np.all(inside[before < mid] <= before[before < mid])  # x**2 darkens the mid-tones
    np.testing.assert_array_equal(shifted[~mask], volume[~mask])


def test_bias_corrected_parent_undoes_a_linear_site_drift():
    study = _script("finetune_study")
    ages = np.linspace(20, 80, 12)
    subset = [study.TrainItem(id=f"sub-{i}", image="x", mask="y", age=float(a), group=str(i))
              for i, a in enumerate(ages)]
    test = [ev.EvalItem(str(i), "x", "y", float(a)) for i, a in enumerate(ages + 1.5)]
    drift = lambda age: 0.8 * age + 15.0  # noqa: E731 - the site's predictions
    parent_pred = {item.id: drift(item.age) for item in subset}
    row = study._bias_corrected(subset, test, parent_pred, drift(ages + 1.5))
    assert row["mae"] == pytest.approx(0.0, abs=1e-9)
    assert row["slope"] == pytest.approx(0.8) and row["best_epoch"] is None
    table = study._table({"parent + bias correction, 10": [row]})
    assert table.splitlines()[-1].endswith("| - | - |")  # nothing was trained


def test_runs_of_another_parent_are_redone_and_scratch_runs_kept():
    study = _script("finetune_study")
    done = {"ft-parent": {"sha256": "aaa"}, "ft-fine-n10-r0": {}, "ft-biascorr-n10-r0": {},
            "ft-scratch-n10-r0": {}, "ft-gamma2-fine-n20-r1": {}}
    assert study._made_by_other_parent(done, "aaa") == []
    assert sorted(study._made_by_other_parent(done, "bbb")) == [
        "ft-biascorr-n10-r0", "ft-fine-n10-r0", "ft-gamma2-fine-n20-r1", "ft-parent"]
    assert study._made_by_other_parent({"ft-scratch-n10-r0": {}}, "bbb") == []


def test_linear_baseline_ridge_is_fitted_on_the_other_folds_only():
    baseline = _script("linear_baseline")
    rng = np.random.default_rng(0)
    volumes = rng.standard_normal((60, 8, 6, 4))
    features = baseline.block_means(volumes, 2)
    assert features.shape == (60, 4 * 3 * 2)
    np.testing.assert_allclose(features[0, 0], volumes[0, :2, :2, :2].mean())
    weights = rng.standard_normal(features.shape[1])
    ages = 50 + features @ weights * 5
    folds = np.arange(60) % 5
    pred, alphas = baseline.out_of_fold(features, ages, folds)
    assert len(alphas) == 5 and np.abs(pred - ages).max() < 0.5  # a linear signal is found
    relabelled = ages.copy()
    relabelled[folds == 2] += 30  # the held-out fold's ages must not move its predictions
    again, _ = baseline.out_of_fold(features, relabelled, folds)
    np.testing.assert_allclose(again[folds == 2], pred[folds == 2])
    assert not np.allclose(again[folds != 2], pred[folds != 2])


def test_linear_baseline_error_correlation_without_the_shared_age_trend():
    baseline = _script("linear_baseline")
    rng = np.random.default_rng(1)
    ages = rng.uniform(20, 80, 500)
    shrink = 50 + 0.6 * (ages - 50)  # both models regress to the mean in the same way
    first = shrink + rng.standard_normal(500)
    second = shrink + rng.standard_normal(500)
    assert baseline.error_correlation(ages, first, second) > 0.9
    assert abs(baseline.error_correlation(ages, first, second, detrend=True)) < 0.15


def test_input_reference_is_made_from_every_training_participant_of_v2():
    reference = _script("input_reference")
    card = json.loads((REPO / "brainage_bids/data/models/ixi-2mm-v2.json").read_text())
    split = json.loads((REPO / "evaluation/ixi_split.json").read_text())
    assert reference.training_subjects(card) == sorted(
        s.removeprefix("sub-") for s in split["trainval"])
    assert card["input_reference"]["n_images"] == 120
    with pytest.raises(ValueError, match="no training participants"):
        reference.training_subjects({"name": "x"})


def test_input_reference_checks_find_images_through_bids_naming(tmp_path):
    """Sessions included, through the participant level's own output names; an image
    without a model input is left out, and outputs of none are an error."""
    from brainage_bids.derivatives import derivative_path
    from brainage_bids.model.input_reference import image_quantiles
    from brainage_bids.templates import template_path
    from tests.test_group import MNI, build_study

    settings = build_study(tmp_path, images={"03", "11"})
    quantiles = image_quantiles(template_path("brain"), template_path("brain", "mask"))
    reference = {"quantiles": quantiles.tolist(), "threshold": 0.1}
    check = _script("input_reference").check_outputs
    derivative_path(settings.output_dir, {"subject": "03"}, suffix="T1w",
                    extension=".nii.gz", desc="preproc", **MNI).unlink()
    rows = check(settings.bids_dir, settings.output_dir, reference)
    assert [r["image"] for r in rows] == ["sub-11_ses-1", "sub-11_ses-2"]
    records = [json.loads(derivative_path(settings.output_dir, {"subject": "11",
                                                                "session": ses},
                                          suffix="brainage", extension=".json").read_text())
               for ses in ("1", "2")]
    for row, record in zip(rows, records, strict=True):
        assert row["intensity_distance"] == pytest.approx(0.0, abs=1e-4) and row["passes"]
        assert row["predicted_age"] == record["predicted_age"]
        assert row["age"] == record["chronological_age"]
    with pytest.raises(ValueError, match="no model inputs"):
        check(settings.bids_dir, tmp_path / "empty", reference)


def test_damaged_copies_change_the_intensities_not_the_head():
    damaged = _script("damaged_sample").damaged
    rng = np.random.default_rng(0)
    head = rng.uniform(0, 900, size=(20, 20, 20))
    copies = damaged(head)
    assert set(copies) == {"", "gamma2", "post8", "speckle"}
    assert all(c.dtype == np.uint8 and c.shape == head.shape for c in copies.values())
    plain = copies[""].astype(float)
    order = np.argsort(plain, axis=None)
    assert np.all(np.diff(copies["gamma2"].ravel()[order].astype(int)) >= 0)  # monotone
    assert np.all(copies["gamma2"] <= copies[""])  # x**2 darkens: white matter stands out
    assert len(np.unique(copies["post8"])) == 8
    changed = copies["speckle"] != copies[""]
    assert 0.005 < changed.mean() < 0.015 and np.all(copies["speckle"][changed] == 255)


def test_linear_baseline_leave_one_out_shortcut_matches_refitting():
    baseline = _script("linear_baseline")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 120))
    y = 50 + x[:, :5].sum(axis=1) * 3 + rng.normal(0, 4, 30)
    for alpha in (1e-4, 0.3, 3.0):
        refitted = [baseline.ridge_fit_predict(np.delete(x, i, 0), np.delete(y, i), x[i:i + 1],
                                               alphas=np.array([alpha]))[0][0]
                    for i in range(30)]  # each row predicted by a fit without it
        brute = np.mean(np.abs(np.array(refitted) - y))
        # the shortcut's scale comes from all rows, a refit's from the others: nearly equal
        assert baseline.loo_mae(x, y, np.array([alpha]))[0] == pytest.approx(brute, rel=0.05)


def test_damaged_sample_keeps_sessions_and_their_ages(tmp_path):
    """Every T1w image, sessions and runs included, gets its three damaged copies under new
    participant labels, with the source's age (participants.tsv) and session ages."""
    bids = tmp_path / "bids"
    rng = np.random.default_rng(0)
    (bids / "sub-01" / "ses-a" / "anat").mkdir(parents=True)
    (bids / "sub-01" / "ses-b" / "anat").mkdir(parents=True)
    (bids / "sub-02" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t60\n")
    (bids / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-a\t30\n"
                                                         "ses-b\t32\n")
    for path in ("sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
                 "sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"):
        nib.save(nib.Nifti1Image(rng.uniform(0, 900, (8, 8, 8)).astype(np.float32), np.eye(4)),
                 bids / path)
    out = tmp_path / "damaged"
    assert _script("damaged_sample").main([str(out), "--bids", str(bids)]) == 0
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_T1w.nii.gz"))
    assert len(made) == 12
    assert "sub-01gamma2/ses-b/anat/sub-01gamma2_ses-b_T1w.nii.gz" in made
    assert "sub-02speckle/anat/sub-02speckle_T1w.nii.gz" in made
    rows = (out / "participants.tsv").read_text().splitlines()
    assert "sub-01post8\t30" in rows and "sub-02gamma2\t60" in rows and len(rows) == 9
    assert (out / "sub-01speckle" / "sub-01speckle_sessions.tsv").read_text().endswith(
        "ses-b\t32\n")
    assert _script("damaged_sample").main([str(out), "--bids", str(bids)]) == 1  # exists
    assert _script("damaged_sample").main([str(tmp_path / "new"), "--bids",
                                           str(tmp_path / "no-such-dataset")]) == 1
    assert not (tmp_path / "new").exists()
