"""Causal checks of a fitted PerFit model: user swap, subspace ablation, dose response, control.

All four run on the held-out queries of the test users (plain prompts) and report tidy rows
``(experiment, setting, metric, value)``. ``metric`` is the task's LaMP headline metric
(accuracy, MAE or ROUGE-1) or ``mean_pred`` (rating tasks: the mean expected rating under the
label distribution, a behaviour summary more sensitive than the discrete prediction).

(a) **swap**: user A's personal intervention applied to user B's queries (stage ``perfit``
    with A's id on B's prompts). A's *behaviour* is the distribution of A's history outputs
    (gold outputs of A's training queries): for ratings their mean ``mu_A``, for labels their
    histogram ``q_A`` (add-one smoothed). B's predicted behaviour under intervention X is the
    mean expected rating ``p_XB`` (ratings) or the mean label distribution ``P_XB`` (labels).
    The distance to the donor's behaviour is ``|p - mu_A|`` or the total variation
    ``TV(P, q_A) = 0.5 sum |P - q_A|``. A pair moves *toward the donor* when
    ``dist(swap) < dist(own)``. Reported: the share of pairs moving toward the donor, the mean
    reduction of the distance, and (ratings) the correlation of the shift ``p_AB - p_BB`` with
    the gap ``mu_A - mu_B``. Since a small model compresses its ratings toward the middle,
    the share is also reported against the donor's *predicted* behaviour (``p_AA``, ``P_AA``:
    the model with A's intervention on A's own queries), ``toward_donor_pred_share``. Each
    share, the distance reduction and the correlation get a user-blocked p-value (``_p``) and
    a 95% interval of a bootstrap over recipients (``_ci_low``, ``_ci_high``), and the counts
    ``n_toward_donor``, ``n_toward_donor_pred`` (``perfit_probe.evaluation.steer_stats``).
    Swaps need a label set (classification or rating tasks).
(b) **ablation**: the *personal subspace* is spanned by the top principal directions (no
    centring) of the users' mean personal edits ``mean_q e_p,u(h_q)`` at each intervention site
    (``e_p = phi_p(h) - h`` on the un-intervened hidden states ``h`` at the intervention
    positions; one row per user and site). ``k`` is the smallest number of directions holding
    ``ablate_energy`` of their squared norm (at most ``ablate_max_k``). The subspace is
    projected out at the intervention sites and positions (``ablate_mode``: ``hidden`` removes
    it from the edited hidden state, ``edit`` from the edit only). The control is
    ``n_random_subspaces`` seeded random ``k``-dimensional subspaces (seeds ``seed + i``; the
    first is the row ``perfit_ablate_random``). ``metric_lost`` is the metric's change toward
    worse (``m_ablated - m_perfit`` for MAE, ``m_perfit - m_ablated`` for accuracy),
    ``gain_removed = metric_lost / |gain|`` with ``gain`` PerFit's improvement over stage 1.
    Reported: the real subspace's ``metric_lost``, ``gain_removed``, its ``random_percentile``
    and one-sided empirical ``random_p`` among the random ones, the random ones' mean and
    2.5/97.5 percentiles (setting ``random_subspaces``), and one row per random subspace
    (``SteerResult.random_subspaces``, ``ablation_random.csv``).
(c) **dose**: the personal edit scaled by ``alpha`` (``h + e_c + alpha e_p`` for ``sum``
    stacking), alpha in 0, 0.25, ..., 3 by default; at each alpha the metric and mean
    prediction with 95% intervals of a bootstrap over test users (``_ci_low``, ``_ci_high``),
    the best alpha with its bootstrap interval (setting ``best``), and the Spearman
    correlation of the metric with alpha over ``[0, 1]`` and the whole range.
(d) **control**: a *random bank* with, per user and site, a random orthonormal ``R``
    (``A``), and ``W - R`` and ``b`` random with the Frobenius norms of that user's
    ``W_u - R_u`` and ``b_u`` (same rank and edit size, no learned content); and the personal
    bank with user ids *shuffled* (a derangement: everyone gets another user's
    intervention). Compared with stage 1 and PerFit.

Every check scores the same held-out prompts under some intervention. With single-token labels
(ratings) under constrained decoding the un-edited prompt prefix is computed once for the whole
stage (``perfit_probe.evaluation.shared_prefix.PrefixStore``) and each intervention (the
references, each swap donor, each random subspace, each dose, the controls) runs on the edited
suffix only, many variants to a forward pass: with the demo's last-2-position interventions
(a SmolLM2-shaped model, prompts of ~90-135 tokens, measured on 1 thread) 8 variants of 8
prompts cost about 0.3 of an ordinary pass over those prompts. Scores then equal ordinary
passes up to floating-point summation order (tested); other tasks run ordinary passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence, get_args

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from perfit_probe.backends.hooks import HookBackend
from perfit_probe.config import Experiment, PersonalData, SteerConfig
from perfit_probe.data.controls import donor_assignment
from perfit_probe.data.records import TaskData
from perfit_probe.data.profile_examples import training_queries
from perfit_probe.data.splits import Split, history_user
from perfit_probe.errors import ConfigError
from perfit_probe.data.prompts import continuation
from perfit_probe.evaluation.evaluate import (Predictions, heldout_examples, label_predictions, predict,
                                              resolve_decoding)
from perfit_probe.evaluation.metrics import HIGHER_IS_BETTER, primary_metric, score_task
from perfit_probe.evaluation.shared_prefix import PrefixStore, score_label_variants, single_token_labels
from perfit_probe.evaluation.steer_stats import dose_intervals, random_percentile, summary, swap_tests, verdicts
from perfit_probe.evaluation.uncertainty import Scorer, query_statistics
from perfit_probe.interventions import PerFit
from perfit_probe.interventions.batching import collate, encode
from perfit_probe.interventions.modules import InterventionBank, orthonormal_rows
from perfit_probe.models import LoadedModel
from perfit_probe.sites import batch_last_mask, batch_positions

log = logging.getLogger(__name__)

EXPERIMENTS = get_args(Experiment)
STEER_COLUMNS = ["experiment", "setting", "metric", "value"]


@dataclass
class SteerResult:
    """Tidy rows of every check, plus the per-pair swap table."""

    rows: pd.DataFrame
    """Columns ``experiment, setting, metric, value``."""
    pairs: pd.DataFrame
    """One row per (donor, recipient): behaviour and distances (empty without a swap)."""
    basis: torch.Tensor | None = None
    """The ablated personal subspace ``[k, d]`` (orthonormal rows), when ablation ran."""
    random_subspaces: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per random control subspace: ``subspace, seed, <metric>, mean_pred, metric_lost,
    gain_removed`` (empty without ablation)."""
    verdicts: list[str] = field(default_factory=list)
    """One-line verdicts of the checks (``steer_stats.verdicts``)."""


class _Runner:
    """Held-out prompts of the test users and a metric function over interventions."""

    def __init__(self, loaded: LoadedModel, task: TaskData, split: Split, perfit: PerFit, config: SteerConfig,
                 personal: PersonalData):
        if perfit.personal is None:
            raise ConfigError("steering needs personal (stage 2) interventions: run `perfit-probe fit` with stage 2")
        missing = [u for u in split.test_users if u not in perfit.personal.keys]
        if missing:
            raise ConfigError(f"test users {missing[:3]} have no personal intervention in this fit")
        self.loaded, self.task, self.split, self.perfit, self.config = loaded, task, split, perfit, config
        self.personal = personal
        self.spec = task.spec
        self.mode = resolve_decoding(config.decoding, task.spec.kind)
        self.metric = primary_metric(task.spec.kind)
        examples = heldout_examples(task, split, loaded.tokenizer, variants=("plain",), k=0,
                                    retriever="bm25", chat=config.chat, seed=config.seed)
        self.prompts = [e.prompt for e in examples]
        self.owners = [e.user_id for e in examples]
        self.golds = [e.target for e in examples]
        self.users = list(split.test_users)
        self.labels = [continuation(label, loaded.tokenizer, config.chat) for label in task.spec.labels or ()]
        # Every check scores the same prompts: with single-token labels under constrained
        # decoding the un-edited prefixes are computed once and every intervention runs on the
        # edited suffix only (``shared_prefix``).
        self.shared = (self.mode == "constrained"
                       and single_token_labels(loaded.tokenizer, self.labels) is not None)
        self.prefixes = PrefixStore()

    def predict(self, prompts=None, user_ids=None, *, perfit=None, stage="perfit", scale=1.0,
                ablate_basis=None, mode=None) -> Predictions:
        c = self.config
        return predict(self.loaded, self.prompts if prompts is None else prompts, self.spec,
                       decoding=mode or self.mode, chat=c.chat, perfit=perfit or self.perfit,
                       user_ids=self.owners if user_ids is None else user_ids, stage=stage, scale=scale,
                       ablate_basis=ablate_basis, ablate_mode=c.ablate_mode, batch_size=c.batch_size,
                       max_new_tokens=c.max_new_tokens, max_prompt_tokens=c.max_prompt_tokens)

    def variants(self, scales: Sequence[float], bases: torch.Tensor | None = None, *,
                 user_ids: Sequence[Sequence[str]] | None = None, perfit: PerFit | None = None,
                 stage: str = "perfit") -> list[Predictions]:
        """Predictions under each variant ``v``: the ``stage`` intervention of ``perfit`` (default:
        the run's) with the outermost edit scaled by ``scales[v]``, ablating ``bases[v]`` if given,
        each prompt with the slot of ``user_ids[v]`` (default: its owner).

        Variants share the prompt prefix (``shared_prefix``) under constrained decoding with
        single-token labels; otherwise each runs as an ordinary pass.
        """
        c = self.config
        ids = [self.owners] * len(scales) if user_ids is None else [list(u) for u in user_ids]
        if not self.shared:
            return [self.predict(user_ids=ids[v], perfit=perfit, stage=stage, scale=float(s),
                                 ablate_basis=None if bases is None else bases[v]) for v, s in enumerate(scales)]
        logp = score_label_variants(self.loaded, self.prompts, self.labels, perfit=perfit or self.perfit,
                                    user_ids=ids, scales=[float(s) for s in scales], ablate_bases=bases,
                                    ablate_mode=c.ablate_mode, stage=stage, batch_size=c.batch_size,
                                    rows_per_pass=c.rows_per_pass, max_prompt_tokens=c.max_prompt_tokens,
                                    prefixes=self.prefixes)
        return [label_predictions(self.spec, lp) for lp in logp]

    def reference(self, stage: str = "perfit", *, perfit: PerFit | None = None,
                  user_ids: Sequence[str] | None = None) -> Predictions:
        """Predictions of one intervention (``stage`` of ``perfit``) on the held-out prompts."""
        return self.variants([1.0], user_ids=None if user_ids is None else [user_ids], perfit=perfit,
                             stage=stage)[0]

    def query_stats(self, preds: Predictions):
        """Per-query statistics of the headline metric (and ``mean_pred``) for the user bootstrap."""
        frame = pd.DataFrame({"user_id": self.owners, "query_id": [str(i) for i in range(len(self.owners))],
                              "gold": self.golds, "output": preds.outputs})
        stats = query_statistics(frame, Scorer(self.spec.kind, tuple(self.spec.labels) if self.spec.labels else None))
        if preds.expected is not None:
            stats.stats["mean_pred"] = np.stack([np.asarray(preds.expected, dtype=np.float64),
                                                 np.ones(len(frame))], 1)
        return stats

    def rows(self, experiment: str, setting: str, preds: Predictions) -> list[dict]:
        scores = score_task(self.spec.kind, self.golds, preds.outputs, self.spec.labels)
        out = [{"experiment": experiment, "setting": setting, "metric": self.metric, "value": scores[self.metric]}]
        if preds.expected is not None:
            out.append({"experiment": experiment, "setting": setting, "metric": "mean_pred",
                        "value": float(np.mean(preds.expected))})
        return out


def _value(rows: list[dict], setting: str, metric: str) -> float:
    return next(r["value"] for r in rows if r["setting"] == setting and r["metric"] == metric)


# ---------------------------------------------------------------------- (a) swap
def history_behaviour(task: TaskData, split: Split, user_id: str,
                      personal: PersonalData = PersonalData()) -> np.ndarray:
    """A user's behaviour from the gold outputs of its personal training examples (what stage 2 saw).

    Ratings: ``[mean rating]``; labels: the add-one-smoothed label histogram.
    """
    spec = task.spec
    outputs = [q.output for _, q in training_queries(history_user(task.user(user_id), split), spec, personal)
               if q.output is not None]
    if spec.kind == "rating":
        if not outputs:
            raise ConfigError(f"user {user_id!r} has no rated history")
        return np.array([float(np.mean([float(o) for o in outputs]))])
    counts = np.ones(len(spec.labels))
    for o in outputs:
        if o.strip() in spec.labels:
            counts[spec.labels.index(o.strip())] += 1
    return counts / counts.sum()


def _distance(kind: str, predicted: np.ndarray, behaviour: np.ndarray) -> float:
    if kind == "rating":
        return float(abs(predicted[0] - behaviour[0]))
    return float(0.5 * np.abs(predicted - behaviour).sum())


def _behaviour_of(kind: str, preds: Predictions, rows: list[int]) -> np.ndarray:
    if kind == "rating":
        return np.array([float(np.mean(preds.expected[rows]))])
    return preds.label_logprobs[rows].softmax(1).mean(0).numpy()


def _swapped(runner: _Runner, pairs: list[tuple[str, str]], rows_of: dict[str, list[int]]) -> dict:
    """Each pair's predictions on the recipient's queries with the donor's intervention:
    ``{(donor, recipient): (predictions, rows)}``. With a shared prefix every donor runs as a
    variant over all prompts; otherwise the pairs' prompts run in one ordinary pass."""
    if runner.shared:
        donors = [u for u in runner.users if any(a == u for a, _ in pairs)]
        preds = runner.variants([1.0] * len(donors), user_ids=[[a] * len(runner.prompts) for a in donors])
        by_donor = dict(zip(donors, preds))
        return {(a, b): (by_donor[a], rows_of[b]) for a, b in pairs}
    prompts, donors, spans = [], [], []
    for a, b in pairs:
        idx = rows_of[b]
        spans.append(list(range(len(prompts), len(prompts) + len(idx))))
        prompts += [runner.prompts[i] for i in idx]
        donors += [a] * len(idx)
    swapped = runner.predict(prompts, donors, mode="constrained")
    return {pair: (swapped, span) for pair, span in zip(pairs, spans)}


def user_swap(runner: _Runner, own: Predictions | None = None) -> tuple[list[dict], pd.DataFrame]:
    """Experiment (a); see the module docstring. ``own``: PerFit's constrained predictions on
    the held-out prompts, when already computed."""
    spec = runner.spec
    if spec.kind == "generation" or not spec.labels:
        log.warning("user swap needs a label set; skipped for %s", spec.name)
        return [], pd.DataFrame()
    users = runner.users
    rng = np.random.default_rng(runner.config.seed)
    pairs = [(a, b) for a in users for b in users if a != b]
    if len(pairs) > runner.config.max_pairs:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), runner.config.max_pairs, replace=False))]
    rows_of = {u: [i for i, o in enumerate(runner.owners) if o == u] for u in users}
    if own is None:
        own = runner.predict(mode="constrained")
    swapped = _swapped(runner, pairs, rows_of)
    behaviour = {u: history_behaviour(runner.task, runner.split, u, runner.personal) for u in users}
    records = []
    for a, b in pairs:
        own_b = _behaviour_of(spec.kind, own, rows_of[b])
        swap_b = _behaviour_of(spec.kind, *swapped[(a, b)])
        donor_pred = _behaviour_of(spec.kind, own, rows_of[a])
        rec = {"donor": a, "recipient": b,
               "own_distance": _distance(spec.kind, own_b, behaviour[a]),
               "swap_distance": _distance(spec.kind, swap_b, behaviour[a]),
               "own_distance_pred": _distance(spec.kind, own_b, donor_pred),
               "swap_distance_pred": _distance(spec.kind, swap_b, donor_pred)}
        if spec.kind == "rating":
            rec.update(donor_mean=behaviour[a][0], recipient_mean=behaviour[b][0],
                       own_pred=own_b[0], swap_pred=swap_b[0])
        records.append(rec)
    pairs_frame = pd.DataFrame.from_records(records)
    toward = (pairs_frame.swap_distance < pairs_frame.own_distance).mean()
    out = [{"experiment": "swap", "setting": "pairs", "metric": "n_pairs", "value": float(len(pairs))},
           {"experiment": "swap", "setting": "pairs", "metric": "toward_donor_share", "value": float(toward)},
           {"experiment": "swap", "setting": "pairs", "metric": "distance_reduction",
            "value": float((pairs_frame.own_distance - pairs_frame.swap_distance).mean())},
           {"experiment": "swap", "setting": "pairs", "metric": "toward_donor_pred_share",
            "value": float((pairs_frame.swap_distance_pred < pairs_frame.own_distance_pred).mean())},
           {"experiment": "swap", "setting": "own", "metric": "distance_to_donor",
            "value": float(pairs_frame.own_distance.mean())},
           {"experiment": "swap", "setting": "swapped", "metric": "distance_to_donor",
            "value": float(pairs_frame.swap_distance.mean())}]
    if spec.kind == "rating" and len(pairs_frame) > 2:
        gap = pairs_frame.donor_mean - pairs_frame.recipient_mean
        shift = pairs_frame.swap_pred - pairs_frame.own_pred
        corr = float(np.corrcoef(gap, shift)[0, 1]) if gap.std() > 0 and shift.std() > 0 else float("nan")
        out.append({"experiment": "swap", "setting": "pairs", "metric": "shift_gap_correlation", "value": corr})
    c = runner.config
    out += swap_tests(pairs_frame, np.random.default_rng([c.seed, 1]), n_boot=c.n_boot, n_perm=c.n_perm,
                      level=c.level)
    return out, pairs_frame


# ---------------------------------------------------------------------- (b) ablation
@torch.no_grad()
def personal_edit_means(loaded: LoadedModel, perfit: PerFit, prompts: Sequence[str], user_ids: Sequence[str],
                        *, batch_size: int = 16, max_prompt_tokens: int | None = None) -> torch.Tensor:
    """``[n_users, n_sites, d]``: each user's mean personal edit on their own prompts.

    The edit ``e_p,u(h)`` is evaluated on the un-intervened hidden states at the intervention
    sites and positions (users ordered as ``perfit.personal.keys`` restricted to ``user_ids``).
    """
    bank = perfit.personal
    spec = bank.spec.positions
    sites = list(bank.spec.sites)
    users = [u for u in bank.keys if u in set(user_ids)]
    sums = torch.zeros(len(users), len(sites), bank.spec.d_model)
    counts = torch.zeros(len(users))
    backend = HookBackend(loaded)
    tok = loaded.tokenizer
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        batch = collate([encode(tok, prompts[i], max_prompt_tokens=max_prompt_tokens) for i in chunk],
                        int(tok.pad_token_id), padding_side="left", device=loaded.device)
        hidden = backend.run(batch.input_ids, batch.attention_mask, sites)
        index, valid = batch_positions(spec, batch.prompt_mask, bank.spec.position_clamp)
        last = batch_last_mask(spec, batch.prompt_mask, bank.spec.position_clamp)
        slots = bank.slot_indices([user_ids[i] for i in chunk])
        rows = torch.tensor([users.index(user_ids[i]) for i in chunk])
        for s, site in enumerate(sites):
            h = hidden[site].gather(1, index.unsqueeze(-1).expand(-1, -1, hidden[site].shape[-1])).float()
            edit = bank.edit(s, h, slots, last) * valid.unsqueeze(-1)
            per_row = edit.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
            sums[:, s].index_add_(0, rows, per_row.cpu())
        counts.index_add_(0, rows, torch.ones(len(chunk)))
    return sums / counts.clamp(min=1).view(-1, 1, 1)


def personal_subspace(edits: torch.Tensor, energy: float = 0.9, max_k: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """Top right singular vectors of the stacked edits ``[rows, d]`` holding ``energy`` of the squared norm.

    Returns the basis ``[k, d]`` (orthonormal rows) and the cumulative energy curve.
    """
    flat = edits.reshape(-1, edits.shape[-1]).double()
    _, svals, vh = torch.linalg.svd(flat, full_matrices=False)
    total = float((svals ** 2).sum())
    if total == 0:
        raise ConfigError("the personal edits are all zero: nothing to ablate (was stage 2 trained?)")
    cum = ((svals ** 2).cumsum(0) / total).numpy()
    k = min(int(np.searchsorted(cum, energy - 1e-12) + 1), max_k, len(svals))
    return vh[:k].float(), cum


def random_subspace(k: int, d: int, seed: int) -> torch.Tensor:
    """A uniformly random ``k``-dimensional subspace of R^d (orthonormal rows)."""
    gen = torch.Generator().manual_seed(seed)
    return orthonormal_rows(torch.randn(k, d, generator=gen))


def subspace_ablation(runner: _Runner, stage1_rows: list[dict],
                      perfit_rows: list[dict]) -> tuple[list[dict], torch.Tensor, pd.DataFrame]:
    """Experiment (b); see the module docstring. Returns rows, the basis and the random subspaces' table."""
    c = runner.config
    edits = personal_edit_means(runner.loaded, runner.perfit, runner.prompts, runner.owners,
                                batch_size=c.batch_size, max_prompt_tokens=c.max_prompt_tokens)
    basis, cum = personal_subspace(edits, c.ablate_energy, c.ablate_max_k)
    k, d = basis.shape
    seeds = [c.seed + i for i in range(c.n_random_subspaces)]
    bases = torch.stack([basis] + [random_subspace(k, d, s) for s in seeds])
    preds = runner.variants([1.0] * len(bases), bases)
    rows = [dict(r, experiment="ablation") for r in stage1_rows + perfit_rows]
    rows += runner.rows("ablation", "perfit_ablate_personal", preds[0])
    rows += runner.rows("ablation", "perfit_ablate_random", preds[1])
    m = runner.metric
    sign = -1.0 if HIGHER_IS_BETTER[m] else 1.0  # metric_lost > 0: worse than PerFit
    m_perfit = _value(rows, "perfit", m)
    gain = sign * (_value(rows, "stage1", m) - m_perfit)

    def effects(p: Predictions) -> dict:
        scored = runner.rows("ablation", "", p)
        value = scored[0]["value"]
        lost = sign * (value - m_perfit)
        out = {m: value, "metric_lost": lost, "gain_removed": lost / gain if gain != 0 else float("nan")}
        if len(scored) > 1:
            out["mean_pred"] = scored[1]["value"]
        return out

    real = effects(preds[0])
    table = pd.DataFrame([{"subspace": i, "seed": s, **effects(p)} for i, (s, p) in enumerate(zip(seeds, preds[1:]))])
    rows.append({"experiment": "ablation", "setting": "perfit_ablate_personal", "metric": "metric_lost",
                 "value": float(real["metric_lost"])})
    for setting, value in (("perfit_ablate_personal", real["gain_removed"]),
                           ("perfit_ablate_random", float(table.gain_removed.iloc[0]))):
        rows.append({"experiment": "ablation", "setting": setting, "metric": "gain_removed", "value": float(value)})
    where = random_percentile(real["metric_lost"], table.metric_lost)
    rows += [{"experiment": "ablation", "setting": "perfit_ablate_personal", "metric": "random_percentile",
              "value": where["percentile"]},
             {"experiment": "ablation", "setting": "perfit_ablate_personal", "metric": "random_p",
              "value": where["p_value"]}]
    if "mean_pred" in real:
        m_shift = abs(real["mean_pred"] - _value(rows, "perfit", "mean_pred"))
        r_shift = (table.mean_pred - _value(rows, "perfit", "mean_pred")).abs()
        rows.append({"experiment": "ablation", "setting": "perfit_ablate_personal",
                     "metric": "mean_pred_shift_percentile", "value": random_percentile(m_shift, r_shift)["percentile"]})
    rows.append({"experiment": "ablation", "setting": "random_subspaces", "metric": "n", "value": float(len(table))})
    for column in [m, "mean_pred", "metric_lost", "gain_removed"]:
        if column in table.columns:
            rows += [{"experiment": "ablation", "setting": "random_subspaces", "metric": f"{column}_{stat}",
                      "value": value} for stat, value in summary(table[column], c.level).items()]
    rows.append({"experiment": "ablation", "setting": "subspace", "metric": "k", "value": float(k)})
    rows.append({"experiment": "ablation", "setting": "subspace", "metric": "energy",
                 "value": float(cum[k - 1])})
    return rows, basis, table


# ---------------------------------------------------------------------- (c) dose, (d) control
def dose_response(runner: _Runner) -> list[dict]:
    """Experiment (c); see the module docstring."""
    # scipy.stats takes seconds to import: deferred until a statistic needs it
    from scipy.stats import spearmanr

    c = runner.config
    alphas = sorted({float(a) for a in c.alphas})
    rows, stats = [], {}
    for alpha, preds in zip(alphas, runner.variants(alphas)):
        rows += runner.rows("dose", f"{alpha:g}", preds)
        stats[alpha] = runner.query_stats(preds)
    base_metrics = sorted({r["metric"] for r in rows})
    rows += dose_intervals(stats, runner.metric, HIGHER_IS_BETTER[runner.metric], np.random.default_rng([c.seed, 2]),
                           n_boot=c.n_boot, level=c.level)
    for metric in base_metrics:
        values = [(float(r["setting"]), r["value"]) for r in rows
                  if r["metric"] == metric and r["setting"] != "best" and not r["setting"].startswith("spearman")]
        for name, chosen in (("spearman_0_1", [v for v in values if v[0] <= 1]), ("spearman_all", values)):
            xs, vals = zip(*chosen) if chosen else ((), ())
            rho = spearmanr(xs, vals).statistic if len(set(vals)) > 1 and len(xs) > 2 else float("nan")
            rows.append({"experiment": "dose", "setting": name, "metric": metric, "value": float(rho)})
    return rows


def random_bank(bank: InterventionBank, seed: int) -> InterventionBank:
    """A bank of random interventions with each slot's rank and edit size (see the module docstring)."""
    out = InterventionBank(bank.spec, list(bank.keys))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s, (mine, theirs) in enumerate(zip(out.site_params, bank.site_params)):
            rot = bank.rotation(s).detach().cpu()
            for i in range(bank.n_slots):
                a_rand = torch.randn(rot.shape[1:], generator=gen)
                if bank.spec.kind == "noreft":
                    a_rand = a_rand * rot[i].norm() / a_rand.norm()
                else:
                    a_rand = orthonormal_rows(a_rand)
                mine.A[i] = a_rand
                if bank.spec.kind != "lobireft":
                    diff = theirs.W[i].detach().cpu() - rot[i]
                    noise = torch.randn(diff.shape, generator=gen)
                    mine.W[i] = a_rand + noise * diff.norm() / noise.norm()
                b = theirs.b[i].detach().cpu()
                noise = torch.randn(b.shape, generator=gen)
                mine.b[i] = noise * b.norm() / noise.norm()
    out.requires_grad_(False)
    return out.to(bank.device)


def control(runner: _Runner, stage1_rows: list[dict], perfit_rows: list[dict]) -> list[dict]:
    """Experiment (d); see the module docstring."""
    perfit = runner.perfit
    rows = [dict(r, experiment="control") for r in stage1_rows + perfit_rows]
    fake = PerFit(perfit.collective, random_bank(perfit.personal, runner.config.seed), perfit.stacking, perfit.model)
    rows += runner.rows("control", "random_bank", runner.reference(perfit=fake))
    mapping = donor_assignment(runner.users, runner.config.seed)
    rows += runner.rows("control", "shuffled_users", runner.reference(user_ids=[mapping[u] for u in runner.owners]))
    return rows


# ---------------------------------------------------------------------- entry point
def steer_checks(loaded: LoadedModel, task: TaskData, split: Split, perfit: PerFit,
                 config: SteerConfig = SteerConfig(), personal: PersonalData = PersonalData(), *,
                 progress: bool = False) -> SteerResult:
    """Run the configured checks; see the module docstring for what each number means.

    ``personal``: what the fit's stage 2 trained on (a user's behaviour in the swap check);
    ``progress``: a progress bar over the reference predictions and the checks."""
    bar = tqdm(total=1 + len(config.experiments), desc="steer", unit="check", disable=not progress)
    runner = _Runner(loaded, task, split, perfit, config, personal)
    rows: list[dict] = []
    pairs = pd.DataFrame()
    basis = None
    stage1 = runner.rows("reference", "stage1", runner.reference("collective"))
    full_preds = runner.reference()
    full = runner.rows("reference", "perfit", full_preds)
    base = runner.rows("reference", "base", runner.reference("none"))
    rows += base + stage1 + full
    bar.update()
    if "swap" in config.experiments:
        swap_rows, pairs = user_swap(runner, full_preds if runner.mode == "constrained" else None)
        rows += swap_rows
        bar.update()
    random_table = pd.DataFrame()
    if "ablation" in config.experiments:
        ablation_rows, basis, random_table = subspace_ablation(runner, stage1, full)
        rows += ablation_rows
        bar.update()
    if "dose" in config.experiments:
        rows += dose_response(runner)
        bar.update()
    if "control" in config.experiments:
        rows += control(runner, stage1, full)
        bar.update()
    bar.close()
    frame = pd.DataFrame.from_records(rows, columns=STEER_COLUMNS)
    log.info("steer: %d rows (%s higher is better: %s)", len(frame), runner.metric,
             HIGHER_IS_BETTER[runner.metric])
    return SteerResult(frame, pairs, basis, random_table, verdicts(frame))
