"""The methods boilerplate says what ran: backend, versions, model, uncertainty, bias."""

from __future__ import annotations

import re

from brainage_bids.citation import (
    REFERENCES,
    group_methods,
    participant_methods,
    write_citation,
)
from brainage_bids.model.weights import registry

from .conftest import REPO, read_json

VERSIONS = {"nipype": "1.11.0", "pybids": "0.22.0", "torch": "2.13.0", "antspyx": "0.6.3",
            "FSL": "6.0.7"}


def shipped_card() -> dict:
    return read_json(REPO / "brainage_bids" / "data" / "models" /
                     f"{registry()['default']}.json")


def test_participant_methods_describe_the_ants_run_and_the_model():
    card = shipped_card()
    text = participant_methods(backend="ants", card=card, mc_samples=20,
                               versions=VERSIONS).markdown()
    for part in ("N4", "ANTsPy 0.6.3", "Nipype 1.11.0", "PyBIDS 0.22.0", "PyTorch 2.13.0",
                 "MNI152NLin6Asym", card["name"], card["sha256"], "5,408,228 parameters",
                 "one spatial-attention module shared by all blocks", "(20 passes each)",
                 "IXI", "Grad-CAM"):
        assert part in text, part
    # the shipped ensemble's SD, as brainage_bids.model.uncertainty computes it
    assert ("the standard deviation of the 5 members' predictions combined with their "
            "Monte-Carlo dropout standard deviation (20 passes each)" in text)
    assert (f"sqrt((k * MC-dropout SD)^2 + member SD^2) with k = "
            f"{card['uncertainty']['calibration_scale']:.3g}, fitted so that k * MC-dropout "
            f"SD matches the errors of single members on predictions the model was not "
            f"trained on: {card['uncertainty']['fitted_on']}; the members' spread, added on "
            f"top, makes it wider than the ensemble's typical error" in text)
    assert "validation set" not in text  # v2 is calibrated and bias-fitted out of fold
    assert ("averaged over that image and 8 more resamplings of the native-space brain" in text
            and "up to 1 mm per axis, each with its left-right mirror image." in text)
    assert "FLIRT" not in text and "BET" not in text
    references = text[text.index("## References"):]
    for key in ("kancharla2024", "avants2011", "tustison2010", "gorgolewski2011",
                "yarkoni2019", "ciric2022", "ixi"):
        assert REFERENCES[key][1] in references, key
    assert REFERENCES["jenkinson2012"][1] not in references


def test_fsl_backend_and_no_saliency_change_the_text():
    text = participant_methods(backend="fsl", card=shipped_card(), mc_samples=5,
                               saliency=False, versions=VERSIONS).markdown()
    assert "FSL 6.0.7 BET" in text and "FLIRT (12 degrees of freedom" in text
    assert "ANTs" not in text and "N4" not in text and "Grad-CAM" not in text
    assert "(5 passes each)" in text


def test_ensemble_and_group_bias_correction():
    card = {"name": "site-ens", "sha256": "ab" * 32,
            "architecture": {"n_members": 5, "member": {"name": "BrainAgeNet",
                                                        "attention": "shared"}}}
    methods = group_methods(backend="ants", card=card, mc_samples=20, bias_method="cole",
                            bias_source="fitted on the reference group group=control",
                            versions=VERSIONS)
    text = methods.markdown()
    assert "an ensemble of 5 members" in text
    assert "(de Lange & Cole, 2020)" in text and "(P - b)/a" in text
    assert "fitted on the reference group group=control" in text
    assert "Monte-Carlo dropout standard deviation (20 passes each)" in text
    assert ", not calibrated." in text  # this card has no calibration scale: none is claimed
    assert "averaged over that image" not in text  # nor test-time augmentation
    card["inference"] = {"flip_tta": True}
    text = group_methods(backend="ants", card=card, mc_samples=20, bias_method="cole",
                         bias_source=None, versions=VERSIONS).markdown()
    assert "averaged over that image and its left-right mirror image." in text


def test_group_methods_name_every_correction_with_its_fit():
    corrections = {
        "beheshti": {"Source": "model card, fitted on out-of-fold predictions", "N": 120,
                     "Coefficients": {"slope": -0.3, "intercept": 12.0}},
        "cole": {"Source": "model card, fitted on out-of-fold predictions", "N": 120,
                 "Coefficients": {"slope": 0.7, "intercept": 15.0}},
        "smith": {"Source": "fitted on this group's images", "N": 37,
                  "Coefficients": {"coef": [1.0, -0.2]}}}
    text = group_methods(backend="ants", card={"name": "m", "sha256": "ab" * 32},
                         mc_samples=20, bias_method="beheshti", bias_source=None,
                         versions=VERSIONS, corrections=corrections,
                         group={"images": 40, "participants": 38, "images_qc_fail": 3}
                         ).markdown()
    assert "The group comprised 40 image(s) of 38 participant(s), 3 of which failed" in text
    assert "(coefficients: model card, fitted on out-of-fold predictions; n = 120)" in text
    assert "(de Lange & Cole, 2020)" in text and "(Smith et al., 2019)" in text
    assert "(fitted on this group's images; n = 37)" in text


def test_citation_files_match_each_other(tmp_path):
    methods = participant_methods(backend="ants", card=shipped_card(), mc_samples=20,
                                  versions=VERSIONS)
    md = write_citation(tmp_path, methods)
    assert md == tmp_path / "CITATION.md"
    bib = (tmp_path / "CITATION.bib").read_text()
    keys = re.findall(r"^@\w+\{(\w+),", bib, flags=re.MULTILINE)
    assert keys == methods.references and len(keys) == len(set(keys))
    numbered = re.findall(r"^\d+\. ", md.read_text(), flags=re.MULTILINE)
    assert len(numbered) == len(keys)


def test_single_model_uncertainty_names_where_its_scale_was_fitted():
    v1 = read_json(REPO / "brainage_bids" / "data" / "models" / "ixi-2mm-v1.json")
    text = participant_methods(backend="ants", card=v1, mc_samples=20,
                               versions=VERSIONS).markdown()
    assert ("The uncertainty is the standard deviation of 20 Monte-Carlo dropout predictions "
            "(Gal & Ghahramani, 2016), scaled by 7.25 so that it matches the errors of "
            "predictions the model was not trained on: validation set (24 images)." in text)
    assert "members" not in text


def test_uncertainty_of_models_without_dropout():
    from brainage_bids.citation import describe_uncertainty

    assert describe_uncertainty(samples=20, method="none") == (
        "not available (the model has no dropout)")
    assert describe_uncertainty(samples=20, n_members=3, method="ensemble", scale=2.0,
                                scaled="mc_sd") == (
        "the standard deviation of the 3 members' predictions, not calibrated")
    assert describe_uncertainty(samples=20, n_members=3, method="ensemble", scale=2.0,
                                scaled="raw_sd").startswith(
        "the standard deviation of the 3 members' predictions, scaled by 2 so that")
