"""The participant level: one preprocessing (+ prediction) workflow per T1w image."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from brainage_bids.bids import T1wImage
from brainage_bids.workflows.outputs import init_derivatives_wf
from brainage_bids.workflows.preproc import init_t1w_preproc_wf


def init_single_t1w_wf(*, image: T1wImage, bids_dir: Path, output_dir: Path, backend: str,
                       omp_nthreads: int, model: str | None, device: str = "auto",
                       mc_samples: int = 20, seed: int = 42, gradcam: bool = True,
                       attention: bool = True, name: str | None = None) -> pe.Workflow:
    """Preprocess one T1w and, when ``model`` is given, predict its brain age.

    With ``model=None`` only preprocessing runs (the train level reuses it this way).
    ``gradcam`` and ``attention`` say which saliency maps the model can give and the user
    wants (no attention map for the ablation's ``none`` variant or the SFCN peer).
    """
    from brainage_bids.interfaces.model import PredictBrainAge

    workflow = pe.Workflow(name=name or f"t1w_{image.node_name}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(image.path)
    preproc = init_t1w_preproc_wf(backend=backend, omp_nthreads=omp_nthreads)
    sinks = init_derivatives_wf(output_dir=output_dir, source_entities=image.entities,
                                backend=backend, predict=model is not None,
                                gradcam=gradcam, attention=attention)
    edges = [
        (inputnode, preproc, [("t1w", "inputnode.t1w")]),
        (preproc, sinks, [("outputnode.brain_mni", "inputnode.brain_mni"),
                          ("outputnode.mask_mni", "inputnode.mask_mni"),
                          ("outputnode.mask_native", "inputnode.mask_native"),
                          ("outputnode.brain_native", "inputnode.brain_native"),
                          ("outputnode.transform", "inputnode.transform")]),
    ]
    if model is not None:
        source = {
            "subject": image.subject,
            "session": image.session,
            "run": image.entities.get("run"),
            "source_file": str(image.path.relative_to(bids_dir)),
            "age": image.age,
            "backend": backend,
        }
        predict = pe.Node(PredictBrainAge(model=model, device=device, mc_samples=mc_samples,
                                          seed=seed, num_threads=omp_nthreads,
                                          saliency=gradcam or attention, source=source),
                          name="predict", n_procs=omp_nthreads)
        edges += [
            (preproc, predict, [("outputnode.brain_mni", "brain_mni"),
                                ("outputnode.mask_mni", "mask_mni"),
                                ("outputnode.brain_native", "brain_native"),
                                ("outputnode.mask_native", "mask_native"),
                                ("outputnode.transform", "transform"),
                                ("outputnode.qc_file", "qc_file")]),
            (predict, sinks, [("out_record", "inputnode.record")]),
        ]
        if gradcam:
            edges.append((predict, sinks, [("out_gradcam", "inputnode.gradcam")]))
        if attention:
            edges.append((predict, sinks, [("out_attention", "inputnode.attention")]))
    workflow.connect(edges)
    return workflow
