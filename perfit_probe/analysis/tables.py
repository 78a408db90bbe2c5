"""The shift analysis of a ``Deltas`` artifact as tidy tables (``analyze_deltas``).

For every site it computes, for the real deltas and each null of ``perfit_probe.analysis.nulls``:
ranks ``r(tau)`` and per-mille ranks, centred and uncentred, with bootstrap intervals; the
cumulative energy curves; the collective-versus-personal statistics of
``perfit_probe.analysis.collective`` (plus, from the per-query deltas, the F ratio and user
identification). It also keeps the small arrays the figures need (PC1-PC2 projections,
user x user cosines), so that figures are pure functions of the saved tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from perfit_probe.analysis.collective import (
    COLLECTIVE_STATISTICS, cosine_matrix, collective_summary, identify_users,
    per_user_collective, variance_ratio,
)
from perfit_probe.analysis.nulls import (
    BOOTSTRAPS, SOURCES, bootstrap_ranks, bootstrap_weights, percentile_interval, source_matrices,
)
from perfit_probe.analysis.shift import ShiftPCA
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError, DataError, SiteError
from perfit_probe.rundir import atomic_write_text, read_json, to_jsonable, write_json
from perfit_probe.sites import parse_site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisConfig:
    """Options of the shift analysis (recorded in ``run.json``)."""

    taus: tuple[float, ...] = (0.8, 0.9, 0.95)
    """Energy shares at which ranks are reported."""
    centers: tuple[bool, ...] = (False, True)
    """Analyse uncentred deltas (``False``), mean-centred ones (``True``), or both."""
    sources: tuple[str, ...] = SOURCES
    """Sources to compare; ``deltas`` is always analysed, unavailable nulls are skipped."""
    n_boot: int = 200
    """Bootstrap resamples of users for confidence intervals (0: none)."""
    bootstrap: str = "bayesian"
    """``bayesian`` (Dirichlet user weights) or ``classic`` (users drawn with replacement);
    see ``perfit_probe.analysis.nulls.bootstrap_weights``."""
    n_perm: int = 200
    """Label permutations for the F-ratio p-value."""
    ci_level: float = 0.95
    """Coverage of the percentile bootstrap intervals."""
    classifier: str = "centroid"
    """User-identification classifier: ``centroid`` (nearest class mean) or ``logistic``."""
    heldout_fraction: float = 0.3
    """Share of each user's queries (the last ones) held out for user identification."""
    svd: str = "auto"
    """SVD solver of the point estimates: ``auto``, ``exact`` or ``randomized``."""
    figure_sites: tuple[str, ...] | None = None
    """Sites for PC projections and cosine heatmaps (``None``: up to ``max_figure_sites``
    evenly spaced sites)."""
    max_figure_sites: int = 4
    """How many sites ``figure_sites=None`` picks."""
    seed: int = 0
    """Seed of nulls, bootstraps, permutations and classifiers."""
    progress: bool = False
    """Show a progress bar over sites."""
    blas_threads: int | None = 1
    """BLAS threads while analysing. The work is many small SVDs and eigen-decompositions,
    which multi-threaded BLAS slows down (20x measured on a busy 2-core machine); ``None``
    keeps the library default."""

    def __post_init__(self) -> None:
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise ConfigError(f"unknown analysis sources {bad}: choose from {SOURCES}")
        if not self.centers:
            raise ConfigError("analysis centers is empty: use (False,), (True,) or (False, True)")
        if self.bootstrap not in BOOTSTRAPS:
            raise ConfigError(f"unknown bootstrap {self.bootstrap!r}: choose from {BOOTSTRAPS}")
        if self.n_boot < 0 or self.n_perm < 0:
            raise ConfigError("n_boot and n_perm must be >= 0")


TABLES = {
    "ranks": "ranks.csv",
    "collective": "collective.csv",
    "curves": "cumulative_variance.csv",
    "user_stats": "user_stats.csv",
    "projection": "pc_projection.csv",
    "user_cosine": "user_cosine.csv",
}
"""Field of ``AnalysisResult`` -> CSV file name under ``RUN/analysis/``."""


@dataclass(frozen=True)
class AnalysisResult:
    """Tidy frames of the shift analysis; ``save``/``load`` round-trip them as CSV."""

    ranks: pd.DataFrame
    """site, layer, source, centered, statistic (``rank@tau``, ``per_mille@tau``), value,
    ci_low, ci_high, n_users, d_model, max_rank."""
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

    def save(self, directory: Path) -> list[Path]:
        """Write every frame as CSV into ``directory``; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, filename in TABLES.items():
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
        meta_path = directory / "analysis.json"
        meta = read_json(meta_path) if meta_path.is_file() else {}
        return cls(meta=meta, **frames)

    def rank_table(self, centered: bool) -> pd.DataFrame:
        """Wide view: one row per site x source, columns ``rank@tau`` and ``per_mille@tau``."""
        sub = self.ranks[self.ranks["centered"] == centered]
        wide = sub.pivot_table(index=["layer", "site", "source"], columns="statistic",
                               values="value", sort=False)
        return wide.reset_index()

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


def analyze_deltas(deltas: Deltas, config: AnalysisConfig | None = None) -> AnalysisResult:
    """Run the whole shift analysis on ``deltas`` (see the module docstring)."""
    config = config or AnalysisConfig()
    with threadpool_limits(limits=config.blas_threads, user_api="blas"):
        return _analyze(deltas, config)


def _analyze(deltas: Deltas, config: AnalysisConfig) -> AnalysisResult:
    n_users, d_model = len(deltas.user_ids), deltas.d_model
    if n_users < 2:
        raise ConfigError(f"shift analysis needs at least 2 users, the deltas have {n_users}")
    zero = [site for i, site in enumerate(deltas.sites) if not bool(deltas.enhanced[:, i].abs().amax() > 0)]
    if zero:
        raise DataError(f"every user's delta vector is exactly 0 at {', '.join(zero)}: the enhanced prompts "
                        "equal the plain ones there (k=0, or identical prompts); cache with k >= 1")
    figure_sites = _figure_sites(deltas, config)
    rows: dict[str, list] = {name: [] for name in TABLES}
    skipped: set[str] = set()
    q_all = deltas.query_delta.double().numpy() if deltas.query_delta is not None else None
    q_labels = np.asarray(deltas.query_user_ids)
    for index in tqdm(range(len(deltas.sites)), desc="sites", disable=not config.progress):
        site = deltas.sites[index]
        key = {"site": site, "layer": _layer(site, index)}
        seq = np.random.SeedSequence([config.seed, index])
        g_null, g_boot, g_perm = (np.random.default_rng(s) for s in seq.spawn(3))
        mats = source_matrices(deltas, index, g_null)
        skipped |= {s for s in config.sources if s not in mats}
        mats = {s: m for s, m in mats.items() if s in config.sources or s == "deltas"}
        weights = bootstrap_weights(n_users, config.n_boot, g_boot, config.bootstrap)
        for source, x in mats.items():
            rows["ranks"] += _rank_rows(key, source, x, weights, config)
            rows["curves"] += _curve_rows(key, source, x, config)
            rows["collective"] += _collective_rows(key, source, x, weights, config)
            users = per_user_collective(x, deltas.user_ids)
            rows["user_stats"].append(users.assign(**key, source=source))
        if q_all is not None and len(q_all):
            rows["collective"] += _query_rows(key, q_all[:, index], q_labels, g_perm, config)
        if site in figure_sites:
            x = mats["deltas"]
            rows["projection"].append(_projection(key, x, deltas, q_all, index, config))
            cos = cosine_matrix(x)
            ids = np.asarray(deltas.user_ids)
            rows["user_cosine"].append(pd.DataFrame({
                **key, "user_a": np.repeat(ids, n_users), "user_b": np.tile(ids, n_users),
                "cosine": cos.ravel()}))
    if skipped:
        log.warning("nulls skipped (inputs missing from the deltas): %s", sorted(skipped))
    meta = {
        "config": config, "n_users": n_users, "d_model": d_model, "sites": list(deltas.sites),
        "taus": list(config.taus), "figure_sites": figure_sites, "skipped_sources": sorted(skipped),
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
    )


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
    key: dict, source: str, x: np.ndarray, weights: np.ndarray, config: AnalysisConfig
) -> list[dict]:
    n, d = x.shape
    max_rank = min(n, d)
    rows = []
    for centered in config.centers:
        pca = ShiftPCA(center=centered, svd=config.svd, random_state=config.seed).fit(x)
        boot = bootstrap_ranks(x, weights, centered, config.taus)
        low, high = percentile_interval(boot, config.ci_level)
        for j, tau in enumerate(config.taus):
            rank = pca.rank_at(tau)
            for stat, value, lo, hi in (
                (f"rank@{tau:g}", rank, low[j], high[j]),
                (f"per_mille@{tau:g}", 1000.0 * rank / max_rank, 1000.0 * low[j] / max_rank,
                 1000.0 * high[j] / max_rank),
            ):
                rows.append({**key, "source": source, "centered": centered, "statistic": stat,
                             "value": float(value), "ci_low": float(lo), "ci_high": float(hi),
                             "n_users": n, "d_model": d, "max_rank": max_rank})
    return rows


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
) -> list[dict]:
    rows = []
    base = {**key, "source": "deltas", "ci_low": np.nan, "ci_high": np.nan}
    try:
        vr = variance_ratio(q, labels, config.n_perm, rng)
        rows += [{**base, "statistic": "f_ratio", "value": vr.f_ratio, "p_value": vr.p_value},
                 {**base, "statistic": "between_ms", "value": vr.between, "p_value": np.nan},
                 {**base, "statistic": "within_ms", "value": vr.within, "p_value": np.nan}]
    except ConfigError as exc:
        log.warning("%s: no F ratio: %s", key["site"], exc)
    try:
        ident = identify_users(q, labels, heldout_fraction=config.heldout_fraction,
                               classifier=config.classifier, seed=config.seed)
        rows += [{**base, "statistic": "id_accuracy", "value": ident.accuracy, "p_value": ident.p_value},
                 {**base, "statistic": "id_chance", "value": ident.chance, "p_value": np.nan},
                 {**base, "statistic": "id_uniform_chance", "value": ident.uniform_chance,
                  "p_value": np.nan},
                 {**base, "statistic": "id_n_test", "value": float(ident.n_test), "p_value": np.nan}]
    except ConfigError as exc:
        log.warning("%s: no user identification: %s", key["site"], exc)
    return rows


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

