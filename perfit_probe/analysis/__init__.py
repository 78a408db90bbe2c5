"""Shift analysis: low rank of delta vectors, nulls, collective versus personal shift.

``ShiftPCA`` (``shift``) estimates principal directions and ranks at energy shares; ``nulls``
builds the yardsticks (Gaussian vectors with matched norms, random-text control, user-shuffled
deltas) and bootstraps; ``collective`` measures the collective and personal parts;
``tables.analyze_deltas`` runs it all into tidy frames; ``report.run_analysis`` does so for a
run directory; ``synthetic.planted_deltas`` makes deltas with known structure for validation.
"""

from perfit_probe.analysis.collective import (
    Identification, VarianceRatio, collective_direction, collective_summary, identify_users,
    variance_ratio,
)
from perfit_probe.analysis.nulls import SOURCES, gaussian_null, shuffled_deltas
from perfit_probe.analysis.report import render_report, run_analysis
from perfit_probe.analysis.shift import ShiftPCA, rank_at_energy
from perfit_probe.analysis.synthetic import PlantedShift, planted_deltas
from perfit_probe.analysis.tables import AnalysisConfig, AnalysisResult, analyze_deltas

__all__ = [
    "AnalysisConfig", "AnalysisResult", "Identification", "PlantedShift", "SOURCES", "ShiftPCA",
    "VarianceRatio", "analyze_deltas", "collective_direction", "collective_summary",
    "gaussian_null", "identify_users", "planted_deltas", "rank_at_energy", "render_report",
    "run_analysis", "shuffled_deltas", "variance_ratio",
]
