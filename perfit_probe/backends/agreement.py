"""Agreement of the activation backends with the forward-hook reference."""

from __future__ import annotations

import pandas as pd
import torch

from perfit_probe.backends import BACKEND_NAMES, get_backend


def backend_agreement(loaded, prompts: list[str], sites, padding_side: str = "left") -> pd.DataFrame:
    """Max absolute difference per backend and site versus the ``hooks`` backend.

    All prompts run as one padded batch; only real (non-padding) positions are compared.
    Returns a tidy frame ``backend, site, max_abs_diff, last_token_max_abs_diff``.
    """
    tok = loaded.tokenizer
    old_side = tok.padding_side
    tok.padding_side = padding_side
    try:
        batch = tok(prompts, return_tensors="pt", padding=True).to(loaded.device)
    finally:
        tok.padding_side = old_side
    mask = batch["attention_mask"].bool()
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    rows = []
    with torch.inference_mode():
        reference = get_backend("hooks", loaded).run(batch["input_ids"], batch["attention_mask"], sites)
        for name in BACKEND_NAMES[1:]:
            values = get_backend(name, loaded).run(batch["input_ids"], batch["attention_mask"], sites)
            for site, ref in reference.items():
                diff = (values[site].float() - ref.float()).abs()
                rows.append({
                    "backend": name,
                    "site": site.name,
                    "max_abs_diff": float(diff[mask].max()),
                    "last_token_max_abs_diff": float(diff[torch.arange(len(prompts)), last].max()),
                })
    return pd.DataFrame(rows)
