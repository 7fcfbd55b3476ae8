"""T1w preprocessing: validate, reorient, (bias-correct,) skull-strip, affine to MNI 2 mm.

Two backends give the same outputs (``outputnode``):
``brain_mni`` (91x109x91 skull-stripped T1w), ``mask_mni``, ``mask_native``, ``brain_native``
(the skull-stripped T1w on the input grid, the image that was registered), ``transform``
(native -> MNI affine, in the backend's own format) and ``qc_file`` (registration QC JSON).
"""

from __future__ import annotations

import shutil
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from brainage_bids.interfaces.images import ValidateT1w
from brainage_bids.templates import template_path

BACKENDS = ("fsl", "ants")
#: How each backend stores the affine (written into the transform's JSON sidecar).
TRANSFORM_FORMATS = {
    "fsl": {"Format": "FSL FLIRT matrix (.mat, text)", "Software": "FSL flirt"},
    "ants": {"Format": "ITK affine (.mat, MatrixOffsetTransformBase)", "Software": "ANTs"},
}
#: ITK threads of the ANTs backend's nodes: one, so that a rerun gives the same numbers.
ANTS_THREADS = 1
OUTPUT_FIELDS = ["brain_mni", "mask_mni", "mask_native", "brain_native", "transform",
                 "qc_file", "t1w_info"]


class BackendError(RuntimeError):
    """The requested preprocessing backend is not available here."""


def fsl_available() -> bool:
    """FSL's backend needs both ``bet`` and ``flirt`` on PATH (and FSLOUTPUTTYPE set)."""
    return shutil.which("bet") is not None and shutil.which("flirt") is not None


def resolve_backend(name: str) -> str:
    """``auto`` picks FSL (the paper's tools) when installed, else the pure-pip ANTs one."""
    if name == "auto":
        return "fsl" if fsl_available() else "ants"
    if name == "fsl" and not fsl_available():
        raise BackendError("--preproc fsl needs FSL's bet and flirt on PATH; install FSL, "
                           "use the container, or use --preproc ants")
    if name not in BACKENDS:
        raise BackendError(f"unknown preprocessing backend {name!r}")
    return name


def backend_mismatch(backend: str, model_backend: Any, model: str) -> str | None:
    """A warning when images are preprocessed otherwise than the model's training images
    (``model_backend``: its card's ``preprocessing.backend``; nothing said unless it names
    one backend)."""
    if model_backend not in BACKENDS or backend == model_backend:
        return None
    return (f"preprocessing with the {backend} backend, but {model} was trained on "
            f"{model_backend}-preprocessed images: its accuracy and its invariance figures "
            f"hold for {model_backend} inputs only; pass --preproc {model_backend} to match")


def init_t1w_preproc_wf(*, backend: str, omp_nthreads: int,
                        name: str = "t1w_preproc_wf") -> pe.Workflow:
    """Preprocess one T1w image with ``backend`` (``fsl`` or ``ants``)."""
    from brainage_bids.interfaces.ants import RegistrationQC

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")
    validate = pe.Node(ValidateT1w(), name="validate")
    qc = pe.Node(RegistrationQC(), name="registration_qc")
    register = (init_fsl_wf if backend == "fsl" else init_ants_wf)(omp_nthreads=omp_nthreads)
    workflow.connect([
        (inputnode, validate, [("t1w", "in_file")]),
        (validate, register, [("out_file", "inputnode.t1w")]),
        (validate, outputnode, [("info", "t1w_info")]),
        (register, qc, [("outputnode.brain_mni", "brain_mni"),
                        ("outputnode.mask_mni", "mask_mni"),
                        ("outputnode.mask_native", "mask_native")]),
        (register, outputnode, [("outputnode.brain_mni", "brain_mni"),
                                ("outputnode.mask_mni", "mask_mni"),
                                ("outputnode.mask_native", "mask_native"),
                                ("outputnode.brain_native", "brain_native"),
                                ("outputnode.transform", "transform")]),
        (qc, outputnode, [("out_qc", "qc_file")]),
    ])
    return workflow


def init_ants_wf(*, omp_nthreads: int, name: str = "ants_wf") -> pe.Workflow:
    """Pure-pip backend: N4, template-based skull strip, 12-dof affine (antspyx)."""
    from brainage_bids.interfaces.ants import AntsExtractRegister, N4BiasCorrect

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["brain_mni", "mask_mni", "mask_native", "brain_native", "transform"]),
        name="outputnode")
    # One ITK thread, whatever omp_nthreads says: with more, ITK sums the metric in a
    # varying order, the affine moves by ~0.1 mm from run to run and the predicted age by up
    # to a year. Parallelism comes from running several images at once (--nprocs).
    del omp_nthreads
    n4 = pe.Node(N4BiasCorrect(num_threads=ANTS_THREADS), name="n4", n_procs=ANTS_THREADS)
    register = pe.Node(AntsExtractRegister(num_threads=ANTS_THREADS), name="extract_register",
                       n_procs=ANTS_THREADS)
    workflow.connect([
        (inputnode, n4, [("t1w", "in_file")]),
        (n4, register, [("out_file", "in_file")]),
        (register, outputnode, [("out_brain_mni", "brain_mni"),
                                ("out_mask_mni", "mask_mni"),
                                ("out_mask_native", "mask_native"),
                                ("out_brain_native", "brain_native"),
                                ("out_transform", "transform")]),
    ])
    return workflow


def init_fsl_wf(*, omp_nthreads: int, name: str = "fsl_wf") -> pe.Workflow:
    """The paper's preprocessing: FSL ``bet`` then ``flirt -dof 12`` to MNI152_T1_2mm_brain.

    The brain mask follows the brain through the same matrix (nearest neighbour), so the
    model sees exactly the voxels FLIRT produced.
    """
    from nipype.interfaces import fsl

    del omp_nthreads  # bet and flirt are single-threaded
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["brain_mni", "mask_mni", "mask_native", "brain_native", "transform"]),
        name="outputnode")
    bet = pe.Node(fsl.BET(frac=0.5, robust=True, mask=True, output_type="NIFTI_GZ"),
                  name="bet")
    flirt = pe.Node(fsl.FLIRT(reference=str(template_path("brain")), dof=12,
                              cost="corratio", interp="trilinear", datatype="float",
                              out_matrix_file="t1w_to_mni.mat", output_type="NIFTI_GZ"),
                    name="flirt")
    mask_to_mni = pe.Node(fsl.ApplyXFM(reference=str(template_path("brain")), apply_xfm=True,
                                       interp="nearestneighbour", datatype="char",
                                       output_type="NIFTI_GZ"),
                          name="mask_to_mni")
    workflow.connect([
        (inputnode, bet, [("t1w", "in_file")]),
        (bet, flirt, [("out_file", "in_file")]),
        (bet, mask_to_mni, [("mask_file", "in_file")]),
        (flirt, mask_to_mni, [("out_matrix_file", "in_matrix_file")]),
        (flirt, outputnode, [("out_file", "brain_mni"), ("out_matrix_file", "transform")]),
        (bet, outputnode, [("mask_file", "mask_native"), ("out_file", "brain_native")]),
        (mask_to_mni, outputnode, [("out_file", "mask_mni")]),
    ])
    return workflow
