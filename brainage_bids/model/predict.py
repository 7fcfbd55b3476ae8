"""Inference: the brain age of one normalised volume and its Monte-Carlo-dropout uncertainty.

The caller normalises the volume (:func:`brainage_bids.model.intensity.normalise_intensity`)
so that training and inference share one definition of the input; this module only runs the
network. Nothing here imports nipype or pybids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

#: Recorded in the brain-age record so a reader knows what ``mc_sd`` measures.
UNCERTAINTY_METHOD = "mc-dropout"


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn the CLI's ``--device`` value into a :class:`torch.device`.

    ``"auto"`` prefers a GPU so that one container image serves laptops and clusters alike;
    an explicit ``"cuda"`` without a GPU is an error rather than a silent fall-back, because a
    user who asked for the GPU should learn that it is not visible (driver, ``--nv``, ``--gpus``).
    """
    if isinstance(name, torch.device):
        name = str(name)
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} was requested but no CUDA GPU is visible to PyTorch "
                "(check the driver, docker --gpus all or singularity --nv), "
                "or use --device cpu/auto")
        device = torch.device(key)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {name!r} was requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible")
        return device
    raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu' or 'cuda'")


def as_batch(volume: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A ``(1, 1, D, H, W)`` float32 tensor from a ``(D, H, W)`` or ``(1, D, H, W)`` volume.

    One volume at a time is the contract of the participant level; batching is this module's
    business, so a 5-D input is refused rather than guessed at.
    """
    if isinstance(volume, torch.Tensor):
        tensor = volume.detach()
    else:  # contiguous native float32: nibabel arrays may be big-endian or flipped views
        tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[0] != 1:
        raise ValueError(f"expected a (D, H, W) or (1, D, H, W) volume, got {tuple(tensor.shape)}")
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError("the volume has non-finite values (NaN or inf)")
    return tensor.unsqueeze(0)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's ``training`` flag on exit, whatever happened inside.

    Prediction switches dropout on and off; the caller's model (perhaps mid-training, when
    validation calls this) must come back exactly as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The dropout layers that can make Monte-Carlo samples differ (``p > 0``)."""
    return [m for m in model.modules() if isinstance(m, _DropoutNd) and m.p > 0]


def _ages(run: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """Run the model (or its head) and return one age per batch element, whatever its layout."""
    out = run(batch)
    if out.numel() != batch.shape[0]:
        raise ValueError(f"the model returned {tuple(out.shape)} for a batch of {batch.shape[0]};"
                         " expected one age per volume")
    return out.reshape(-1).to(torch.float64)


def _split_at_dropout(model: nn.Module) -> tuple[Callable, Callable] | None:
    """``(trunk, from_trunk)`` when every dropout layer of the model sits after its trunk.

    Monte-Carlo dropout then needs the expensive trunk once per volume: the samples differ
    only after it. :class:`~brainage_bids.model.net.BrainAgeNet` offers this split (its
    dropout is after the last conv block and in the dense head); other models run whole.
    """
    trunk, from_trunk = getattr(model, "trunk", None), getattr(model, "from_trunk", None)
    if callable(trunk) and callable(from_trunk):
        return trunk, from_trunk
    return None


def predict_age(model: nn.Module, volume: torch.Tensor | np.ndarray, *, mc_samples: int = 20,
                seed: int = 0, device: str | torch.device = "cpu",
                mc_batch_size: int = 4, flip_tta: bool = False,
                views: Sequence[torch.Tensor | np.ndarray] = ()) -> dict:
    """Brain age of one normalised volume, with a Monte-Carlo-dropout uncertainty.

    Parameters
    ----------
    model:
        Any network mapping ``(N, 1, D, H, W)`` to ``(N, 1)`` ages (:class:`BrainAgeNet`,
        :class:`SFCN`). It is moved to ``device`` and to the channels-last-3d memory format
        in place (``nn.Module.to`` semantics); its train/eval flags are restored before
        returning. A model with ``trunk`` and ``from_trunk`` methods (BrainAgeNet) runs its
        trunk once and only the part after it per sample: dropout comes only after the trunk,
        so the samples are the same as those of whole passes, at a fraction of the cost.
    volume:
        ``(D, H, W)`` or ``(1, D, H, W)``, already intensity-normalised.
    mc_samples:
        Number of stochastic forward passes with dropout on (Gal & Ghahramani 2016). Only
        dropout is switched to training mode; batch norm keeps its running statistics, so the
        spread reflects the model's uncertainty, not batch composition.
    seed:
        Seeds a forked RNG, so the same volume, seed and ``mc_batch_size`` give the same
        samples without disturbing the caller's global random state.
    mc_batch_size:
        Samples per forward batch: copies in one batch get independent dropout masks, which
        is much faster than one pass each; for a model without a trunk split, the chunking
        bounds memory (about 45 MB of activations per 91x109x91 copy in the first block).
    flip_tta:
        Test-time augmentation: every pass (the deterministic one and each MC sample) is the
        mean over the volume and its left-right mirror (first axis, x in RAS). The model was
        trained with random left-right flips, so both views are in its training distribution.
    views:
        More normalised volumes of the same brain (grid-jitter test-time augmentation,
        :mod:`brainage_bids.model.jitter`): the deterministic prediction is the mean over
        ``volume`` and every view (each with its mirror under ``flip_tta``), computed
        ``mc_batch_size`` at a time. MC dropout runs on ``volume`` alone.

    Returns
    -------
    dict
        ``predicted_age`` (deterministic, dropout off: the number to report), ``mc_mean``,
        ``mc_sd`` (sample SD, ``ddof=1``; 0.0 for a single sample), ``mc_samples``,
        ``n_views`` (1 + len(views)), ``view_sd`` (SD of the views' predictions; 0.0 for one
        view) and ``uncertainty_method`` (``"mc-dropout"``, or ``"none"`` if the model has no
        active dropout, in which case ``mc_sd`` is 0 and means nothing).
    """
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
    if mc_batch_size < 1:
        raise ValueError(f"mc_batch_size must be at least 1, got {mc_batch_size}")
    device = resolve_device(device)
    # channels-last-3d is oneDNN's fast layout for these few-channel 3D convolutions
    batch = as_batch(volume)
    mirrors = 2 if flip_tta else 1
    if flip_tta:
        batch = torch.cat([batch, batch.flip(2)])
    batch = batch.to(device).contiguous(memory_format=torch.channels_last_3d)
    model.to(device=device, memory_format=torch.channels_last_3d)
    dropouts = dropout_modules(model)
    if not dropouts:
        warnings.warn("the model has no active dropout layer: Monte-Carlo samples are all "
                      "equal and carry no uncertainty", RuntimeWarning, stacklevel=2)
    split = _split_at_dropout(model)

    with preserved_modes(model), torch.inference_mode():
        model.eval()
        if split is not None:
            trunk, head = split
            features = trunk(batch)  # deterministic: computed once for all samples
            stochastic, repeated = head, features
        else:
            stochastic, repeated = model, batch
        view_ages = [float(_ages(stochastic, repeated).mean())]
        for start in range(0, len(views), mc_batch_size):
            chunk = torch.cat([as_batch(v) for v in views[start:start + mc_batch_size]])
            size = chunk.shape[0]
            if flip_tta:
                chunk = torch.cat([chunk, chunk.flip(2)])
            chunk = chunk.to(device).contiguous(memory_format=torch.channels_last_3d)
            ages = _ages(model, chunk).reshape(mirrors, size).mean(0)
            view_ages += [float(a) for a in ages.cpu()]
        predicted = float(np.mean(view_ages))
        for module in dropouts:
            module.train()
        fork_devices = ([torch.cuda.current_device() if device.index is None else device.index]
                        if device.type == "cuda" else [])
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            samples = []
            for start in range(0, mc_samples, mc_batch_size):
                size = min(mc_batch_size, mc_samples - start)
                if mirrors == 1:
                    copies = repeated.expand(size, *repeated.shape[1:])
                else:  # sample-major: each sample's two mirrors are adjacent
                    copies = repeated.repeat(size, *([1] * (repeated.ndim - 1)))
                samples.append(_ages(stochastic, copies).reshape(size, mirrors).mean(1).cpu())
    draws = torch.cat(samples).numpy()
    return {
        "predicted_age": predicted,
        "mc_mean": float(draws.mean()),
        "mc_sd": float(draws.std(ddof=1)) if draws.size > 1 else 0.0,
        "mc_samples": int(mc_samples),
        "uncertainty_method": UNCERTAINTY_METHOD if dropouts else "none",
        "flip_tta": bool(flip_tta),
        "n_views": len(view_ages),
        "view_sd": float(np.std(view_ages, ddof=1)) if len(view_ages) > 1 else 0.0,
    }


def predict_brain_age(model: nn.Module, volume: torch.Tensor | np.ndarray, *,
                      mc_samples: int = 20, seed: int = 0, device: str | torch.device = "cpu",
                      flip_tta: bool = False,
                      views: Sequence[torch.Tensor | np.ndarray] = ()) -> dict:
    """Brain age of one normalised volume from a single model or an ensemble.

    Each member runs :func:`predict_age` (MC dropout, optional flip TTA; member ``i`` with
    seed ``seed + i``). The ensemble's age is the mean of the members' deterministic
    predictions. Two spreads are kept apart because they mean different things:
    ``mc_sd`` pools the members' MC-dropout SDs (root mean square), ``member_sd`` is the SD
    of the members' predictions (0 for one model), and ``raw_sd`` combines them as
    independent variances, ``sqrt(mc_sd**2 + member_sd**2)``: the spread before any
    calibration to years (see :mod:`brainage_bids.model.uncertainty`). ``views`` (grid-jitter
    views of the same brain) go to every member; ``view_sd`` pools the members' spreads over
    them (root mean square).
    """
    from brainage_bids.model.ensemble import members_of

    members = members_of(model)
    results = [predict_age(member, volume, mc_samples=mc_samples, seed=seed + index,
                           device=device, flip_tta=flip_tta, views=views)
               for index, member in enumerate(members)]
    preds = np.array([r["predicted_age"] for r in results], dtype=np.float64)
    mc_sd = float(np.sqrt(np.mean([r["mc_sd"] ** 2 for r in results])))
    member_sd = float(preds.std(ddof=1)) if len(preds) > 1 else 0.0
    methods = {r["uncertainty_method"] for r in results}
    method = "mc-dropout" if methods == {"mc-dropout"} else "none"
    if len(members) > 1:
        method = "ensemble" if method == "none" else "ensemble+mc-dropout"
    return {
        "predicted_age": float(preds.mean()),
        "member_predictions": [float(p) for p in preds],
        "mc_mean": float(np.mean([r["mc_mean"] for r in results])),
        "mc_sd": mc_sd,
        "member_sd": member_sd,
        "raw_sd": float(np.hypot(mc_sd, member_sd)),
        "mc_samples": int(mc_samples),
        "n_members": len(members),
        "uncertainty_method": method,
        "flip_tta": bool(flip_tta),
        "n_views": int(results[0]["n_views"]),
        "view_sd": float(np.sqrt(np.mean([r["view_sd"] ** 2 for r in results]))),
    }
