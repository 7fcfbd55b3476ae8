"""What an ensemble of K members costs at the participant level: seconds and peak memory.

Runs the participant level's prediction step (``predict_brain_age`` with MC dropout, with and
without flip TTA, and with flip TTA plus the 8 grid-jitter views that ``ixi-2mm-v2`` uses,
their resampling timed apart) and its saliency step (Grad-CAM and attention maps of every
member) for K = 1, 3, 5 members, each K in a fresh process so that its peak RSS is its own,
on a real normalised brain (the MNI152 2 mm template brain). The members have random
weights: the cost does not depend on the values. Prints a table; ``--json`` keeps every run.

    python benchmarks/ensemble_cost.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from importlib import resources

from rounds import run_rounds

#: Grid-jitter views of the default model (its card's ``inference.grid_jitter.n``).
JITTER_VIEWS = 8


def one(members: int, threads: int, mc_samples: int) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    from brainage_bids.model.ensemble import BrainAgeEnsemble
    from brainage_bids.model.intensity import normalise_intensity
    from brainage_bids.model.jitter import jitter_offsets, resample_views
    from brainage_bids.model.net import BrainAgeNet
    from brainage_bids.model.predict import predict_brain_age
    from brainage_bids.model.saliency import attention_maps, gradcam_maps

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tpl = resources.files("brainage_bids") / "data" / "templates"
    brain = np.asanyarray(nib.load(tpl / "tpl-MNI152NLin6Asym_res-02_desc-brain_T1w.nii.gz")
                          .dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(tpl / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")
                         .dataobj) > 0
    volume = normalise_intensity(brain, mask)
    model = BrainAgeEnsemble([BrainAgeNet(dropout=0.2) for _ in range(members)]).eval()
    out = {"members": members}
    for flip in (False, True):
        start = time.perf_counter()
        predict_brain_age(model, volume, mc_samples=mc_samples, flip_tta=flip)
        out[f"predict_s{'_flip' if flip else ''}"] = time.perf_counter() - start
    image = nib.load(tpl / "tpl-MNI152NLin6Asym_res-02_desc-brain_T1w.nii.gz")
    start = time.perf_counter()  # the template as the native brain, identity registration
    brains, masks = resample_views(brain, mask, image.affine, np.eye(4), image.affine,
                                   brain.shape, jitter_offsets(JITTER_VIEWS, 1.0, 0))
    views = [normalise_intensity(b, m) for b, m in zip(brains, masks, strict=True)]
    out["jitter_resample_s"] = time.perf_counter() - start
    start = time.perf_counter()
    predict_brain_age(model, volume, mc_samples=mc_samples, flip_tta=True, views=views)
    out["predict_s_flip_jitter"] = time.perf_counter() - start
    start = time.perf_counter()
    for member in model.members:
        gradcam_maps(member, volume)
        attention_maps(member, volume)
    out["saliency_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.threads, args.mc_samples)))
        return 0
    extra = ["--threads", str(args.threads), "--mc-samples", str(args.mc_samples)]
    runs = run_rounds(__file__, [str(k) for k in args.members], args.repeats, extra,
                      lambda r, v, res: print(f"  run {r + 1}, K={v}: {res}", file=sys.stderr))
    if isinstance(runs, int):
        return runs
    print("| K members | predict (s) | predict + flip TTA (s) | predict + flip + 8 jitter "
          "views (s) | resampling the views (s) | saliency (s) | peak RSS (MB) |"
          "\n|---|---|---|---|---|---|---|")
    keys = ("predict_s", "predict_s_flip", "predict_s_flip_jitter", "jitter_resample_s",
            "saliency_s", "peak_rss_mb")
    for k, rows in runs.items():
        med = {key: statistics.median(r[key] for r in rows) for key in keys}
        print(f"| {k} | " + " | ".join(f"{med[key]:.2f}" for key in keys[:-1])
              + f" | {med['peak_rss_mb']:.0f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"threads": args.threads, "mc_samples": args.mc_samples, "runs": runs},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
