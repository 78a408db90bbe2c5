"""The run's own report: ``claims.csv``/``claims.md`` (verdicts) and ``report.md`` (everything behind them).

``write_claims`` words the verdicts ``perfit_probe.stages.claims`` computes from the run's
files; ``render_report`` gathers the headline numbers and each stage's own report into
``report.md``; ``summary_lines`` is what the CLI prints at the end of a pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from perfit_probe._io import atomic_write_text
from perfit_probe.data.tasks import task_spec
from perfit_probe.interventions.train import describe_selection
from perfit_probe.stages.claims import claim_table, claims_markdown
from perfit_probe.stages.rundir import RunDir


def write_claims(run: RunDir, task: str, capability: Path | None = None) -> None:
    """``claims.csv`` and ``claims.md``: the verdicts ``perfit_probe.stages.claims`` computes from the
    run's files (and from a capability check's ``capability.json``)."""
    frame = claim_table(run.path, kind=task_spec(task).kind, capability=capability)
    verdicts = run.path / "steer" / "verdicts.md"
    atomic_write_text(run.path / "claims.csv", frame.to_csv(index=False))
    atomic_write_text(run.path / "claims.md", claims_markdown(frame, verdicts.read_text() if verdicts.is_file() else ""))
    run.add_metrics("claims", {f"{row.claim}/{row.scope}": row.verdict for row in frame.itertuples()})


def _section(path: Path, title: str, depth: int = 1) -> list[str]:
    """A report section that inlines a stage's markdown, demoting its headings."""
    if not path.is_file():
        return []
    lines = [f"## {title}", "", f"(from `{path.name}` in `{path.parent.name}/`)", ""]
    for line in path.read_text(encoding="utf-8").splitlines():
        lines.append("#" * depth + line if line.startswith("#") else line)
    return lines + [""]


def render_report(run: RunDir) -> str:
    """``report.md`` of a pipeline run: headline numbers, then each stage's own report."""
    info, metrics = run.info(), run.metrics()
    model = info.get("model") or {}
    pipe = metrics.get("pipeline", {})
    lines = [
        "# perfit-probe pipeline report",
        "",
        f"- model: `{model.get('name')}` ({model.get('architecture')}, {model.get('n_layers')} layers, "
        f"d_model {model.get('d_model')}, fingerprint {model.get('fingerprint')})",
        f"- seed: {info.get('seed')}; perfit-probe {info.get('versions', {}).get('perfit-probe')}, "
        f"torch {info.get('versions', {}).get('torch')}",
        f"- wall time: {pipe.get('total_wall_s', float('nan')):.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in pipe.get('stage_wall_s', {}).items())}); "
        f"peak memory {pipe.get('peak_rss_gib', float('nan')):.2f} GiB",
        "",
    ]
    claims = run.path / "claims.md"
    if claims.is_file():
        lines += [claims.read_text(), ""]
    cache = metrics.get("cache")
    if cache:
        lines += [f"- cache: {cache.get('n_users')} users, {cache.get('n_queries')} queries, "
                  f"{cache.get('n_rows')} prompts x {len(cache.get('sites', []))} sites", ""]
    lines += _section(run.path / "analysis" / "report.md", "Shift analysis")
    lines += _fit_lines(metrics.get("fit"))
    lines += _section(run.path / "eval" / "results.md", "Evaluation")
    steer = run.path / "steer" / "steer.csv"
    if steer.is_file():
        frame = pd.read_csv(steer)
        verdicts = run.path / "steer" / "verdicts.md"
        lines += ["## Causal steering checks", ""]
        lines += [verdicts.read_text().strip(), ""] if verdicts.is_file() else []
        lines += ["```", frame.to_string(index=False, max_rows=400), "```", ""]
    lines += _section(run.path / "interpret" / "report.md", "From shift to steering and back")
    figures = sorted((run.path / "figures").glob("*.png")) if (run.path / "figures").is_dir() else []
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures] + [""]
    return "\n".join(lines) + "\n"


def _fit_lines(fit: dict | None) -> list[str]:
    """The fit stage in the report: losses per stage and the stage-2 model selection."""
    if not fit:
        return []
    lines = ["## PerFit training", ""]
    for stage, label in (("stage1", "stage 1 (collective)"), ("stage2", "stage 2 (personal)")):
        curve = fit.get(stage) or {}
        if curve.get("steps"):
            lines.append(f"- {label}: {curve['steps']} steps, training loss {curve['first_epoch_loss']:.3f} "
                         f"(first epoch) -> {curve['last_epoch_loss']:.3f} (last epoch), "
                         f"{fit.get(stage + '_train_s', float('nan')):.0f} s")
    selection = (fit.get("stage2") or {}).get("selection")
    if selection:
        lines.append(f"- stage-2 model selection on held-out history queries ({selection['users']} users): "
                     + describe_selection(selection))
    return lines + [""]


def summary_lines(run: RunDir) -> list[str]:
    """What the CLI prints at the end: headline numbers and where everything is."""
    metrics = run.metrics()
    path = run.path
    out = [f"run directory: {path}"]
    analysis = metrics.get("analysis") or {}
    for centring in ("uncentred", "centred"):
        ranks = analysis.get(centring)
        if ranks:
            parts = [f"{source} {values.get('rank@0.9', float('nan')):.0f}" for source, values in ranks.items()]
            out.append(f"  rank@0.9 at the lowest-rank site ({centring}, of {analysis.get('n_users')} users): "
                       + ", ".join(parts))
    evaluate = metrics.get("evaluate") or {}
    for method, values in evaluate.items():
        out.append(f"  {method:>8}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()
                                                  if isinstance(v, (int, float))))
    steer = metrics.get("steer") or {}
    if "swap/pairs/toward_donor_share" in steer:
        out.append(f"  user swap: {steer['swap/pairs/toward_donor_share']:.0%} of pairs move toward the donor")
    pipe = metrics.get("pipeline", {})
    out.append(f"total {pipe.get('total_wall_s', 0):.0f} s, peak memory {pipe.get('peak_rss_gib', 0):.2f} GiB")
    claims = metrics.get("claims") or {}
    out += [f"  claim {key}: {verdict}" for key, verdict in claims.items()]
    out.append("where the time went: " + time_breakdown(metrics))
    where = [("report", "report.md"), ("verdicts", "claims.md"), ("shift analysis", "analysis/report.md"),
             ("evaluation", "eval/results.md"), ("steering", "steer/steer.csv"),
             ("interpretation", "interpret/report.md"), ("figures", "figures"),
             ("PerFit artifacts", "perfit"), ("configs and versions", "run.json")]
    out += [f"{label}: {path / rel}" for label, rel in where if (path / rel).exists()]
    return out


def time_breakdown(metrics: dict) -> str:
    """Seconds per stage, and per method inside ``evaluate`` (LoRA training included)."""
    stages = (metrics.get("pipeline") or {}).get("stage_wall_s") or {}
    parts = []
    for stage, seconds in stages.items():
        text = f"{stage} {seconds:.0f} s"
        if stage == "evaluate" and metrics.get("evaluate_wall_s"):
            inner = sorted(metrics["evaluate_wall_s"].items(), key=lambda kv: -kv[1])
            text += " (" + ", ".join(f"{method} {s:.0f} s" for method, s in inner) + ")"
        parts.append(text)
    return "; ".join(parts) or "n/a"
