"""Oracle: our LoReFT edit equals the reference implementation (pyreft 0.1.0 on pyvene 0.1.8).

pyreft is installed by ``make setup`` outside site-packages (it pins transformers 4.45 but
its LoReFT path runs on ours). Given the same R, W and b at the same layers and positions,
both must produce the same logits, and the same gradients for W and b.
"""

from __future__ import annotations

import pytest
import torch

from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.modules import BankSpec, InterventionBank

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (1, 2)
RANK = 3


def _reference(pyreft, loaded):
    d = loaded.model.config.get_text_config().hidden_size
    interventions = [pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=RANK, dtype=torch.float32)
                     for _ in LAYERS]
    config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": RANK, "intervention": module}
        for layer, module in zip(LAYERS, interventions)])
    reft = pyreft.get_reft_model(loaded.model, config)
    assert all(any(m is module for m in reft.interventions.values()) for module in interventions)
    return reft, interventions


def _ours_from(references, d: int) -> InterventionBank:
    spec = BankSpec("loreft", tuple(f"blocks.{layer}.hook_resid_post" for layer in LAYERS), "f1+l2", RANK, d)
    bank = InterventionBank(spec, ["collective"])
    with torch.no_grad():
        for holder, ref in zip(bank.site_params, references):
            holder.A[0] = ref.rotate_layer.weight.detach().T
            holder.W[0] = ref.learned_source.weight.detach()
            holder.b[0] = ref.learned_source.bias.detach()
    return bank


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loreft_matches_pyreft_logits_and_gradients(pyreft, arch):
    from perfit_probe_tests.tiny import tiny_model

    loaded = tiny_model(arch, seed=3)
    d = loaded.model.config.get_text_config().hidden_size
    reft, references = _reference(pyreft, loaded)
    for ref in references:  # make the edit far from zero: b and W random, not small
        with torch.no_grad():
            ref.learned_source.weight.normal_(0, 0.5)
            ref.learned_source.bias.normal_(0, 0.5)
    bank = _ours_from(references, d)
    r = bank.rotation(0)[0]
    assert torch.allclose(r @ r.T, torch.eye(RANK), atol=1e-5)
    assert torch.allclose(r, references[0].rotate_layer.weight.detach().T, atol=1e-6)  # our QR keeps R as is

    # left-padded batch: rows of 9, 7 and 5 prompt tokens
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 7, 5]
    width = max(lengths)
    ids = torch.full((3, width), int(loaded.tokenizer.pad_token_id))
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(5, 100, (n,), generator=gen)
        mask[i, width - n:] = 1
    positions = [[width - n, width - 2, width - 1] for n in lengths]  # f1+l2 in padded coordinates
    labels = ids.masked_fill(mask == 0, -100)

    _, out_ref = reft({"input_ids": ids, "attention_mask": mask},
                      unit_locations={"sources->base": (None, [positions] * len(LAYERS))}, labels=labels)
    out_ref.loss.backward()

    bank.requires_grad_(True)
    iv = Intervention(collective=bank)
    with iv.attached(loaded.model):
        iv.set_batch(mask)
        out = loaded.model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    with torch.no_grad():
        plain = loaded.model(input_ids=ids, attention_mask=mask).logits

    valid = mask.bool()
    assert (out.logits - plain)[valid].abs().max() > 1e-2  # the edit does change the outputs
    assert torch.allclose(out.logits[valid], out_ref.logits[valid], atol=1e-5)
    assert torch.allclose(out.loss, out_ref.loss, atol=1e-6)
    for holder, ref in zip(bank.site_params, references):
        assert torch.allclose(holder.W.grad[0], ref.learned_source.weight.grad, atol=1e-6)
        assert torch.allclose(holder.b.grad[0], ref.learned_source.bias.grad, atol=1e-6)
        assert ref.learned_source.weight.grad.abs().max() > 1e-4
