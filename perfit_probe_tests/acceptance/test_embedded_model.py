"""Acceptance: the real embedded model (SmolLM2-135M-Instruct) through each part of the package:
loading, chat-template prompts, the backends, the activation cache and PerFit generation."""

from __future__ import annotations

import time

import pytest
import torch

from perfit_probe.cache import cache_activations
from perfit_probe.data import load_task
from perfit_probe.data.prompts import added_texts, build_examples, count_tokens
from perfit_probe.data.records import Example
from perfit_probe.data.tasks import TASKS
from perfit_probe.interventions.artifact import PerFit
from perfit_probe.interventions.generate import generate
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.models import load_model
from perfit_probe.sites import Site, parse_positions
from perfit_probe_tests.oracles import direct_hidden
from perfit_probe_tests.prompts import BACKEND_PROMPTS

SPEC = TASKS["movielens-rating"]


@pytest.fixture(scope="module")
def movielens():
    return load_task("movielens", n_users=3, seed=0, max_queries=6)


@pytest.mark.slow
def test_embedded_model_loads_from_converted_cache_and_answers(embedded):
    assert embedded.identity.architecture == "LlamaForCausalLM"
    assert (embedded.identity.n_layers, embedded.identity.d_model) == (30, 576)
    tok = embedded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    out = embedded.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    start = time.perf_counter()
    again = load_model("smollm2")  # second load: from the safetensors cache
    assert time.perf_counter() - start < 30
    assert again.identity.fingerprint == embedded.identity.fingerprint



@pytest.mark.slow
def test_control_length_with_smollm2_chat_template(embedded, movielens):
    tok = embedded.tokenizer
    assert tok.chat_template
    examples = build_examples(movielens.users, SPEC, tok, k=4)
    by_key = {(e.user_id, e.query_id, e.variant): e for e in examples}
    for user in movielens.users:
        for query in user.queries:
            plain, enhanced, control = (by_key[(user.id, query.id, v)] for v in ("plain", "enhanced", "control"))
            assert plain.prompt.rstrip().endswith("assistant")
            assert count_tokens(tok, enhanced.prompt) == count_tokens(tok, control.prompt)
            assert count_tokens(tok, enhanced.prompt) > count_tokens(tok, plain.prompt)
            added = added_texts(SPEC, user, query, tok, k=4)
            assert count_tokens(tok, added.control) == count_tokens(tok, added.history)



@pytest.mark.slow
def test_embedded_model_backends_agree(embedded):
    from perfit_probe.backends.agreement import backend_agreement

    frame = backend_agreement(embedded, BACKEND_PROMPTS, [Site(l) for l in range(embedded.n_layers)])
    assert set(frame["backend"]) == {"transformer_lens", "nnsight"}
    assert len(frame) == 2 * embedded.n_layers
    assert frame["max_abs_diff"].max() < 1e-5



@pytest.mark.slow
def test_embedded_model_cache_matches_direct_forward(tmp_path, embedded):
    prompts = ["Rate the movie Heat (1995) from 1 to 5.",
               "I loved Star Wars (1977) and Fargo (1996). How would I rate Toy Story (1995)?",
               "Hi"]
    examples = [Example("u", f"q{i}", "plain", p) for i, p in enumerate(prompts)]
    cache = cache_activations(embedded, examples, tmp_path / "c", sites=[4, 12], batch_size=3, progress=False)
    sel = cache.select()
    for i, prompt in enumerate(prompts):
        hidden = direct_hidden(embedded, prompt)
        for j, layer in enumerate((4, 12)):
            torch.testing.assert_close(sel.values[i, j], hidden[layer + 1][-1], atol=1e-4, rtol=1e-4)



@pytest.mark.slow
def test_embedded_model_zero_edit_and_batched_users(embedded):
    """On SmolLM2: a zero edit changes nothing; mixed-user batches generate as one-by-one."""
    spec = BankSpec("loreft", (Site(8), Site(12)), parse_positions("f1+l2"), 4,
                    embedded.d_model)
    prompts = ["Rate the movie Heat (1995) from 1 to 5:", "Tag:"]
    zero = PerFit(InterventionBank.initialised(spec, ["collective"], "zero"),
                  InterventionBank.initialised(spec, ["a", "b"], "zero"), "sum", embedded.identity.to_dict())
    assert generate(embedded, prompts, perfit=zero, user_ids=["a", "b"], max_new_tokens=4) == \
        generate(embedded, prompts, max_new_tokens=4)
    fit = PerFit(InterventionBank.initialised(spec, ["collective"], "random", seed=2),
                 InterventionBank.initialised(spec, ["a", "b"], "random", seed=3), "sum", embedded.identity.to_dict())
    batched = generate(embedded, prompts, perfit=fit, user_ids=["b", "a"], max_new_tokens=4)
    single = [generate(embedded, [p], perfit=fit, user_ids=[u], max_new_tokens=4)[0] for p, u in zip(prompts, ["b", "a"])]
    assert batched == single
