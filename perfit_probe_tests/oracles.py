"""Direct, brute-force computations that tests of several modules compare the package against."""

from __future__ import annotations

import numpy as np
import torch


def direct_hidden(loaded, prompt: str) -> tuple[torch.Tensor, ...]:
    """Unpadded, unbatched forward: hidden_states[l + 1][0] is block l's output ``[seq, d]``."""
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**enc, output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def pooled_mean(sel, user, variant):
    """Mean pooled value of a user's rows of one variant ``[n_sites, d]`` (float64)."""
    mask = torch.as_tensor(((sel.rows["user_id"] == user) & (sel.rows["variant"] == variant)).to_numpy(copy=True))
    return sel.pooled()[mask].double().mean(0)


def oracle_rank(x, tau, center):
    """Brute force: count components until the energy share reaches tau."""
    x = x - x.mean(0) if center else x
    s2 = np.linalg.svd(x, compute_uv=False) ** 2
    total, acc = s2.sum(), 0.0
    for k, v in enumerate(s2, start=1):
        acc += v
        if acc / total >= tau - 1e-12:
            return k
    raise AssertionError("unreachable")
