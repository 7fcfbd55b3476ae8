"""Workflow construction without running, and the FSL backend's command lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from brainage_bids.bids import collect_t1w, load_layout
from brainage_bids.templates import template_path
from brainage_bids.workflows.participant import init_single_t1w_wf
from brainage_bids.workflows.preproc import (
    BackendError,
    init_fsl_wf,
    init_t1w_preproc_wf,
    resolve_backend,
)

from .conftest import SAMPLE

T1W = SAMPLE / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"


def _node(workflow, name):
    node = workflow.get_node(name)
    assert node is not None, f"{name} not in {workflow.list_node_names()}"
    return node


def test_fsl_command_lines(tmp_path):
    wf = init_fsl_wf(omp_nthreads=1)
    bet = _node(wf, "bet").interface
    bet.inputs.in_file = str(T1W)
    assert bet.cmd == "bet"
    args = bet.cmdline.split()
    assert Path(args[1]).resolve() == T1W and {"-f", "0.50", "-m", "-R"} <= set(args)

    flirt = _node(wf, "flirt").interface
    flirt.inputs.in_file = str(T1W)
    line = flirt.cmdline
    assert line.startswith("flirt -in ")
    for part in ("-dof 12", f"-ref {template_path('brain')}", "-omat t1w_to_mni.mat",
                 "-cost corratio", "-interp trilinear", "-datatype float"):
        assert part in line, (part, line)

    to_mni = _node(wf, "mask_to_mni").interface
    to_mni.inputs.in_file = str(T1W)
    matrix = tmp_path / "x.mat"
    matrix.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    to_mni.inputs.in_matrix_file = str(matrix)
    line = to_mni.cmdline
    for part in ("-applyxfm", f"-init {matrix}", "-interp nearestneighbour"):
        assert part in line, (part, line)


def test_backend_resolution(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert resolve_backend("auto") == "ants"
    with pytest.raises(BackendError, match="bet and flirt"):
        resolve_backend("fsl")
    assert resolve_backend("ants") == "ants"


def test_a_backend_unlike_the_models_is_said(monkeypatch, tmp_path):
    """In the container FSL is the default, but the shipped models were trained on ANTs
    inputs: the run says so."""
    from brainage_bids.workflows.preproc import backend_mismatch

    for tool in ("bet", "flirt"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_backend("auto") == "fsl"  # DESIGN.md: used when FSL is installed
    warning = backend_mismatch("fsl", "ants", "ixi-2mm-v2")
    assert "trained on ants-preprocessed images" in warning and "--preproc ants" in warning
    assert backend_mismatch("ants", "ants", "m") is None
    for unclear in (None, "unknown", ["ants", "fsl"]):  # nothing to advise
        assert backend_mismatch("fsl", unclear, "m") is None


@pytest.mark.parametrize("backend", ["ants", "fsl"])
def test_preproc_wf_exposes_the_model_inputs(backend):
    wf = init_t1w_preproc_wf(backend=backend, omp_nthreads=2)
    outputs = set(wf.outputs.outputnode.get())
    assert {"brain_mni", "mask_mni", "mask_native", "brain_native", "transform",
            "qc_file"} <= outputs
    assert "validate" in wf.list_node_names()


def test_one_workflow_per_image_and_no_prediction_without_a_model(sample_bids, tmp_path):
    images = collect_t1w(load_layout(sample_bids))
    for image in images:  # the work dir's cache is keyed by this name (scheduler.BASE_NAME)
        wf = init_single_t1w_wf(image=image, bids_dir=sample_bids, output_dir=tmp_path / "out",
                                backend="ants", omp_nthreads=1, model="default")
        assert wf.name == f"t1w_{image.node_name}_wf"
        assert any("predict" in n for n in wf.list_node_names())
    single = init_single_t1w_wf(image=images[0], bids_dir=sample_bids,
                                output_dir=tmp_path / "out", backend="ants", omp_nthreads=1,
                                model=None)
    assert not any("predict" in n for n in single.list_node_names())
    assert not any("ds_record" in n for n in single.list_node_names())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bet") is None, reason="FSL is not installed here")
def test_fsl_backend_runs_for_real(tmp_path):
    wf = init_t1w_preproc_wf(backend="fsl", omp_nthreads=1)
    wf.base_dir = str(tmp_path)
    wf.inputs.inputnode.t1w = str(T1W)
    result = wf.run()
    node = next(n for n in result.nodes() if n.name == "registration_qc")
    qc = json.loads(Path(node.result.outputs.out_qc).read_text())
    assert qc["dice_template"] > 0.85
