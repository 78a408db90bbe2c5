"""The backend interface shared by the activation backends."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from perfit_probe.sites import Site, parse_sites


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword inputs for a padded batch, with position ids that ignore padding.

    ``position_ids = cumsum(mask) - 1`` (0 on padding), so a left-padded row gets exactly the
    positions it would have alone; Hugging Face models do not derive this themselves.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


class ActivationBackend(ABC):
    """Reads activations at canonical sites for a padded batch."""

    name: str = "abstract"

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self.model = loaded.model

    def resolve(self, sites) -> list[Site]:
        """Parse and bound-check sites against the model's layer count."""
        return parse_sites(list(sites) if not isinstance(sites, str) else sites, self.loaded.n_layers)

    @abstractmethod
    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sites
    ) -> dict[Site, torch.Tensor]:
        """Activations ``[batch, seq, d_model]`` at each site for one batch."""
