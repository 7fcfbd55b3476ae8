"""An ensemble of brain-age networks stored as one model: K members, one file, one sha256.

A cross-validated ensemble (``train --folds K``) or a seed ensemble (``--ensemble N``) is a
:class:`BrainAgeEnsemble`: its state dict holds every member under ``members.<i>.``, so the
weights are one safetensors file verified by one sha256, and the card's ``architecture``
(``{"name": "BrainAgeEnsemble", "n_members": K, "member": {...}}``) rebuilds it. The card's
``ensemble.members`` lists each member's fold, seed and best epoch by index.

Calling the ensemble averages the members (what ``torch`` code that treats it as one model
sees); the participant level uses :func:`brainage_bids.model.predict.predict_brain_age`,
which also keeps each member's prediction and combines their spread with MC dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ENSEMBLE_NAME = "BrainAgeEnsemble"


class BrainAgeEnsemble(nn.Module):
    """Members of one architecture whose predictions are averaged."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        kinds = {type(m).__name__ for m in members}
        if len(kinds) != 1:
            raise ValueError(f"ensemble members must share one architecture, got {sorted(kinds)}")
        self.members = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def members_of(model: nn.Module) -> list[nn.Module]:
    """The networks whose predictions make up ``model``'s: its members, or itself."""
    if isinstance(model, BrainAgeEnsemble):
        return list(model.members)
    return [model]
