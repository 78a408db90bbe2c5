"""PerFit's fit of one task on one model: the options (``FitConfig``) and both stages' training.

``fit_collective`` trains stage 1, ``fit_personal`` stage 2 on top of it; the ``fit`` stage
(``perfit_probe.stages.fit``) runs them for a run directory and writes ``RUN/perfit/``.

Data (OPPU's protocol): stage 1 trains on every query of the *train users*; stage 2 on each
*test user*'s history, its profile items turned into task examples
(``perfit_probe.data.profile_examples``: the ``max_profile_examples`` most recent items, with
retrieval over earlier items only); the test users' queries (all of them by default,
``n_heldout``) are left for evaluation. ``personal_data = "queries"`` trains stage 2 on the
test users' non-held-out queries instead. With ``val_per_user`` > 0, that many of a test
user's training examples are set aside and each user keeps its stage-2 epoch with the lowest
loss on them (loss-curve rows with ``split == "val"``). Prompts are ``build_examples(...,
variants=(prompt_variant,))``; a target is the gold output as it follows the prompt
(``prompts.continuation``, the same text the evaluation scores) and the end-of-text token.
"""

from __future__ import annotations

import logging
from typing import TypeVar, get_args

import pandas as pd
import torch
from torch import nn

from perfit_probe.config import FitConfig, PersonalInit
from perfit_probe.data.profile_examples import personal_examples
from perfit_probe.data.prompts import build_examples, continuation
from perfit_probe.data.records import Example, TaskData
from perfit_probe.data.splits import Split
from perfit_probe.errors import DataError
from perfit_probe.interventions.batching import Encoded, encode
from perfit_probe.interventions.modules import BankSpec, InterventionBank, slot_generator
from perfit_probe.interventions.train import train_collective, train_personal
from perfit_probe.models import LoadedModel
from perfit_probe.sites import Site, decoder_layers, parse_positions, resolve_site

log = logging.getLogger(__name__)

PERSONAL_INITS = get_args(PersonalInit)


def bank_specs(config: FitConfig, loaded: LoadedModel) -> tuple[BankSpec, BankSpec]:
    """The collective and personal ``BankSpec`` of a fit on ``loaded``: checks the layers
    against the model and the ranks against ``d_model`` (``SiteError``/``ConfigError``)."""
    sites = tuple(resolve_site(Site(layer, config.site_kind), loaded.n_layers) for layer in config.layers)
    positions = parse_positions(config.positions)
    return tuple(BankSpec(config.intervention, sites, positions, rank, loaded.d_model,
                          config.position_clamp, config.share_weights)
                 for rank in (config.collective_rank, config.personal_rank))


def lora_parameter_count(model: nn.Module, rank: int = 8) -> int:
    """Trainable parameters of LoRA of ``rank`` on q_proj and v_proj (GPT-2: the fused ``c_attn``).

    For each adapted matrix of shape ``d_out x d_in``: ``rank * (d_in + d_out)``.
    """
    total = 0
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            last = name.rsplit(".", 1)[-1]
            if last in ("q_proj", "v_proj") and isinstance(module, nn.Linear):
                total += rank * (module.in_features + module.out_features)
            elif last == "c_attn" and hasattr(module, "weight"):  # GPT-2 Conv1D, weight [d_in, 3 d]
                d_in, d_out = module.weight.shape
                total += rank * (d_in + d_out)
    return total


def parameter_counts(spec1: BankSpec, spec2: BankSpec, model: nn.Module) -> dict:
    """Collective, per-user and LoRA (rank 8, q/v) parameter counts, and their ratios."""
    lora = lora_parameter_count(model, 8)
    collective, per_user = spec1.params_per_slot(), spec2.params_per_slot()
    return {"collective": collective, "per_user": per_user, "lora_r8_qv_per_user": lora,
            "per_user_over_lora": per_user / lora if lora else float("nan"),
            "collective_over_lora": collective / lora if lora else float("nan")}


def encode_examples(loaded: LoadedModel, examples: list[Example], config: FitConfig) -> dict[str, list[Encoded]]:
    """Examples as training rows by user: the prompt, then ``continuation(target)`` and end-of-text."""
    out: dict[str, list[Encoded]] = {}
    for ex in examples:
        if ex.target is None or ex.target == "":
            raise DataError(f"query {ex.query_id} of user {ex.user_id} has no gold output to train on")
        out.setdefault(ex.user_id, []).append(
            encode(loaded.tokenizer, ex.prompt, continuation(ex.target, loaded.tokenizer, config.chat), eos=True,
                   max_prompt_tokens=config.max_prompt_tokens))
    return out


def stage1_examples(loaded: LoadedModel, task: TaskData, split: Split, config: FitConfig) -> list[Example]:
    """Stage 1's data: every query of the train users, in the fit's prompt variant."""
    users = [task.user(u) for u in split.train_users]
    return build_examples(users, task.spec, loaded.tokenizer, variants=(config.prompt_variant,), k=config.k,
                          retriever=config.retriever, chat=config.chat, seed=config.seed)


def validation_indices(user: str, n_examples: int, n_val: int, seed: int) -> list[int]:
    """Positions (ascending) of the ``n_val`` of a user's ``n_examples`` personal training
    examples that are held out for model selection: the first ``min(n_val, n_examples - 1)``
    of a permutation seeded by ``(seed, user)``, so every user keeps a training example.

    The one definition of the choice: PerFit's stage 2 (``validation_split``) and the per-user
    LoRA baselines (``perfit_probe.evaluation.evaluate``) hold out the same examples.
    """
    k = min(n_val, n_examples - 1)
    if k <= 0:
        return []
    order = torch.randperm(n_examples, generator=slot_generator(seed, f"{user}/validation")).tolist()
    return sorted(order[:k])


_Row = TypeVar("_Row")


def validation_split(examples: dict[str, list[_Row]], n_val: int,
                     seed: int) -> tuple[dict[str, list[_Row]], dict[str, list[_Row]]]:
    """Hold ``n_val`` examples of each user out (``validation_indices``); returns (train, validation).

    The same rows are held out whatever a row is (encoded examples for PerFit, prompt
    examples for the LoRA baselines), so every personal method selects on the same rows."""
    train, val = {}, {}
    for user, rows in examples.items():
        held = set(validation_indices(user, len(rows), n_val, seed))
        train[user] = [r for i, r in enumerate(rows) if i not in held]
        val[user] = [r for i, r in enumerate(rows) if i in held]
    return train, val


def personal_start(collective: InterventionBank, spec: BankSpec, keys: list[str], init: str,
                   seed: int) -> InterventionBank:
    """Stage 2's personal bank before training: its edit is exactly zero, so stage 2 starts at stage 1.

    ``zero``: random orthonormal R, W = R, b = 0 (a zero edit up to the rounding of R's QR);
    ``random``: pyreft's random start; ``stage1``: a copy of the collective intervention. All are
    *anchored* (the edit is measured from the start, ``perfit_probe.interventions.modules``), which
    makes the start exactly stage 1 whatever the initialisation and the stacking.
    """
    if init == "stage1":
        return InterventionBank.copied_from(collective, keys).anchored()
    return InterventionBank.initialised(spec, keys, init, seed=seed).anchored()


def fit_collective(loaded: LoadedModel, task: TaskData, split: Split, spec: BankSpec, config: FitConfig, *,
                   progress: bool = False) -> tuple[InterventionBank, pd.DataFrame]:
    """Stage 1: the collective bank trained on every query of the train users; and its loss curve."""
    examples = [e for exs in encode_examples(loaded, stage1_examples(loaded, task, split, config),
                                             config).values() for e in exs]
    collective = InterventionBank.initialised(spec, ["collective"], config.collective_init,
                                              seed=config.seed).to(loaded.device)
    log.info("stage 1: %d train users, %d examples, %d parameters", len(split.train_users), len(examples),
             spec.params_per_slot())
    curve = train_collective(loaded, collective, examples, config.train_config(1), progress=progress)
    return collective, curve


def fit_personal(loaded: LoadedModel, task: TaskData, split: Split, users: list[str],
                 collective: InterventionBank, spec: BankSpec, config: FitConfig, *,
                 progress: bool = False) -> tuple[InterventionBank | None, pd.DataFrame]:
    """Stage 2 for ``users`` (test users), on top of ``collective``: the personal bank (None when
    no user has a personal training example) and its loss curve (``split == "val"`` rows with
    ``config.val_per_user``)."""
    raw = personal_examples(loaded.tokenizer, task, split, users, config.personal(),
                            variant=config.prompt_variant, k=config.k, retriever=config.retriever,
                            chat=config.chat, seed=config.seed)
    examples = encode_examples(loaded, [e for exs in raw.values() for e in exs], config)
    validation = None
    if config.val_per_user:
        examples, validation = validation_split(examples, config.val_per_user, config.seed)
    keys = [u for u in users if examples.get(u)]
    if len(keys) < len(users):
        log.warning("stage 2 skipped: %d test users have no personal training examples (task %s, %s)",
                    len(users) - len(keys), task.spec.name, config.personal())
    if not keys:
        return None, pd.DataFrame()
    personal = personal_start(collective, spec, keys, config.personal_init, seed=config.seed + 1)
    personal.to(loaded.device)
    log.info("stage 2: %d users, %d parameters each", len(keys), spec.params_per_slot())
    curve = train_personal(loaded, collective, personal, examples, config.train_config(2),
                           stacking=config.stacking, validation=validation, progress=progress)
    return personal, curve
