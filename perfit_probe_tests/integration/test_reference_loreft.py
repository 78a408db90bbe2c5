"""Oracle: our LoReFT edit equals the reference implementation (pyreft 0.1.0 on pyvene 0.1.8).

pyreft is installed by ``make setup`` outside site-packages (it pins transformers 4.45 but
its LoReFT path runs on ours). Given the same R, W and b at the same layers, both must produce
the same logits, and the same gradients for W and b, on a batch laid out as pyreft's training
batches are (a masked pad token prepended to every row, right padding) with the positions
pyreft's own ``get_intervention_locations`` gives (short prompts clamped, dropped slots on the
pad token), with shared weights and with separate first/last interventions
(``share_weights=False``: pyreft doubles the layers, the first half editing the first-p
positions and the second half the last-s ones).
"""

from __future__ import annotations

import pytest
import torch

from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.sites import Site, parse_positions

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (1, 2)
RANK = 3


POSITIONS = "f1+l2"


def _reference(pyreft, loaded, share_weights: bool):
    d = loaded.model.config.get_text_config().hidden_size
    layers = LAYERS if share_weights else LAYERS + LAYERS  # pyreft's train.py: `layers += layers`
    interventions = [pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=RANK, dtype=torch.float32)
                     for _ in layers]
    config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": RANK, "intervention": module}
        for layer, module in zip(layers, interventions)])
    reft = pyreft.get_reft_model(loaded.model, config)
    assert all(any(m is module for m in reft.interventions.values()) for module in interventions)
    return reft, interventions


def _ours_from(references, d: int, share_weights: bool) -> InterventionBank:
    spec = BankSpec("loreft", tuple(Site(layer) for layer in LAYERS), parse_positions(POSITIONS), RANK, d,
                    "pyreft", share_weights)
    bank = InterventionBank(spec, ["collective"])
    assert len(bank.site_params) == len(references)  # units in pyreft's order: all first, then all last
    with torch.no_grad():
        for holder, ref in zip(bank.site_params, references):
            holder.A[0] = ref.rotate_layer.weight.detach().T
            holder.W[0] = ref.learned_source.weight.detach()
            holder.b[0] = ref.learned_source.bias.detach()
    return bank


@pytest.mark.parametrize("share_weights", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loreft_matches_pyreft_logits_and_gradients(pyreft, arch, share_weights):
    from perfit_probe_tests.tiny import tiny_model

    loaded = tiny_model(arch, seed=3)
    d = loaded.model.config.get_text_config().hidden_size
    reft, references = _reference(pyreft, loaded, share_weights)
    for ref in references:  # make the edit far from zero: b and W random, not small
        with torch.no_grad():
            ref.learned_source.weight.normal_(0, 0.5)
            ref.learned_source.bias.normal_(0, 0.5)
    bank = _ours_from(references, d, share_weights)
    r = bank.rotation(0)[0]
    assert torch.allclose(r @ r.T, torch.eye(RANK), atol=1e-5)
    assert torch.allclose(r, references[0].rotate_layer.weight.detach().T, atol=1e-6)  # our QR keeps R as is

    # pyreft's layout (pad_mode "first"): a pad token, then the prompt, then right padding;
    # prompts of 9, 5, 3, 2 and 1 tokens (f1+l2 clamps to f1+l1 at 2 and 3 tokens, to nothing at 1)
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 5, 3, 2, 1]
    width = 1 + max(lengths)
    pad = int(loaded.tokenizer.pad_token_id)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 1:1 + n] = torch.randint(5, 100, (n,), generator=gen)
        mask[i, 1:1 + n] = 1
    n_interventions = len(references)
    per_row = [pyreft.get_intervention_locations(last_position=n, positions=POSITIONS,
                                                 num_interventions=n_interventions, share_weights=share_weights,
                                                 pad_mode="first") for n in lengths]
    # Without shared weights pyreft gives the one-token prompt (its branch for a side clamped to
    # 0) lists of p + s = 3 pad slots, one longer than the other rows' lists, which it could not
    # batch: the extra slot, a pad, is dropped.
    k = min(len(row[0]) for row in per_row)
    assert all(p == -1 for row in per_row for lst in row for p in lst[k:])
    # [intervention][row][slot], shifted by the prepended pad token as pyreft's dataset does
    locations = [[[p + 1 for p in per_row[i][j][:k]] for i in range(len(lengths))] for j in range(n_interventions)]
    if not share_weights:
        assert locations[0][0] == [1, 0] and locations[-1][0] == [8, 9]  # f1 (padded), l2 of the 9-token row
    # targets: prompt tokens after the first (the pad token pyreft edits predicts the first one)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1] = -100

    _, out_ref = reft({"input_ids": ids, "attention_mask": mask},
                      unit_locations={"sources->base": (None, locations)}, labels=labels)
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
    assert torch.equal(out.logits[-1], plain[-1])  # the one-token prompt is not edited
    assert torch.allclose(out.logits[valid], out_ref.logits[valid], atol=1e-5)
    assert torch.allclose(out.loss, out_ref.loss, atol=1e-6)
    for holder, ref in zip(bank.site_params, references):
        assert torch.allclose(holder.W.grad[0], ref.learned_source.weight.grad, atol=1e-6)
        assert torch.allclose(holder.b.grad[0], ref.learned_source.bias.grad, atol=1e-6)
        assert ref.learned_source.weight.grad.abs().max() > 1e-4
