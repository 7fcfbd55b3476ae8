"""Methods boilerplate: what ran, in words a paper can use, with its references.

Like fMRIPrep's boilerplate, the text is generated from the run itself (the backend that
preprocessed, the software versions installed, the model card's name, checksum,
architecture and training data, the uncertainty and bias-correction settings) so that it
cannot drift from what was done. It is written to ``logs/CITATION.md`` (and the references
to ``logs/CITATION.bib``) and shown in the reports' Methods section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from brainage_bids import __version__
from brainage_bids.io import atomic_write_text

#: key -> (short citation for the text, full reference, BibTeX entry)
REFERENCES: dict[str, tuple[str, str, str]] = {
    "kancharla2024": (
        "Kancharla & Sinha, 2024",
        "V. K. Kancharla and N. Sinha. MRI Volume-Based Robust Brain Age Estimation Using "
        "Weight-Shared Spatial Attention in 3D CNNs. arXiv:2407.06686, 2024.",
        "@misc{kancharla2024,\n  author = {Kancharla, V. K. and Sinha, N.},\n  title = {MRI "
        "Volume-Based Robust Brain Age Estimation Using Weight-Shared Spatial Attention in 3D "
        "CNNs},\n  year = {2024},\n  eprint = {2407.06686},\n  archivePrefix = {arXiv}\n}"),
    "woo2018": (
        "Woo et al., 2018",
        "S. Woo, J. Park, J.-Y. Lee and I. S. Kweon. CBAM: Convolutional Block Attention "
        "Module. ECCV 2018.",
        "@inproceedings{woo2018,\n  author = {Woo, S. and Park, J. and Lee, J.-Y. and Kweon, "
        "I. S.},\n  title = {{CBAM}: Convolutional Block Attention Module},\n  booktitle = "
        "{ECCV},\n  year = {2018}\n}"),
    "selvaraju2017": (
        "Selvaraju et al., 2017",
        "R. R. Selvaraju et al. Grad-CAM: Visual Explanations from Deep Networks via "
        "Gradient-Based Localization. ICCV 2017.",
        "@inproceedings{selvaraju2017,\n  author = {Selvaraju, R. R. and others},\n  title = "
        "{Grad-{CAM}: Visual Explanations from Deep Networks via Gradient-Based "
        "Localization},\n  booktitle = {ICCV},\n  year = {2017}\n}"),
    "gal2016": (
        "Gal & Ghahramani, 2016",
        "Y. Gal and Z. Ghahramani. Dropout as a Bayesian Approximation: Representing Model "
        "Uncertainty in Deep Learning. ICML 2016.",
        "@inproceedings{gal2016,\n  author = {Gal, Y. and Ghahramani, Z.},\n  title = "
        "{Dropout as a {B}ayesian Approximation: Representing Model Uncertainty in Deep "
        "Learning},\n  booktitle = {ICML},\n  year = {2016}\n}"),
    "jenkinson2012": (
        "Jenkinson et al., 2012",
        "M. Jenkinson, C. F. Beckmann, T. E. J. Behrens, M. W. Woolrich and S. M. Smith. FSL. "
        "NeuroImage 62(2):782-790, 2012.",
        "@article{jenkinson2012,\n  author = {Jenkinson, M. and Beckmann, C. F. and Behrens, "
        "T. E. J. and Woolrich, M. W. and Smith, S. M.},\n  title = {{FSL}},\n  journal = "
        "{NeuroImage},\n  volume = {62},\n  number = {2},\n  pages = {782--790},\n  year = "
        "{2012}\n}"),
    "smith2002": (
        "Smith, 2002",
        "S. M. Smith. Fast robust automated brain extraction. Human Brain Mapping "
        "17(3):143-155, 2002.",
        "@article{smith2002,\n  author = {Smith, S. M.},\n  title = {Fast robust automated "
        "brain extraction},\n  journal = {Human Brain Mapping},\n  volume = {17},\n  number = "
        "{3},\n  pages = {143--155},\n  year = {2002}\n}"),
    "jenkinson2001": (
        "Jenkinson & Smith, 2001",
        "M. Jenkinson and S. Smith. A global optimisation method for robust affine "
        "registration of brain images. Medical Image Analysis 5(2):143-156, 2001.",
        "@article{jenkinson2001,\n  author = {Jenkinson, M. and Smith, S.},\n  title = {A "
        "global optimisation method for robust affine registration of brain images},\n  "
        "journal = {Medical Image Analysis},\n  volume = {5},\n  number = {2},\n  pages = "
        "{143--156},\n  year = {2001}\n}"),
    "avants2011": (
        "Avants et al., 2011",
        "B. B. Avants, N. J. Tustison, G. Song, P. A. Cook, A. Klein and J. C. Gee. A "
        "reproducible evaluation of ANTs similarity metric performance in brain image "
        "registration. NeuroImage 54(3):2033-2044, 2011.",
        "@article{avants2011,\n  author = {Avants, B. B. and Tustison, N. J. and Song, G. and "
        "Cook, P. A. and Klein, A. and Gee, J. C.},\n  title = {A reproducible evaluation of "
        "{ANTs} similarity metric performance in brain image registration},\n  journal = "
        "{NeuroImage},\n  volume = {54},\n  number = {3},\n  pages = {2033--2044},\n  year = "
        "{2011}\n}"),
    "tustison2021": (
        "Tustison et al., 2021",
        "N. J. Tustison et al. The ANTsX ecosystem for quantitative biological and medical "
        "imaging. Scientific Reports 11:9068, 2021.",
        "@article{tustison2021,\n  author = {Tustison, N. J. and others},\n  title = {The "
        "{ANTsX} ecosystem for quantitative biological and medical imaging},\n  journal = "
        "{Scientific Reports},\n  volume = {11},\n  pages = {9068},\n  year = {2021}\n}"),
    "tustison2010": (
        "Tustison et al., 2010",
        "N. J. Tustison et al. N4ITK: Improved N3 Bias Correction. IEEE Transactions on "
        "Medical Imaging 29(6):1310-1320, 2010.",
        "@article{tustison2010,\n  author = {Tustison, N. J. and others},\n  title = "
        "{{N4ITK}: Improved {N3} Bias Correction},\n  journal = {IEEE Transactions on Medical "
        "Imaging},\n  volume = {29},\n  number = {6},\n  pages = {1310--1320},\n  year = "
        "{2010}\n}"),
    "gorgolewski2011": (
        "Gorgolewski et al., 2011",
        "K. Gorgolewski et al. Nipype: a flexible, lightweight and extensible neuroimaging "
        "data processing framework in Python. Frontiers in Neuroinformatics 5:13, 2011.",
        "@article{gorgolewski2011,\n  author = {Gorgolewski, K. and others},\n  title = "
        "{Nipype: a flexible, lightweight and extensible neuroimaging data processing "
        "framework in {P}ython},\n  journal = {Frontiers in Neuroinformatics},\n  volume = "
        "{5},\n  pages = {13},\n  year = {2011}\n}"),
    "yarkoni2019": (
        "Yarkoni et al., 2019",
        "T. Yarkoni et al. PyBIDS: Python tools for BIDS datasets. Journal of Open Source "
        "Software 4(40):1294, 2019.",
        "@article{yarkoni2019,\n  author = {Yarkoni, T. and others},\n  title = {{PyBIDS}: "
        "{P}ython tools for {BIDS} datasets},\n  journal = {Journal of Open Source Software},"
        "\n  volume = {4},\n  number = {40},\n  pages = {1294},\n  year = {2019}\n}"),
    "paszke2019": (
        "Paszke et al., 2019",
        "A. Paszke et al. PyTorch: An Imperative Style, High-Performance Deep Learning "
        "Library. NeurIPS 2019.",
        "@inproceedings{paszke2019,\n  author = {Paszke, A. and others},\n  title = "
        "{{PyTorch}: An Imperative Style, High-Performance Deep Learning Library},\n  "
        "booktitle = {NeurIPS},\n  year = {2019}\n}"),
    "evans2012": (
        "Evans et al., 2012",
        "A. C. Evans, A. L. Janke, D. L. Collins and S. Baillet. Brain templates and atlases. "
        "NeuroImage 62(2):911-922, 2012.",
        "@article{evans2012,\n  author = {Evans, A. C. and Janke, A. L. and Collins, D. L. "
        "and Baillet, S.},\n  title = {Brain templates and atlases},\n  journal = "
        "{NeuroImage},\n  volume = {62},\n  number = {2},\n  pages = {911--922},\n  year = "
        "{2012}\n}"),
    "ciric2022": (
        "Ciric et al., 2022",
        "R. Ciric et al. TemplateFlow: FAIR-sharing of multi-scale, multi-species brain "
        "models. Nature Methods 19:1568-1571, 2022.",
        "@article{ciric2022,\n  author = {Ciric, R. and others},\n  title = {{TemplateFlow}: "
        "{FAIR}-sharing of multi-scale, multi-species brain models},\n  journal = {Nature "
        "Methods},\n  volume = {19},\n  pages = {1568--1571},\n  year = {2022}\n}"),
    "ixi": (
        "IXI dataset",
        "IXI dataset, Imperial College London (EPSRC GR/S21533/02), "
        "https://brain-development.org/ixi-dataset/, CC BY-SA 3.0.",
        "@misc{ixi,\n  title = {{IXI} dataset},\n  howpublished = "
        "{\\url{https://brain-development.org/ixi-dataset/}},\n  note = {Imperial College "
        "London, EPSRC GR/S21533/02}\n}"),
    "beheshti2019": (
        "Beheshti et al., 2019",
        "I. Beheshti, S. Nugent, O. Potvin and S. Duchesne. Bias-adjustment in "
        "neuroimaging-based brain age frameworks: A robust scheme. NeuroImage: Clinical "
        "24:102063, 2019.",
        "@article{beheshti2019,\n  author = {Beheshti, I. and Nugent, S. and Potvin, O. and "
        "Duchesne, S.},\n  title = {Bias-adjustment in neuroimaging-based brain age "
        "frameworks: A robust scheme},\n  journal = {NeuroImage: Clinical},\n  volume = "
        "{24},\n  pages = {102063},\n  year = {2019}\n}"),
    "delange2020": (
        "de Lange & Cole, 2020",
        "A.-M. G. de Lange and J. H. Cole. Commentary: Correction procedures in brain-age "
        "prediction. NeuroImage: Clinical 26:102229, 2020.",
        "@article{delange2020,\n  author = {de Lange, A.-M. G. and Cole, J. H.},\n  title = "
        "{Commentary: Correction procedures in brain-age prediction},\n  journal = "
        "{NeuroImage: Clinical},\n  volume = {26},\n  pages = {102229},\n  year = {2020}\n}"),
    "smith2019": (
        "Smith et al., 2019",
        "S. M. Smith, D. Vidaurre, F. Alfaro-Almagro, T. E. Nichols and K. L. Miller. "
        "Estimation of brain age delta from brain imaging. NeuroImage 200:528-539, 2019.",
        "@article{smith2019,\n  author = {Smith, S. M. and Vidaurre, D. and Alfaro-Almagro, "
        "F. and Nichols, T. E. and Miller, K. L.},\n  title = {Estimation of brain age delta "
        "from brain imaging},\n  journal = {NeuroImage},\n  volume = {200},\n  pages = "
        "{528--539},\n  year = {2019}\n}"),
}
BIAS_REFERENCES = {"beheshti": "beheshti2019", "cole": "delange2020", "smith": "smith2019"}
BIAS_TEXT = {
    "beheshti": "the gap regressed on age (gap = a*age + b) and the fitted line subtracted",
    "cole": "predicted age regressed on age (P = a*age + b) and the predicted age corrected "
            "as (P - b)/a",
    "smith": "the gap residualised on age",
}

ATTENTION_TEXT = {"shared": "one spatial-attention module shared by all blocks",
                  "separate": "a spatial-attention module per block"}


@dataclass
class Methods:
    """Paragraphs of methods text and the references they cite, in citation order."""

    paragraphs: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    def cite(self, *keys: str) -> str:
        """``(Kancharla & Sinha, 2024; ...)`` for the text, remembering the references."""
        for key in keys:
            if key not in self.references:
                self.references.append(key)
        return "(" + "; ".join(REFERENCES[k][0] for k in keys) + ")"

    def reference_list(self) -> list[str]:
        return [REFERENCES[k][1] for k in self.references]

    def markdown(self) -> str:
        text = ["# Methods", "", "*Generated by brainage-bids from the run itself; you may "
                "copy it into a paper unchanged, and edit it freely.*", ""]
        for paragraph in self.paragraphs:
            text += [paragraph, ""]
        text += ["## References", ""]
        text += [f"{i}. {ref}" for i, ref in enumerate(self.reference_list(), start=1)]
        return "\n".join(text) + "\n"

    def bibtex(self) -> str:
        return "\n\n".join(REFERENCES[k][2] for k in self.references) + "\n"


def software_versions() -> dict[str, str]:
    """Versions of the packages (and FSL) a run depends on, as installed here."""
    out = {"brainage-bids": __version__}
    for name in ("nipype", "pybids", "torch", "nibabel", "antspyx", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    fsl_dir = os.environ.get("FSLDIR")
    version_file = Path(fsl_dir) / "etc" / "fslversion" if fsl_dir else None
    if version_file is not None and version_file.is_file():
        out["FSL"] = version_file.read_text().split(":")[0].strip()
    return out


def _version(versions: dict[str, str], name: str) -> str:
    return f" {versions[name]}" if name in versions else ""


def _preprocessing(methods: Methods, backend: str, versions: dict[str, str]) -> str:
    software = (f"Each T1-weighted image was processed with brainage-bids {__version__}, built "
                f"on Nipype{_version(versions, 'nipype')} {methods.cite('gorgolewski2011')} and"
                f" PyBIDS{_version(versions, 'pybids')} {methods.cite('yarkoni2019')}.")
    if backend == "fsl":
        steps = (f"The brain was extracted with FSL{_version(versions, 'FSL')} BET "
                 f"(fractional intensity 0.5, robust centre estimation) "
                 f"{methods.cite('jenkinson2012', 'smith2002')} and registered to the "
                 f"MNI152NLin6Asym brain template at 2 mm with FLIRT (12 degrees of freedom, "
                 f"correlation ratio) {methods.cite('jenkinson2001')}; the brain mask was "
                 "moved with the same matrix (nearest neighbour).")
    else:
        steps = (f"Intensity non-uniformity was corrected with N4 {methods.cite('tustison2010')}"
                 f"; the brain was extracted with a template-based procedure and registered to"
                 f" the MNI152NLin6Asym brain template at 2 mm with a 12-parameter affine "
                 f"transform, both with ANTs {methods.cite('avants2011')} through "
                 f"ANTsPy{_version(versions, 'antspyx')} {methods.cite('tustison2021')}.")
    return (f"{software} The image was checked and reoriented. {steps} The template is "
            f"FSL's MNI152 non-linear 6th-generation asymmetric template "
            f"{methods.cite('evans2012')}, in TemplateFlow's naming "
            f"{methods.cite('ciric2022')}, on a 91 x 109 x 91 grid of 2 mm voxels. Registration"
            " quality was checked by the Dice overlap of the registered brain mask with the "
            "template's brain mask, the correlation of the registered brain with the template "
            "and the brain volume.")


def describe_uncertainty(*, samples: Any, n_members: int = 1, scale: Any = None,
                         scaled: str | None = "mc_sd", fitted_on: str | None = None,
                         method: str | None = None, cite: str = "") -> str:
    """What a prediction's SD is, as a clause (methods text, report captions).

    Follows :func:`brainage_bids.model.uncertainty.calibrated_sd`: a single model's SD is its
    Monte-Carlo dropout spread, scaled; an ensemble's combines the members' spread with it,
    and the card says which of the two the calibration scale multiplies (``scaled``).
    ``method`` is the record's or card's ``uncertainty.method``: ``none`` and ``ensemble``
    mean a model without dropout.
    """
    if method == "none":
        return "not available (the model has no dropout)"
    cite = f" {cite}" if cite else ""
    dropout = method != "ensemble"
    if n_members > 1 and dropout:
        text = (f"the standard deviation of the {n_members} members' predictions combined with "
                f"their Monte-Carlo dropout standard deviation ({samples} passes each){cite}")
    elif n_members > 1:
        text = f"the standard deviation of the {n_members} members' predictions"
    else:
        text = f"the standard deviation of {samples} Monte-Carlo dropout predictions{cite}"
    calibrated = (isinstance(scale, int | float) and not isinstance(scale, bool) and scale > 0
                  and (dropout or scaled == "raw_sd"))
    if not calibrated:
        return text + ", not calibrated"
    held_out = "predictions the model was not trained on" + (f": {fitted_on}" if fitted_on
                                                             else "")
    if n_members > 1 and scaled == "mc_sd":
        return (text + f", as sqrt((k * MC-dropout SD)^2 + member SD^2) with k = {scale:.3g}, "
                f"fitted so that k * MC-dropout SD matches the errors of single members on "
                f"{held_out}; the members' spread, added on top, makes it wider than the "
                "ensemble's typical error: read it as a conservative typical error, not as a "
                "confidence interval for this scan")
    return text + f", scaled by {scale:.3g} so that it matches the errors of {held_out}"


def _model(methods: Methods, card: dict[str, Any], versions: dict[str, str],
           mc_samples: int, saliency: bool) -> str:
    arch = card.get("architecture") or {}
    member = arch.get("member", arch)
    n_members = int(arch.get("n_members", 1) or 1)
    training = card.get("training_data") or {}
    data_name = training.get("name") if isinstance(training, dict) else training
    age_range = (card.get("training") or {}).get("age_range")
    name = card.get("name", "unnamed")
    sha = card.get("sha256") or "n/a"
    if member.get("name", "BrainAgeNet") == "BrainAgeNet":
        attention = ATTENTION_TEXT.get(member.get("attention", "shared"), "no attention")
        shape = (f"a 3D convolutional network with seven convolution blocks and {attention} "
                 f"{methods.cite('kancharla2024', 'woo2018')}")
    else:
        shape = f"a {member.get('name')} network"
    params = member.get("parameters") or member.get("n_parameters")
    text = (f"Brain age was predicted with the model {name} (weights SHA-256 {sha}), "
            f"{shape}" + (f", {int(params):,} parameters" if isinstance(params, int) else ""))
    if n_members > 1:
        text += f", as an ensemble of {n_members} members whose predictions were averaged"
    text += f", in PyTorch{_version(versions, 'torch')} {methods.cite('paszke2019')}."
    if data_name:
        notes = [methods.cite("ixi")[1:-1]] if "IXI" in str(data_name) else []
        if isinstance(age_range, (list, tuple)) and len(age_range) == 2:
            notes.append(f"ages {age_range[0]:g} to {age_range[1]:g} years")
        text += f" The model was trained on {data_name}"
        text += f" ({'; '.join(notes)})." if notes else "."
    text += (" The input was the skull-stripped registered image, its intensities normalised "
             "inside the brain mask as in training.")
    reference = card.get("input_reference")
    if isinstance(reference, dict) and isinstance(reference.get("threshold"), (int, float)):
        text += (" Quality control also compared the percentiles of these normalised "
                 "intensities with those of the model's training inputs (mean absolute "
                 "difference); an image further than "
                 f"{float(reference['threshold']):g} within-brain standard deviations, "
                 f"{reference.get('threshold_rule', 'a threshold set from the training images')}"
                 ", failed it.")
    inference = card.get("inference") or {}
    jitter = inference.get("grid_jitter") or {}
    if isinstance(jitter, dict) and int(jitter.get("n", 0) or 0) > 0:
        text += (f" Each prediction was averaged over that image and {int(jitter['n'])} more "
                 "resamplings of the native-space brain onto the template grid, shifted by "
                 f"fixed offsets of up to {float(jitter.get('max_mm', 0)):g} mm per axis")
        text += (", each with its left-right mirror image." if inference.get("flip_tta")
                 else ".")
    elif inference.get("flip_tta"):
        text += " Each prediction was averaged over that image and its left-right mirror image."
    uncertainty = card.get("uncertainty") or {}
    text += (" The uncertainty is " + describe_uncertainty(
        samples=mc_samples, n_members=n_members, scale=uncertainty.get("calibration_scale"),
        scaled=uncertainty.get("scaled", "mc_sd"), fitted_on=uncertainty.get("fitted_on"),
        method=uncertainty.get("method"), cite=methods.cite("gal2016")) + ".")
    if saliency:
        text += (" Saliency maps were computed with Grad-CAM for each convolution block "
                 f"{methods.cite('selvaraju2017')}.")
    return text


def _bias(methods: Methods, method: str, source: str | None,
          corrections: dict[str, dict[str, Any]] | None = None,
          group: dict[str, Any] | None = None) -> str:
    corrections = corrections or {}

    def fit(entry: dict[str, Any]) -> str:
        n = entry.get("N")
        where = entry.get("Source")
        return "; ".join(str(x) for x in (where, None if n is None else f"n = {n}") if x)

    text = ""
    if group and group.get("images") is not None:
        text = (f"The group comprised {group['images']} image(s) of "
                f"{group.get('participants')} participant(s), "
                f"{group.get('images_qc_fail', 0)} of which failed quality control. ")
    text += (f"The brain-age gap (predicted minus chronological age) was corrected for its "
             f"dependence on age {methods.cite(BIAS_REFERENCES[method])}: {BIAS_TEXT[method]}")
    primary = fit(corrections.get(method) or {}) or source
    if primary:
        text += f" (coefficients: {primary})"
    text += "."
    others = [m for m in BIAS_REFERENCES if m != method and (corrections.get(m) or {}).get(
        "Coefficients")]
    if others:
        text += " The table also gives the gap corrected as in " + "; and as in ".join(
            f"{methods.cite(BIAS_REFERENCES[m])}, {BIAS_TEXT[m]} ({fit(corrections[m])})"
            for m in others) + "."
    return text + " Uncorrected gaps, MAE and r(gap, age) are reported beside corrected values."


def participant_methods(*, backend: str, card: dict[str, Any], mc_samples: int,
                        saliency: bool = True,
                        versions: dict[str, str] | None = None) -> Methods:
    """The methods of a participant-level run (preprocessing, model, uncertainty)."""
    versions = software_versions() if versions is None else versions
    methods = Methods()
    methods.paragraphs.append(_preprocessing(methods, backend, versions))
    methods.paragraphs.append(_model(methods, card, versions, mc_samples, saliency))
    return methods


def group_methods(*, backend: str, card: dict[str, Any], mc_samples: int, bias_method: str,
                  bias_source: str | None, saliency: bool = True,
                  versions: dict[str, str] | None = None,
                  corrections: dict[str, dict[str, Any]] | None = None,
                  group: dict[str, Any] | None = None) -> Methods:
    """The participant-level methods plus the group's bias corrections.

    ``corrections`` is the group sidecar's ``BiasCorrection`` (each method's source, ``N``
    and coefficients) and ``group`` its ``N``; without them only ``bias_source`` is named.
    """
    methods = participant_methods(backend=backend, card=card, mc_samples=mc_samples,
                                  saliency=saliency, versions=versions)
    methods.paragraphs.append(_bias(methods, bias_method, bias_source, corrections, group))
    return methods


def write_citation(logs_dir: Path, methods: Methods) -> Path:
    """``logs/CITATION.md`` and ``logs/CITATION.bib``; returns the Markdown file."""
    atomic_write_text(Path(logs_dir) / "CITATION.bib", methods.bibtex())
    return atomic_write_text(Path(logs_dir) / "CITATION.md", methods.markdown())
