"""The shift analysis of a ``Deltas`` artifact as tidy tables (``analyze_deltas``).

For every site it computes, for the real deltas and each source of ``perfit_probe.analysis.nulls``
(nulls and cached controls): ranks ``r(tau)`` and per-mille ranks, centred and uncentred, with
intervals; the cumulative energy curves; the collective-versus-personal statistics of
``perfit_probe.analysis.collective`` (plus, from the per-query deltas, the F ratio and user
identification). Beyond these (``EXTRA_TABLES``):

- ``null_tests``: the deltas' rank against ``n_null_draws`` draws of each Gaussian null
  (isotropic and anisotropic), with a p-value;
- ``controls``: the real history against each control (``perfit_probe.analysis.controls``);
- ``identification``: user identification from hidden-state shifts (real, and under each
  control variant) next to text baselines on the prompt's added history
  (``perfit_probe.analysis.text_baseline``).

It also keeps the small arrays the figures need (PC1-PC2 projections, user x user cosines), so
that figures are pure functions of the saved tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from jaxtyping import Float
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from perfit_probe._io import atomic_write_text, read_json, to_jsonable, write_json
from perfit_probe.analysis.collective import (
    COLLECTIVE_STATISTICS, cosine_matrix, collective_summary, identify_users,
    per_user_collective, variance_ratio,
)
from perfit_probe.analysis.controls import CONTROL_COLUMNS, compare_to_control
from perfit_probe.analysis.nulls import (
    CONTROL_SOURCES, NULLS, bootstrap_ranks, bootstrap_weights,
    null_rank_draws, percentile_interval, rank_p_value, rank_p_value_randomized,
    source_matrices,
)
from perfit_probe.analysis.shift import ShiftPCA
from perfit_probe.analysis.text_baseline import text_identification
from perfit_probe.config import AnalysisConfig
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError, DataError, SiteError
from perfit_probe.sites import parse_site

log = logging.getLogger(__name__)


TABLES = {
    "ranks": "ranks.csv",
    "collective": "collective.csv",
    "curves": "cumulative_variance.csv",
    "user_stats": "user_stats.csv",
    "projection": "pc_projection.csv",
    "user_cosine": "user_cosine.csv",
}
"""Field of ``AnalysisResult`` -> CSV file name under ``RUN/analysis/``."""

NULL_TEST_COLUMNS = ["site", "layer", "null", "centered", "statistic", "observed", "null_median",
                     "null_low", "null_high", "p_value", "p_value_randomized", "n_draws"]
IDENTIFICATION_COLUMNS = ["site", "layer", "features", "accuracy", "chance", "uniform_chance",
                          "p_value", "n_users", "n_train", "n_test"]
TEXT_SITE = "prompt_text"
"""``site`` of the text-baseline rows of ``identification`` (they do not depend on a site;
their ``layer`` is -1)."""

EXTRA_TABLES = {
    "null_tests": "null_tests.csv",
    "controls": "controls.csv",
    "identification": "identification.csv",
}
"""Tables added by the controls of issue 14; an analysis saved before them loads them empty."""
_EXTRA_COLUMNS = {"null_tests": NULL_TEST_COLUMNS, "controls": CONTROL_COLUMNS,
                  "identification": IDENTIFICATION_COLUMNS}


@dataclass(frozen=True)
class AnalysisResult:
    """Tidy frames of the shift analysis; ``save``/``load`` round-trip them as CSV."""

    ranks: pd.DataFrame
    """site, layer, source, centered, statistic (``rank@tau``, ``per_mille@tau``), value,
    ci_low, ci_high, n_users, d_model, max_rank (``min(n, d)``, ``min(n - 1, d)`` centred),
    interval (``bootstrap``: percentile interval over resampled users; ``null draws``: the
    Gaussian null's median rank and the central range of its draws; ``none``)."""
    collective: pd.DataFrame
    """site, layer, source, statistic, value, ci_low, ci_high, p_value."""
    curves: pd.DataFrame
    """site, layer, source, centered, component, cumulative (energy share of the leading
    ``component`` directions)."""
    user_stats: pd.DataFrame
    """site, layer, source, user_id, cos_to_mean, norm, personal_norm, norm_ratio."""
    projection: pd.DataFrame
    """site, layer, kind (``user``, ``query``, ``collective``), user_id, pc1, pc2, ratio1,
    ratio2: deltas on the uncentred PC1-PC2 of the users' deltas (origin = no shift)."""
    user_cosine: pd.DataFrame
    """site, layer, user_a, user_b, cosine (figure sites only)."""
    meta: dict = field(default_factory=dict)
    """Provenance: config, counts, the deltas' metadata."""
    null_tests: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=NULL_TEST_COLUMNS))
    """site, layer, null, centered, statistic (``rank@tau``), observed (the deltas' rank),
    null_median, null_low, null_high (central ``ci_level`` range of the draws), p_value
    (``nulls.rank_p_value``, conservative with tied ranks), p_value_randomized (ties broken at
    random, ``nulls.rank_p_value_randomized``), n_draws."""
    controls: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CONTROL_COLUMNS))
    """One row per site x control: ``perfit_probe.analysis.controls.CONTROL_COLUMNS``."""
    identification: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=IDENTIFICATION_COLUMNS))
    """site, layer, features (``hidden_state``, ``hidden_state_{variant}``, or a text feature
    set at ``site == TEXT_SITE``), accuracy, chance, uniform_chance, p_value, n_users,
    n_train, n_test."""

    def save(self, directory: Path) -> list[Path]:
        """Write every frame as CSV into ``directory``; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, filename in {**TABLES, **EXTRA_TABLES}.items():
            path = directory / filename
            atomic_write_text(path, getattr(self, name).to_csv(index=False))
            paths.append(path)
        write_json(directory / "analysis.json", self.meta)
        return paths

    @classmethod
    def load(cls, directory: Path) -> AnalysisResult:
        """Read what :meth:`save` wrote (``ConfigError`` naming a missing file)."""
        directory = Path(directory)
        frames = {}
        for name, filename in TABLES.items():
            path = directory / filename
            if not path.is_file():
                raise ConfigError(f"{path} not found: run `perfit-probe analyze RUN_DIR` first")
            frames[name] = pd.read_csv(path, dtype={"user_id": str, "user_a": str, "user_b": str})
        for name, filename in EXTRA_TABLES.items():
            path = directory / filename
            frames[name] = (pd.read_csv(path) if path.is_file()
                            else pd.DataFrame(columns=_EXTRA_COLUMNS[name]))
        meta_path = directory / "analysis.json"
        meta = read_json(meta_path) if meta_path.is_file() else {}
        return cls(meta=meta, **frames)

    def summary(self) -> dict:
        """Headline numbers for ``metrics.json``: ranks at the site where the deltas'
        uncentred (else centred) ``r(0.9)`` is lowest, and that site's collective statistics."""
        tau = 0.9 if any(np.isclose(t, 0.9) for t in self.meta.get("taus", [])) else self.meta["taus"][0]
        stat = f"rank@{tau:g}"
        ranks = self.ranks
        centered = False if (~ranks["centered"]).any() else True
        ref = ranks[(ranks.source == "deltas") & (ranks.statistic == stat) & (ranks.centered == centered)]
        best = ref.loc[ref["value"].idxmin(), "site"]
        at_best = ranks[ranks.site == best]
        out: dict = {"n_users": self.meta.get("n_users"), "d_model": self.meta.get("d_model"),
                     "n_sites": len(self.meta.get("sites", [])), "best_site": best,
                     "median_over_sites": {stat: float(ref["value"].median())}}
        for row in at_best.itertuples():
            key = "centred" if row.centered else "uncentred"
            out.setdefault(key, {}).setdefault(row.source, {})[row.statistic] = float(row.value)
        coll = self.collective[(self.collective.site == best) & (self.collective.source == "deltas")]
        out["collective"] = {r.statistic: float(r.value) for r in coll.itertuples()}
        return out


def analyze_deltas(
    deltas: Deltas, config: AnalysisConfig | None = None, history: pd.DataFrame | None = None
) -> AnalysisResult:
    """Run the whole shift analysis on ``deltas`` (see the module docstring).

    ``history`` (``perfit_probe.data.controls.history_frame``, as saved in
    ``RUN/deltas/history.csv``) enables the text baselines of user identification.
    """
    config = config or AnalysisConfig()
    with threadpool_limits(limits=config.blas_threads, user_api="blas"):
        return _analyze(deltas, config, history)


def _analyze(deltas: Deltas, config: AnalysisConfig, history: pd.DataFrame | None) -> AnalysisResult:
    """``analyze_deltas`` within its BLAS thread limit: every site's rows, then the text baselines."""
    n_users = len(deltas.user_ids)
    _check_deltas(deltas)
    figure_sites = _figure_sites(deltas, config)
    rows: dict[str, list] = {name: [] for name in {**TABLES, **EXTRA_TABLES}}
    skipped: set[str] = set()
    q_all = deltas.query_delta.double().numpy() if deltas.query_delta is not None else None
    for index in tqdm(range(len(deltas.sites)), desc="sites", disable=not config.progress):
        skipped |= _site_rows(rows, deltas, index, config, q_all, figure=deltas.sites[index] in figure_sites)
    rows["identification"] += _text_rows(deltas, history, config)
    not_cached = sorted(skipped & set(CONTROL_SOURCES))  # opt-in cache variants: no warning
    skipped -= set(CONTROL_SOURCES)
    if skipped:
        log.warning("nulls skipped (inputs missing from the deltas): %s", sorted(skipped))
    if not_cached:
        log.info("control variants not cached (add them to the cache's variants): %s", not_cached)
    meta = {
        "config": config, "n_users": n_users, "d_model": deltas.d_model, "sites": list(deltas.sites),
        "taus": list(config.taus), "figure_sites": figure_sites, "skipped_sources": sorted(skipped),
        "controls_not_cached": not_cached,
        "n_queries": 0 if q_all is None else len(q_all), "deltas_meta": deltas.meta,
    }
    return AnalysisResult(
        ranks=pd.DataFrame(rows["ranks"]),
        collective=pd.DataFrame(rows["collective"], columns=_COLLECTIVE_COLUMNS),
        curves=pd.DataFrame(rows["curves"]),
        user_stats=_frame(rows["user_stats"], ["site", "layer", "source", "user_id", "cos_to_mean",
                                               "norm", "personal_norm", "norm_ratio"]),
        projection=_frame(rows["projection"], ["site", "layer", "kind", "user_id", "pc1", "pc2",
                                               "ratio1", "ratio2"]),
        user_cosine=_frame(rows["user_cosine"], ["site", "layer", "user_a", "user_b", "cosine"]),
        meta=to_jsonable(meta),
        null_tests=pd.DataFrame(rows["null_tests"], columns=NULL_TEST_COLUMNS),
        controls=pd.DataFrame(rows["controls"], columns=CONTROL_COLUMNS),
        identification=pd.DataFrame(rows["identification"], columns=IDENTIFICATION_COLUMNS),
    )


def _check_deltas(deltas: Deltas) -> None:
    """``ConfigError`` for fewer than 2 users, ``DataError`` for a site where every delta is 0."""
    n_users = len(deltas.user_ids)
    if n_users < 2:
        raise ConfigError(f"shift analysis needs at least 2 users, the deltas have {n_users}")
    zero = [site for i, site in enumerate(deltas.sites) if not bool(deltas.enhanced[:, i].abs().amax() > 0)]
    if zero:
        raise DataError(f"every user's delta vector is exactly 0 at {', '.join(zero)}: the enhanced prompts "
                        "equal the plain ones there (k=0, or identical prompts); cache with k >= 1")


def _site_rows(rows: dict[str, list], deltas: Deltas, index: int, config: AnalysisConfig,
               q_all: Float[np.ndarray, "queries sites d_model"] | None, *, figure: bool) -> set[str]:
    """Append site number ``index``'s rows to ``rows`` (one list per table); returns the
    requested sources the deltas cannot provide. Seeded by ``(config.seed, index)``."""
    site = deltas.sites[index]
    key = {"site": site, "layer": _layer(site, index)}
    seq = np.random.SeedSequence([config.seed, index])
    g_null, g_boot, g_perm, g_draws = (np.random.default_rng(s) for s in seq.spawn(4))
    mats = source_matrices(deltas, index, g_null)
    skipped = {s for s in config.sources if s not in mats}
    mats = {s: m for s, m in mats.items() if s in config.sources or s == "deltas"}
    weights = bootstrap_weights(len(deltas.user_ids), config.n_boot, g_boot, config.bootstrap)
    draws = {}
    if config.n_null_draws:
        for kind in NULLS:
            if kind in config.sources or kind == "anisotropic_null":
                draws[kind] = null_rank_draws(mats["deltas"], kind, config.n_null_draws, g_draws,
                                              config.centers, config.taus)
        rows["null_tests"] += _null_test_rows(key, mats["deltas"], draws, config, g_draws)
    for source, x in mats.items():
        rows["ranks"] += _rank_rows(key, source, x, weights, config, draws.get(source))
        rows["curves"] += _curve_rows(key, source, x, config)
        rows["collective"] += _collective_rows(key, source, x, weights, config)
        users = per_user_collective(x, deltas.user_ids)
        rows["user_stats"].append(users.assign(**key, source=source))
        if source == "control" or source in CONTROL_SOURCES:
            rows["controls"].append({**key, "control": source,
                                     **compare_to_control(mats["deltas"], x, config.alpha)})
    if q_all is not None and len(q_all):
        _query_site_rows(rows, key, deltas, q_all, index, g_perm, config)
    if figure:
        _figure_rows(rows, key, mats["deltas"], deltas, q_all, index, config)
    return skipped


def _query_site_rows(rows: dict[str, list], key: dict, deltas: Deltas,
                     q_all: Float[np.ndarray, "queries sites d_model"], index: int, g_perm: np.random.Generator,
                     config: AnalysisConfig) -> None:
    """The per-query rows of one site: between/within-user statistics and user identification
    from the hidden-state shifts (the history's, and each control variant's)."""
    q_labels = np.asarray(deltas.query_user_ids)
    query_rows, ident = _query_rows(key, q_all[:, index], q_labels, g_perm, config)
    rows["collective"] += query_rows
    if ident is not None:
        rows["identification"].append(_ident_row(key, "hidden_state", ident))
    for variant, q_var in deltas.variant_query_deltas.items():
        ident = _identify(key, q_var[:, index].double().numpy(), q_labels, config)
        if ident is not None:
            rows["identification"].append(_ident_row(key, f"hidden_state_{variant}", ident))


def _figure_rows(rows: dict[str, list], key: dict, x: Float[np.ndarray, "users d_model"], deltas: Deltas,
                 q_all: Float[np.ndarray, "queries sites d_model"] | None, index: int, config: AnalysisConfig) -> None:
    """The rows only figures use, at a figure site: the projection on the top directions and
    the user-by-user cosine matrix of the deltas ``x``."""
    n_users = len(deltas.user_ids)
    rows["projection"].append(_projection(key, x, deltas, q_all, index, config))
    cos = cosine_matrix(x)
    ids = np.asarray(deltas.user_ids)
    rows["user_cosine"].append(pd.DataFrame({
        **key, "user_a": np.repeat(ids, n_users), "user_b": np.tile(ids, n_users),
        "cosine": cos.ravel()}))


_COLLECTIVE_COLUMNS = ["site", "layer", "source", "statistic", "value", "ci_low", "ci_high", "p_value"]


def _frame(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def _layer(site: str, index: int) -> int:
    try:
        return parse_site(site).layer
    except SiteError:
        return index


def _figure_sites(deltas: Deltas, config: AnalysisConfig) -> list[str]:
    if config.figure_sites is not None:
        missing = [s for s in config.figure_sites if s not in deltas.sites]
        if missing:
            raise ConfigError(f"figure sites {missing} are not in the deltas (have {deltas.sites})")
        return list(config.figure_sites)
    n = len(deltas.sites)
    picks = np.unique(np.linspace(0, n - 1, min(n, config.max_figure_sites)).round().astype(int))
    return [deltas.sites[i] for i in picks]


def _rank_rows(
    key: dict, source: str, x: np.ndarray, weights: np.ndarray, config: AnalysisConfig,
    draws: dict[bool, np.ndarray] | None = None,
) -> list[dict]:
    """Rank rows of one source. With ``draws`` (a Gaussian null drawn ``n_null_draws`` times)
    the value is the draws' median rank and the interval their central ``ci_level`` range;
    otherwise the point estimate and a percentile bootstrap interval over users."""
    n, d = x.shape
    rows = []
    for centered in config.centers:
        pca = ShiftPCA(center=centered, svd=config.svd, random_state=config.seed).fit(x)
        max_rank = pca.max_rank_
        if draws is not None:
            null = draws[centered]
            points = np.quantile(null, 0.5, axis=0, method="lower")
            low, high = percentile_interval(null, config.ci_level)
            interval = "null draws"
        else:
            points = [pca.rank_at(tau) for tau in config.taus]
            boot = bootstrap_ranks(x, weights, centered, config.taus)
            low, high = percentile_interval(boot, config.ci_level)
            interval = "bootstrap" if len(weights) else "none"
        for j, tau in enumerate(config.taus):
            rank = points[j]
            for stat, value, lo, hi in (
                (f"rank@{tau:g}", rank, low[j], high[j]),
                (f"per_mille@{tau:g}", 1000.0 * rank / max_rank, 1000.0 * low[j] / max_rank,
                 1000.0 * high[j] / max_rank),
            ):
                rows.append({**key, "source": source, "centered": centered, "statistic": stat,
                             "value": float(value), "ci_low": float(lo), "ci_high": float(hi),
                             "n_users": n, "d_model": d, "max_rank": max_rank, "interval": interval})
    return rows


def _null_test_rows(
    key: dict, x: np.ndarray, draws: dict, config: AnalysisConfig, rng: np.random.Generator
) -> list[dict]:
    rows = []
    for centered in config.centers:
        pca = ShiftPCA(center=centered, svd=config.svd, random_state=config.seed).fit(x)
        for kind, by_center in draws.items():
            null = by_center[centered]
            low, high = percentile_interval(null, config.ci_level)
            for j, tau in enumerate(config.taus):
                observed = pca.rank_at(tau)
                rows.append({**key, "null": kind, "centered": centered, "statistic": f"rank@{tau:g}",
                             "observed": float(observed),
                             "null_median": float(np.quantile(null[:, j], 0.5, method="lower")),
                             "null_low": float(low[j]), "null_high": float(high[j]),
                             "p_value": rank_p_value(observed, null[:, j]),
                             "p_value_randomized": rank_p_value_randomized(observed, null[:, j], rng),
                             "n_draws": len(null)})
    return rows


def _ident_row(key: dict, features: str, ident) -> dict:
    return {**key, "features": features, "accuracy": ident.accuracy, "chance": ident.chance,
            "uniform_chance": ident.uniform_chance, "p_value": ident.p_value,
            "n_users": ident.n_users, "n_train": ident.n_train, "n_test": ident.n_test}


def _identify(key: dict, q: np.ndarray, labels: np.ndarray, config: AnalysisConfig):
    try:
        return identify_users(q, labels, heldout_fraction=config.heldout_fraction,
                              classifier=config.classifier, seed=config.seed)
    except ConfigError as exc:
        log.warning("%s: no user identification: %s", key["site"], exc)
        return None


def _text_rows(deltas: Deltas, history: pd.DataFrame | None, config: AnalysisConfig) -> list[dict]:
    """Identification rows of the text baselines (``TEXT_SITE``), when the history is known."""
    if history is None or deltas.query_delta is None or not len(deltas.query_user_ids):
        return []
    try:
        idents = text_identification(history, deltas.query_user_ids, deltas.query_ids,
                                     heldout_fraction=config.heldout_fraction,
                                     classifier=config.classifier, seed=config.seed)
    except ConfigError as exc:
        log.warning("no text baselines of user identification: %s", exc)
        return []
    key = {"site": TEXT_SITE, "layer": -1}
    return [_ident_row(key, name, ident) for name, ident in idents.items()]


def _curve_rows(key: dict, source: str, x: np.ndarray, config: AnalysisConfig) -> list[dict]:
    rows = []
    for centered in config.centers:
        pca = ShiftPCA(center=centered, svd=config.svd, random_state=config.seed).fit(x)
        for k, value in enumerate(pca.cumulative_ratio_, start=1):
            rows.append({**key, "source": source, "centered": centered, "component": k,
                         "cumulative": float(value)})
    return rows


def _collective_rows(
    key: dict, source: str, x: np.ndarray, weights: np.ndarray, config: AnalysisConfig
) -> list[dict]:
    point = collective_summary(x)
    boot = collective_summary(x, weights) if len(weights) else None
    users = per_user_collective(x, [str(i) for i in range(len(x))])
    rows = []
    for stat in COLLECTIVE_STATISTICS:
        lo, hi = (percentile_interval(boot[stat], config.ci_level) if boot is not None
                  else (np.nan, np.nan))
        rows.append({**key, "source": source, "statistic": stat, "value": float(point[stat][0]),
                     "ci_low": float(lo), "ci_high": float(hi), "p_value": np.nan})
    rows.append({**key, "source": source, "statistic": "cos_to_mean_median",
                 "value": float(users["cos_to_mean"].median()), "ci_low": np.nan,
                 "ci_high": np.nan, "p_value": np.nan})
    return rows


def _query_rows(
    key: dict, q: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AnalysisConfig
) -> tuple[list[dict], object]:
    """F-ratio and identification rows of the per-query deltas, and the ``Identification``."""
    rows = []
    base = {**key, "source": "deltas", "ci_low": np.nan, "ci_high": np.nan}
    try:
        vr = variance_ratio(q, labels, config.n_perm, rng)
        rows += [{**base, "statistic": "f_ratio", "value": vr.f_ratio, "p_value": vr.p_value},
                 {**base, "statistic": "between_ms", "value": vr.between, "p_value": np.nan},
                 {**base, "statistic": "within_ms", "value": vr.within, "p_value": np.nan}]
    except ConfigError as exc:
        log.warning("%s: no F ratio: %s", key["site"], exc)
    ident = _identify(key, q, labels, config)
    if ident is not None:
        rows += [{**base, "statistic": "id_accuracy", "value": ident.accuracy, "p_value": ident.p_value},
                 {**base, "statistic": "id_chance", "value": ident.chance, "p_value": np.nan},
                 {**base, "statistic": "id_uniform_chance", "value": ident.uniform_chance,
                  "p_value": np.nan},
                 {**base, "statistic": "id_n_test", "value": float(ident.n_test), "p_value": np.nan}]
    return rows, ident


def _projection(
    key: dict, x: np.ndarray, deltas: Deltas, q_all: np.ndarray | None, index: int,
    config: AnalysisConfig,
) -> pd.DataFrame:
    k = min(2, *x.shape)
    pca = ShiftPCA(center=False, svd="exact", n_components=k, random_state=config.seed).fit(x)
    parts = [("user", list(deltas.user_ids), x), ("collective", ["__mean__"], x.mean(0, keepdims=True))]
    if q_all is not None and len(q_all):
        parts.append(("query", list(deltas.query_user_ids), q_all[:, index]))
    frames = []
    ratios = list(pca.explained_variance_ratio_) + [0.0] * (2 - k)
    for kind, ids, mat in parts:
        z = pca.transform(mat)
        z = np.pad(z, ((0, 0), (0, 2 - k)))
        frames.append(pd.DataFrame({**key, "kind": kind, "user_id": ids, "pc1": z[:, 0], "pc2": z[:, 1],
                                    "ratio1": ratios[0], "ratio2": ratios[1]}))
    return pd.concat(frames, ignore_index=True)

