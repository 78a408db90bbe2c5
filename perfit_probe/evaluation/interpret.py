"""From shift to steering and back: using the measured delta vectors, and reading the learned ones.

Everything runs on the held-out queries of the test users (``RUN/perfit/split.json``), with
prompts built as the evaluation built them (``PromptSettings``), at the *sites* that the fit
intervened on and the cache measured (others are named in ``notes`` and skipped). At site
``l``, with ``D [n_users, d]`` the users' delta vectors (``perfit_probe.deltas``),
``mu = mean_u D_u`` the collective shift and ``P_k`` the projector on the top-``k`` centred
principal directions of ``D`` (``analysis.subspaces.centred_pcs``):

1. **Steering** (``steering_kl``): the plain prompt's hidden state at the last prompt position
   gets ``alpha * v`` added at site ``l`` during the prompt pass, with ``v`` one of

   - ``full``: ``D_u`` (the user's whole delta), ``personal``: ``D_u - mu``, ``pca``: ``P_k D_u``;
   - controls: ``other_user``: ``D_w`` with ``w`` the user's image under a seeded derangement,
     ``random``: a random direction with the norm of ``D_u``.

   Per query, ``KL(p_enh || p_steer) = sum_y p_enh(y) log(p_enh(y) / p_steer(y))`` between the
   label distributions (softmax over ``log p(label | prompt)``) of the history-enhanced prompt
   and of the steered plain prompt (``alpha = 0``: the unsteered plain prompt). Per user the
   mean over its queries; per site, method and alpha the mean over users with a percentile
   bootstrap interval over users. Rows of ``alpha = 0`` are the plain-prompt baseline.
2. **Alignment** (``alignment``): principal angles between the top-``k`` centred delta PCs and
   the row space of the learned ``R`` of the stage-1 intervention and of each user's stage-2
   intervention at the site (each position group of the bank separately; for anchored banks
   the trained ``R``, not the anchor), against ``n_null`` uniformly random subspaces of
   ``R``'s dimension (``percentile``: share of random draws with a smaller ``mean cos^2``).
   ``edit_energy``: the share of each user's personal edit energy
   ``sum_q ||P_k e_u(h_q)||^2 / sum_q ||e_u(h_q)||^2`` over the user's held-out plain prompts
   at the bank's positions (``e_u`` evaluated on the un-intervened state, as ``steer`` does),
   against ``k / d`` by chance.
3. **Read-outs** (``lens_tokens``, ``lens_labels``): the logit lens (``analysis.lens``) of the
   collective shift ``mu``, of the top personal PCs (scaled by their standard deviation over
   users) and of each user's personal part ``D_u - mu``, at the mean plain state of the site:
   promoted and demoted tokens, each label's log-probability shift and (ratings) the shift
   of the expected rating under the lens' label distribution, correlated across users with
   the user's mean history rating. **Monitoring** (``monitoring``): the plain hidden state
   of each held-out query projected on its user's personal direction,
   ``<h_q - h_bar, (D_u - mu) / ||D_u - mu||>``, correlated (Pearson and Spearman, with
   p-values) with the gold ratings: per query, and per user (means).

The ``interpret`` stage (``perfit_probe.stages.interpret``) runs them on a run directory and
writes ``RUN/interpret/`` (CSV files and ``report.md``) and the figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import get_args

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import pearsonr, spearmanr
from torch import Tensor

from perfit_probe.analysis.lens import label_first_tokens, label_shift, lens_shift, top_tokens
from perfit_probe.analysis.subspaces import angle_test, centred_pcs, random_null
from perfit_probe.backends.hooks import HookBackend
from perfit_probe.config import InterpretConfig, PersonalData, SteerMethod
from perfit_probe.data.prompts import continuation
from perfit_probe.data.records import Example, TaskData
from perfit_probe.data.splits import Split
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.evaluate import heldout_examples
from perfit_probe.data.controls import donor_assignment
from perfit_probe.evaluation.steer import history_behaviour
from perfit_probe.interventions import PerFit, score_labels
from perfit_probe.interventions.batching import encode
from perfit_probe.interventions.steering import (AdditiveSteering, label_ids_of, steer_last_token,
                                                 steered_label_logprobs)
from perfit_probe.models import LoadedModel
from perfit_probe.sites import LAST, batch_last_mask, parse_site

log = logging.getLogger(__name__)

STEER_METHODS = get_args(SteerMethod)
"""Vectors added to the plain prompt (see the module docstring)."""


@dataclass(frozen=True)
class PromptSettings:
    """How a run builds and scores prompts (what ``evaluate`` used)."""

    k: int = 4
    """History items retrieved into the enhanced prompt."""
    retriever: str = "bm25"
    """Retriever of the enhanced prompt."""
    chat: bool | None = None
    """Chat template (None: when the tokenizer has one)."""
    max_prompt_tokens: int | None = None
    """Longer prompts keep their last tokens."""
    seed: int = 0
    """Seed of prompt construction."""


@dataclass
class InterpretResult:
    """Tidy frames of every read-out (see the module docstring); empty where skipped."""

    kl_users: pd.DataFrame
    """``site, method, alpha, user_id, kl, n_queries``."""
    kl: pd.DataFrame
    """``site, method, alpha, mean, lo, hi, n_users``."""
    angles: pd.DataFrame
    """``site, bank, user_id, group, index, angle_deg, null_lo, null_median, null_hi``."""
    alignment: pd.DataFrame
    """``site, bank, user_id, group, k, rank, d_model, overlap, null_overlap, percentile, min_angle_deg``."""
    energy: pd.DataFrame
    """``site, user_id, share, chance, edit_energy`` (``share`` is NaN where a user's personal edit
    is zero, e.g. when stage-2 model selection kept stage 1 alone)."""
    lens_tokens: pd.DataFrame
    """``site, direction, user_id, sign, rank, token, shift``."""
    lens_labels: pd.DataFrame
    """``site, direction, user_id, label, logprob_shift, p_without, p_with``."""
    monitoring: pd.DataFrame
    """``site, user_id, query_id, projection, gold``."""
    stats: pd.DataFrame
    """``site, readout, level, n, pearson_r, pearson_p, spearman_rho, spearman_p``."""
    notes: list[str] = field(default_factory=list)
    """What was skipped, and why."""
    settings: dict = field(default_factory=dict)
    """Sites, alphas, k and counts actually used."""


def user_bootstrap(values: np.ndarray, n_boot: int, rng: np.random.Generator,
                   level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-user ``values`` and its percentile bootstrap interval over users."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = values[rng.integers(0, values.size, (n_boot, values.size))].mean(1)
    tail = 100 * (1 - level) / 2
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def kl_divergence(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(logp_ref) || softmax(logp))`` along the last axis (label scores in, nats out)."""
    p_ref = logp_ref.log_softmax(-1)
    return (p_ref.exp() * (p_ref - logp.log_softmax(-1))).sum(-1)


def correlation_row(x, y, **keys) -> dict:
    """Pearson and Spearman correlations (with two-sided p-values) of ``x`` and ``y``."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    row = {**keys, "n": int(x.size), "pearson_r": np.nan, "pearson_p": np.nan,
           "spearman_rho": np.nan, "spearman_p": np.nan}
    if x.size > 2 and np.std(x) > 0 and np.std(y) > 0:
        pr, sr = pearsonr(x, y), spearmanr(x, y)
        row.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
                   spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
    return row


def steering_vectors(deltas_at_site: np.ndarray, users: list[str], all_users: list[str], k: int,
                     methods: tuple[str, ...], seed: int) -> dict[str, np.ndarray]:
    """``method -> [len(users), d]`` vectors of ``users`` at one site (see the module docstring).

    ``deltas_at_site [len(all_users), d]``; the derangement maps ``users`` among themselves."""
    rows = {u: i for i, u in enumerate(all_users)}
    d = deltas_at_site[[rows[u] for u in users]].astype(np.float64)
    pcs = centred_pcs(deltas_at_site, k)
    out = {"full": d, "personal": d - pcs.mean, "pca": d @ pcs.components.T @ pcs.components}
    mapping = donor_assignment(users, seed)
    out["other_user"] = deltas_at_site[[rows[mapping[u]] for u in users]].astype(np.float64)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(d.shape)
    out["random"] = noise / np.linalg.norm(noise, axis=1, keepdims=True) * np.linalg.norm(d, axis=1, keepdims=True)
    return {m: out[m] for m in methods}


class _Context:
    """What every read-out shares: the model, held-out prompts, deltas and sites."""

    def __init__(self, loaded, task, split, perfit, deltas, config, settings):
        self.loaded, self.task, self.split, self.perfit, self.deltas = loaded, task, split, perfit, deltas
        self.config, self.settings, self.spec = config, settings, task.spec
        self.notes: list[str] = []
        fit_sites = [site.name for site in perfit.collective.spec.sites]
        wanted = list(config.sites) if config.sites is not None else fit_sites
        missing = [s for s in wanted if s not in deltas.sites]
        if missing:
            self.notes.append(f"sites {missing} are not among the cached sites {deltas.sites}: skipped")
        self.sites = [s for s in wanted if s in deltas.sites]
        self.site_objects = [parse_site(s) for s in self.sites]  # the cached names, parsed once
        if not self.sites:
            self.notes.append("no site of the fit was cached: nothing to interpret (cache the fit's layers)")
        no_delta = [u for u in split.test_users if u not in deltas.user_ids]
        if no_delta:
            self.notes.append(f"test users {no_delta[:5]} have no delta vectors: left out")
        self.users = [u for u in split.test_users if u in deltas.user_ids]
        examples = heldout_examples(task, split, loaded.tokenizer, variants=("plain", "enhanced"), k=settings.k,
                                    retriever=settings.retriever, chat=settings.chat, seed=settings.seed)
        keep = set(self.users)
        plain = [e for e in examples if e.variant == "plain" and e.user_id in keep]
        enhanced = {(e.user_id, e.query_id): e for e in examples if e.variant == "enhanced"}
        if config.max_queries_per_user is not None:
            counts: dict[str, int] = {}
            plain = [e for e in plain if counts.setdefault(e.user_id, 0) < config.max_queries_per_user
                     and not counts.__setitem__(e.user_id, counts[e.user_id] + 1)]
        self.plain = plain
        self.enhanced = [enhanced[(e.user_id, e.query_id)] for e in plain]
        self.labels = list(self.spec.labels) if self.spec.labels else []
        self.label_texts = [continuation(lab, loaded.tokenizer, settings.chat) for lab in self.labels]
        self.site_deltas = {s: deltas.enhanced[:, deltas.site_index(s)].double().numpy() for s in self.sites}
        self.pcs = {s: centred_pcs(self.site_deltas[s], config.subspace_dim) for s in self.sites}
        self.hidden: dict[tuple[str, str, str], torch.Tensor] = {}  # (site, user, query) -> [T, d] plain states

    def delta_row(self, user: str) -> int:
        return self.deltas.user_ids.index(user)


# ---------------------------------------------------------------------- 1. steering
def steering_kl(ctx: _Context) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Experiment 1 (module docstring); also caches the plain prompts' hidden states in ``ctx``."""
    c, loaded = ctx.config, ctx.loaded
    if not ctx.sites or not ctx.plain:
        return pd.DataFrame(), pd.DataFrame()
    if not ctx.labels or len(ctx.users) < 2:
        ctx.notes.append(f"steering KL needs a label set; {ctx.spec.name} ({ctx.spec.kind}) has none: skipped"
                         if not ctx.labels else "steering controls need at least 2 test users with deltas: skipped")
        _capture_hidden(ctx)
        return pd.DataFrame(), pd.DataFrame()
    steering, slot = _steering_table(ctx)
    alphas = [a for a in c.alphas if a != 0]
    label_ids = label_ids_of(loaded.tokenizer, ctx.label_texts)
    single = all(len(i) == 1 for i in label_ids)
    enh = score_labels(loaded, [e.prompt for e in ctx.enhanced], ctx.label_texts, stage="none",
                       max_prompt_tokens=ctx.settings.max_prompt_tokens)
    variants = [(s, m, a) for s in ctx.sites for m in c.methods for a in alphas]
    records = []
    for qi, ex in enumerate(ctx.plain):
        slots = [slot[(ex.user_id, s, m)] for s, m, _ in variants]
        plain, steered = _steered_logprobs(ctx, ex, steering, slots, [a for _, _, a in variants],
                                           label_ids if single else None)
        base_kl = float(kl_divergence(enh[qi], plain))
        for s in ctx.sites:
            for m in c.methods:
                records.append({"site": s, "method": m, "alpha": 0.0, "user_id": ex.user_id, "kl": base_kl})
        for j, (s, m, a) in enumerate(variants):
            records.append({"site": s, "method": m, "alpha": float(a), "user_id": ex.user_id,
                            "kl": float(kl_divergence(enh[qi], steered[j]))})
    if not single:
        _capture_hidden(ctx)
    return _kl_summary(pd.DataFrame.from_records(records), c)


def _steering_table(ctx: _Context) -> tuple[AdditiveSteering, dict[tuple[str, str, str], int]]:
    """The steering vectors of experiment 1 as one ``AdditiveSteering`` with one slot per (user,
    site, method), only that site's entry non-zero; and the slot of each (user, site, method)."""
    c, users, n_sites, methods = ctx.config, ctx.users, len(ctx.sites), list(ctx.config.methods)
    per_site = {s: steering_vectors(ctx.site_deltas[s], users, ctx.deltas.user_ids, c.subspace_dim, c.methods,
                                    c.seed + i) for i, s in enumerate(ctx.sites)}
    table = torch.zeros(len(users) * n_sites * len(methods), n_sites, ctx.deltas.d_model)
    slot = {}
    for ui, u in enumerate(users):
        for si, s in enumerate(ctx.sites):
            for mi, m in enumerate(methods):
                index = (ui * n_sites + si) * len(methods) + mi
                table[index, si] = torch.from_numpy(per_site[s][m][ui]).float()
                slot[(u, s, m)] = index
    return AdditiveSteering(table, ctx.site_objects, LAST), slot


def _steered_logprobs(ctx: _Context, ex: Example, steering: AdditiveSteering, slots: list[int], scales: list[float],
                      label_ids: list[list[int]] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label log-probabilities of the plain prompt ``ex`` ``[n_labels]`` and with each steering
    slot at its scale ``[len(slots), n_labels]``. With single-token labels (``label_ids``) one
    cached forward (``steer_last_token``) gives all of them and the prompt's hidden states,
    kept in ``ctx.hidden``; otherwise one scoring pass per variant."""
    cap = ctx.settings.max_prompt_tokens
    if label_ids is not None and slots:
        plain, steered, found = steer_last_token(ctx.loaded, ex.prompt, label_ids, steering, slots, scales,
                                                 capture=ctx.sites, max_prompt_tokens=cap)
        for s in ctx.sites:
            ctx.hidden[(s, ex.user_id, ex.query_id)] = found[s]
        return plain, steered
    plain = steered_label_logprobs(ctx.loaded, [ex.prompt], ctx.label_texts, max_prompt_tokens=cap)[0]
    steered = steered_label_logprobs(ctx.loaded, [ex.prompt] * len(slots), ctx.label_texts, steering=steering,
                                     slots=slots, scales=scales, max_prompt_tokens=cap) if slots else None
    return plain, steered


def _kl_summary(per_query: pd.DataFrame, c: InterpretConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-user mean KL (``n_queries``) and, per site, method and alpha, its mean over users
    with a bootstrap interval over users."""
    per_user = (per_query.groupby(["site", "method", "alpha", "user_id"], sort=False)
                .agg(kl=("kl", "mean"), n_queries=("kl", "size")).reset_index())
    rng = np.random.default_rng(c.seed)
    rows = []
    for (s, m, a), part in per_user.groupby(["site", "method", "alpha"], sort=False):
        mean, lo, hi = user_bootstrap(part.kl.to_numpy(), c.n_boot, rng, c.level)
        rows.append({"site": s, "method": m, "alpha": a, "mean": mean, "lo": lo, "hi": hi, "n_users": len(part)})
    return per_user, pd.DataFrame.from_records(rows)


def _capture_hidden(ctx: _Context) -> None:
    """Plain prompts' hidden states at the sites (when the cached steering path did not record them)."""
    backend = HookBackend(ctx.loaded)
    sites = ctx.site_objects
    for ex in ctx.plain:
        ids = torch.tensor([encode(ctx.loaded.tokenizer, ex.prompt,
                                   max_prompt_tokens=ctx.settings.max_prompt_tokens).ids], device=ctx.loaded.device)
        found = backend.run(ids, torch.ones_like(ids), sites)
        for name, site in zip(ctx.sites, sites):
            ctx.hidden[(name, ex.user_id, ex.query_id)] = found[site][0].float().cpu()


# ---------------------------------------------------------------------- 2. alignment
def alignment(ctx: _Context) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Experiment 2: principal angles against the null, and the personal edits' energy share."""
    c = ctx.config
    rng = np.random.default_rng(c.seed + 1000)
    angle_rows, summary, energy = [], [], []
    banks = [("stage1", ctx.perfit.collective)]
    if ctx.perfit.personal is not None:
        banks.append(("stage2", ctx.perfit.personal))
    fit_names = [site.name for site in ctx.perfit.collective.spec.sites]
    for s in ctx.sites:
        if s not in fit_names:
            ctx.notes.append(f"site {s} has no intervention: no alignment there")
            continue
        bank_site = fit_names.index(s)
        ref = ctx.pcs[s].components
        nulls: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for name, bank in banks:
            keys = ["collective"] if name == "stage1" else [u for u in ctx.split.test_users if u in bank.keys]
            for g, group in enumerate(bank.spec.groups):
                rot = bank.rotation(bank.spec.unit(bank_site, g)).detach().double().cpu().numpy()
                for key in keys:
                    r = rot[0 if name == "stage1" else bank.slot(key)]
                    dim = r.shape[0]
                    if dim not in nulls:
                        nulls[dim] = random_null(ref, dim, n_draws=c.n_null, rng=rng)
                    test = angle_test(ref, r, null=nulls[dim])
                    uid = "" if name == "stage1" else key
                    lo, med, hi = np.percentile(test.null_angles, [2.5, 50, 97.5], axis=0)
                    for i, angle in enumerate(test.angles):
                        angle_rows.append({"site": s, "bank": name, "user_id": uid, "group": group, "index": i + 1,
                                           "angle_deg": float(angle), "null_lo": float(lo[i]),
                                           "null_median": float(med[i]), "null_hi": float(hi[i])})
                    summary.append({"site": s, "bank": name, "user_id": uid, "group": group, "k": ref.shape[0],
                                    "rank": dim, "d_model": ref.shape[1], "overlap": test.overlap,
                                    "null_overlap": float(test.null_overlap.mean()),
                                    "percentile": test.percentile, "min_angle_deg": float(test.angles.min())})
        energy += _edit_energy(ctx, s, bank_site, ref)
    return pd.DataFrame.from_records(angle_rows), pd.DataFrame.from_records(summary), pd.DataFrame.from_records(energy)


@torch.no_grad()
def _edit_energy(ctx: _Context, site: str, bank_site: int, basis: np.ndarray) -> list[dict]:
    bank = ctx.perfit.personal
    if bank is None:
        return []
    spec = bank.spec.positions
    clamp = bank.spec.position_clamp
    q = torch.from_numpy(basis).float()
    totals: dict[str, list[float]] = {}
    for ex in ctx.plain:
        if ex.user_id not in bank.keys:
            continue
        hidden = ctx.hidden[(site, ex.user_id, ex.query_id)]
        offsets = spec.offsets(hidden.shape[0], clamp)
        if not offsets:
            continue
        mask = torch.ones(1, hidden.shape[0], dtype=torch.long)
        last = batch_last_mask(spec, mask, clamp)[:, :len(offsets)]
        h = hidden[offsets].unsqueeze(0).to(bank.device)
        edit = bank.edit(bank_site, h, bank.slot_indices([ex.user_id]), last.to(bank.device))[0].float().cpu()
        inside = float(((edit @ q.T) ** 2).sum())
        pair = totals.setdefault(ex.user_id, [0.0, 0.0])
        pair[0] += inside
        pair[1] += float((edit ** 2).sum())
    chance = basis.shape[0] / basis.shape[1]
    return [{"site": site, "user_id": u, "share": (a / b) if b > 0 else float("nan"), "chance": chance,
             "edit_energy": b} for u, (a, b) in totals.items()]


# ---------------------------------------------------------------------- 3. read-outs
def _user_ratings(ctx: _Context, users: list[str], personal: PersonalData) -> dict[str, float]:
    if ctx.spec.kind != "rating":
        return {}
    out = {}
    for u in users:
        try:
            out[u] = float(history_behaviour(ctx.task, ctx.split, u, personal)[0])
        except Exception:  # a user without rated history
            continue
    return out


def readouts(ctx: _Context, personal: PersonalData) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict]]:
    """Experiment 3: logit-lens read-outs and the monitoring projection."""
    label_ids = None
    if ctx.labels:
        try:
            label_ids = label_first_tokens(ctx.loaded.tokenizer, ctx.label_texts)
        except ConfigError as exc:
            ctx.notes.append(f"label read-out skipped: {exc}")
    values = None
    if ctx.spec.kind == "rating" and ctx.labels:
        values = np.array([float(lab) for lab in ctx.labels])
    users = list(ctx.deltas.user_ids)
    ratings = _user_ratings(ctx, users, personal)
    token_rows, label_rows, monitor_rows, stats = [], [], [], []
    for s in ctx.sites:
        base = _lens_base(ctx, s)
        names, personal_parts, directions = _lens_directions(ctx, s, users)
        token_rows += _token_rows(ctx, s, names, lens_shift(ctx.loaded.model, base, directions))
        if label_ids is not None:
            rows, expected = _label_rows(ctx, s, names, base, directions, label_ids, values)
            label_rows += rows
            if values is not None:
                both = [u for u in users if u in expected and u in ratings]
                stats.append(correlation_row([expected[u] for u in both], [ratings[u] for u in both], site=s,
                                             readout="lens_expected_rating_vs_history_rating", level="user"))
        monitor_rows += _monitor_rows(ctx, s, base, personal_parts, values)
    monitoring = pd.DataFrame.from_records(monitor_rows)
    if values is not None and not monitoring.empty:
        for s, part in monitoring.groupby("site", sort=False):
            stats.append(correlation_row(part.projection, part.gold, site=s, readout="projection_vs_gold",
                                         level="query"))
            means = part.groupby("user_id")[["projection", "gold"]].mean()
            stats.append(correlation_row(means.projection, means.gold, site=s, readout="projection_vs_gold",
                                         level="user"))
    elif ctx.spec.kind != "rating":
        ctx.notes.append("monitoring correlations need numeric gold outputs (rating tasks): projections only")
    return pd.DataFrame.from_records(token_rows), pd.DataFrame.from_records(label_rows), monitoring, stats


def _lens_base(ctx: _Context, site: str) -> Float[Tensor, " d_model"]:
    """The hidden state the read-outs add directions to: the mean plain state at ``site`` (over
    users' means when the deltas have them, else over the captured held-out prompts)."""
    if ctx.deltas.mean_plain is not None:
        return ctx.deltas.mean_plain[:, ctx.deltas.site_index(site)].double().mean(0).float()
    return torch.stack([h[-1] for (s, _, _), h in ctx.hidden.items() if s == site]).mean(0)


def _lens_directions(ctx: _Context, site: str,
                     users: list[str]) -> tuple[list[str], np.ndarray, Float[Tensor, "directions d_model"]]:
    """The directions read out at ``site``: the collective shift, the top principal directions
    (scaled by their singular values) and each user's personal part (delta minus the mean);
    their names, the personal parts ``[n_users, d]`` and all directions as one tensor."""
    c, pcs = ctx.config, ctx.pcs[site]
    names = ["collective"] + [f"pc{i + 1}" for i in range(min(c.n_pcs, len(pcs.scales)))] + \
        [f"user:{u}" for u in users]
    personal_parts = ctx.site_deltas[site] - pcs.mean
    vectors = np.concatenate([pcs.mean[None], pcs.components[:c.n_pcs] * pcs.scales[:c.n_pcs, None],
                              personal_parts])
    return names, personal_parts, torch.from_numpy(vectors).float()


def _direction(name: str) -> tuple[str, str]:
    """``(direction, user_id)`` of a read-out name: ``("user", u)`` for ``user:u``, else ``(name, "")``."""
    return ("user", name[5:]) if name.startswith("user:") else (name, "")


def _token_rows(ctx: _Context, site: str, names: list[str], shifts: torch.Tensor) -> list[dict]:
    """The tokens each direction promotes and demotes most (``shifts``: logit shift per direction)."""
    rows = []
    for name, row in zip(names, shifts):
        direction, uid = _direction(name)
        up, down = top_tokens(row, ctx.loaded.tokenizer, ctx.config.n_tokens)
        for sign, items in (("promoted", up), ("demoted", down)):
            for rank, (text, value) in enumerate(items):
                rows.append({"site": site, "direction": direction, "user_id": uid, "sign": sign,
                             "rank": rank + 1, "token": text, "shift": value})
    return rows


def _label_rows(ctx: _Context, site: str, names: list[str], base: torch.Tensor, directions: torch.Tensor,
                label_ids: list[int], values: np.ndarray | None) -> tuple[list[dict], dict[str, float]]:
    """Each direction's shift of the labels' log-probabilities under the lens, and (rating
    tasks, ``values``) each user direction's shift of the expected rating."""
    shift, p0, p1 = label_shift(ctx.loaded.model, base, directions, label_ids)
    rows, expected = [], {}
    for j, name in enumerate(names):
        direction, uid = _direction(name)
        for li, lab in enumerate(ctx.labels):
            rows.append({"site": site, "direction": direction, "user_id": uid, "label": lab,
                         "logprob_shift": float(shift[j, li]), "p_without": float(p0[li]),
                         "p_with": float(p1[j, li])})
        if values is not None and uid:
            expected[uid] = float(p1[j] @ values - p0 @ values)
    return rows, expected


def _monitor_rows(ctx: _Context, site: str, base: torch.Tensor, personal_parts: np.ndarray,
                  values: np.ndarray | None) -> list[dict]:
    """Monitoring: each held-out plain state (minus ``base``) projected on its user's unit
    personal direction, next to the gold rating (NaN outside rating tasks)."""
    unit = personal_parts / np.maximum(np.linalg.norm(personal_parts, axis=1, keepdims=True), 1e-12)
    rows = []
    for ex in ctx.plain:
        key = (site, ex.user_id, ex.query_id)
        if key not in ctx.hidden:
            continue
        h = ctx.hidden[key][-1].double().numpy() - base.double().numpy()
        gold = float(ex.target) if values is not None and ex.target is not None else np.nan
        rows.append({"site": site, "user_id": ex.user_id, "query_id": ex.query_id,
                     "projection": float(h @ unit[ctx.delta_row(ex.user_id)]), "gold": gold})
    return rows


# ---------------------------------------------------------------------- entry points
def interpret(loaded: LoadedModel, task: TaskData, split: Split, perfit: PerFit, deltas: Deltas,
              config: InterpretConfig = InterpretConfig(), settings: PromptSettings = PromptSettings(),
              personal: PersonalData = PersonalData()) -> InterpretResult:
    """Run the three read-outs (module docstring) and return their tidy frames."""
    ctx = _Context(loaded, task, split, perfit, deltas, config, settings)
    kl_users, kl = steering_kl(ctx)
    if ctx.sites and not ctx.hidden:
        _capture_hidden(ctx)
    angles, summary, energy = alignment(ctx) if ctx.sites else (pd.DataFrame(),) * 3
    tokens, labels, monitoring, stats = readouts(ctx, personal) if ctx.sites else (pd.DataFrame(),) * 3 + ([],)
    used = {"sites": ctx.sites, "alphas": list(config.alphas), "methods": list(config.methods), "k": config.subspace_dim,
            "n_null": config.n_null, "n_boot": config.n_boot, "n_users": len(ctx.users),
            "n_queries": len(ctx.plain), "prompts": settings.__dict__,
            "delta_positions": deltas.meta.get("positions")}
    for note in ctx.notes:
        log.warning("interpret: %s", note)
    return InterpretResult(kl_users, kl, angles, summary, energy, tokens, labels, monitoring,
                           pd.DataFrame.from_records(stats), ctx.notes, used)
