"""Shift analysis: low rank of delta vectors, nulls, collective versus personal shift.

``ShiftPCA`` (``shift``) estimates principal directions and ranks at energy shares; ``nulls``
builds the yardsticks (Gaussian vectors with matched norms, drawn repeatedly for p-values, an
anisotropic Gaussian null, the random-text and format-matched controls, user-shuffled deltas)
and bootstraps; ``controls`` compares the real history with each control; ``text_baseline``
identifies users from the prompt text alone; ``collective`` measures the collective and
personal parts;
``tables.analyze_deltas`` runs it all into tidy frames (``perfit_probe.stages.analyze`` does so
for a run directory); ``synthetic.planted_deltas`` makes deltas with known structure for validation.
"""

from perfit_probe.analysis.collective import (
    Identification, VarianceRatio, collective_direction, collective_summary, identify_users,
    variance_ratio,
)
from perfit_probe.analysis.controls import compare_to_control
from perfit_probe.analysis.nulls import (
    NULLS, SOURCES, anisotropic_null, gaussian_null, null_rank_draws, rank_p_value, shuffled_deltas,
)
from perfit_probe.analysis.shift import ShiftPCA, rank_at_energy
from perfit_probe.analysis.synthetic import PlantedShift, planted_deltas
from perfit_probe.analysis.tables import AnalysisResult, analyze_deltas
from perfit_probe.analysis.text_baseline import text_identification
from perfit_probe.config import AnalysisConfig

__all__ = [
    "AnalysisConfig", "AnalysisResult", "Identification", "NULLS", "PlantedShift", "SOURCES",
    "ShiftPCA", "VarianceRatio", "analyze_deltas", "anisotropic_null", "collective_direction",
    "collective_summary", "compare_to_control", "gaussian_null", "identify_users",
    "null_rank_draws", "planted_deltas", "rank_at_energy", "rank_p_value",
    "shuffled_deltas", "text_identification", "variance_ratio",
]
