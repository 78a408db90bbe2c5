"""PerFit interventions: LoReFT banks, applying them to a model, two-stage training, artifacts.

Typical notebook use::

    from perfit_probe.models import load_model
    from perfit_probe.interventions import load_perfit, generate
    loaded = load_model("smollm2")
    perfit = load_perfit("runs/x", loaded)
    generate(loaded, ["Rate Heat (1995) from 1 to 5:"], perfit=perfit, user_ids=["42"], scale=1.5)
"""

from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.artifact import PerFit, load_bank, load_perfit, save_bank
from perfit_probe.interventions.generate import generate, score_labels
from perfit_probe.interventions.modules import BankSpec, InterventionBank

__all__ = [
    "BankSpec", "Intervention", "InterventionBank", "PerFit", "generate", "load_bank",
    "load_perfit", "save_bank", "score_labels",
]
