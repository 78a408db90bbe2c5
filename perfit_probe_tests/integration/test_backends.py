"""The three activation backends agree with a manual forward-hook read and with HF."""

from __future__ import annotations

import pytest
import torch

from perfit_probe.backends import BACKEND_NAMES, get_backend
from perfit_probe.backends.base import model_inputs
from perfit_probe.errors import ConfigError, SiteError
from perfit_probe.sites import SITE_KINDS, Site, decoder_layers
from perfit_probe_tests.prompts import BACKEND_PROMPTS


def _batch(loaded, side):
    tok = loaded.tokenizer
    tok.padding_side = side
    return tok(BACKEND_PROMPTS, return_tensors="pt", padding=True)


def _manual(model, batch, n_layers):
    """Oracle: every block's output read with register_forward_hook directly."""
    found = {}
    handles = [
        block.register_forward_hook(
            lambda mod, args, out, i=i: found.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, block in enumerate(decoder_layers(model)[:n_layers])
    ]
    try:
        with torch.no_grad():
            model(**model_inputs(batch["input_ids"], batch["attention_mask"]))
    finally:
        for h in handles:
            h.remove()
    return found


@pytest.mark.parametrize("side", ["left", "right"])
def test_resid_post_all_layers_all_positions_match_manual_hook(tiny, side):
    batch = _batch(tiny, side)
    n = tiny.n_layers
    oracle = _manual(tiny.model, batch, n)
    mask = batch["attention_mask"].bool()
    sites = [Site(l) for l in range(n)]
    for name in BACKEND_NAMES:
        got = get_backend(name, tiny).run(batch["input_ids"], batch["attention_mask"], sites)
        for site in sites:
            diff = (got[site] - oracle[site.layer]).abs()
            assert diff[mask].max() < 1e-5, (name, site, side)


def test_hidden_states_match_hf_output_hidden_states(tiny):
    batch = _batch(tiny, "left")
    with torch.no_grad():
        hf = tiny.model(**model_inputs(batch["input_ids"], batch["attention_mask"]), output_hidden_states=True)
    got = get_backend("hooks", tiny).run(batch["input_ids"], batch["attention_mask"], ["blocks.0.hook_resid_pre", 0, 1])
    assert torch.allclose(got[Site(0, "resid_pre")], hf.hidden_states[0], atol=1e-6)
    assert torch.allclose(got[Site(0)], hf.hidden_states[1], atol=1e-6)
    assert torch.allclose(got[Site(1)], hf.hidden_states[2], atol=1e-6)


def test_every_site_kind_agrees_across_backends(tiny):
    batch = _batch(tiny, "right")
    mask = batch["attention_mask"].bool()
    sites = [Site(l, kind) for l in (0, tiny.n_layers - 1) for kind in SITE_KINDS]
    ref = get_backend("hooks", tiny).run(batch["input_ids"], batch["attention_mask"], sites)
    # resid_pre of block l+1 is resid_post of block l: an internal consistency oracle.
    pair = get_backend("hooks", tiny).run(batch["input_ids"], batch["attention_mask"], [Site(0), Site(1, "resid_pre")])
    assert torch.equal(pair[Site(0)], pair[Site(1, "resid_pre")])
    for name in BACKEND_NAMES[1:]:
        got = get_backend(name, tiny).run(batch["input_ids"], batch["attention_mask"], sites)
        for site in sites:
            assert (got[site] - ref[site]).abs()[mask].max() < 1e-5, (name, site)


def test_left_padded_last_token_equals_unpadded_forward(tiny):
    batch = _batch(tiny, "left")
    backend = get_backend("hooks", tiny)
    site = Site(tiny.n_layers - 1)
    padded = backend.run(batch["input_ids"], batch["attention_mask"], [site])[site]
    for i, prompt in enumerate(BACKEND_PROMPTS):
        single = tiny.tokenizer([prompt], return_tensors="pt")
        alone = backend.run(single["input_ids"], single["attention_mask"], [site])[site]
        assert torch.allclose(padded[i, -1], alone[0, -1], atol=1e-5)


def test_early_stop_equals_full_pass(tiny):
    batch = _batch(tiny, "left")
    from perfit_probe.backends.hooks import HookBackend

    sites = [Site(1), Site(2, "mlp_out")]
    early = HookBackend(tiny, early_stop=True).run(batch["input_ids"], batch["attention_mask"], sites)
    full = HookBackend(tiny, early_stop=False).run(batch["input_ids"], batch["attention_mask"], sites)
    for site in sites:
        assert torch.equal(early[site], full[site])


def test_bad_sites_and_backends_are_refused(tiny):
    batch = _batch(tiny, "left")
    backend = get_backend("hooks", tiny)
    with pytest.raises(SiteError, match="out of range"):
        backend.run(batch["input_ids"], batch["attention_mask"], [tiny.n_layers])
    with pytest.raises(SiteError, match="unknown site"):
        backend.run(batch["input_ids"], batch["attention_mask"], ["blocks.0.hook_banana"])
    with pytest.raises(ConfigError, match="unknown backend"):
        get_backend("tensorflow", tiny)


def test_transformer_lens_backend_leaves_the_hf_model_intact(tiny):
    before = [type(m) for m in tiny.model.modules()]
    get_backend("transformer_lens", tiny)
    assert [type(m) for m in tiny.model.modules()] == before
