"""Saving and loading trained interventions: safetensors plus a JSON config.

A bank directory holds ``intervention.safetensors`` (tensors ``site{i}.A``, ``site{i}.W``,
``site{i}.b``, and the anchor ``A0``, ``W0``, ``b0`` of anchored banks; float32, saved as trained;
``site{i}.first.*`` and ``site{i}.last.*`` for a bank with separate first/last interventions),
``intervention.json`` (format version, perfit-probe version, kind, sites, positions, position
clamp, share_weights, rank, d_model, slot keys, the model identity, and extra fields such as the
stacking rule) and ``checksums.json`` (SHA-256 of both). A config saved before the position
clamp and share_weights existed loads with their old behaviour (``BankSpec.from_dict``).
Loading verifies the checksums and the model identity (fingerprint of config and weights,
sampled in the loaded dtype) and refuses a corrupt file or a mismatch with ``ArtifactError``.

A fitted PerFit run keeps ``RUN/perfit/stage1/`` (the collective bank, one slot) and
``RUN/perfit/bank/`` (the personal bank, one slot per user); ``PerFit`` bundles the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import perfit_probe
from perfit_probe._io import atomic_write_text, verify_checksums, write_checksums
from perfit_probe.errors import ArtifactError
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.models import LoadedModel, ModelIdentity

FORMAT = "perfit-probe/intervention-bank/1"
TENSOR_FILE = "intervention.safetensors"
CONFIG_FILE = "intervention.json"
PERFIT_STAGES = ("perfit", "collective", "none")


def save_bank(bank: InterventionBank, directory: Path, identity: ModelIdentity | dict,
              extra: dict | None = None) -> None:
    """Write ``bank`` into ``directory`` (tensors first, config last, both atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for unit, holder in enumerate(bank.site_params):
        for name, param in [*holder.named_parameters(), *holder.named_buffers()]:
            tensors[f"{bank.spec.unit_name(unit)}.{name}"] = param.detach().to("cpu", torch.float32).contiguous()
    tmp = directory / f".{TENSOR_FILE}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / TENSOR_FILE)
    config = {
        "format": FORMAT,
        "library_version": perfit_probe.__version__,
        **bank.spec.to_dict(),
        "keys": bank.keys,
        "n_slots": bank.n_slots,
        "params_per_slot": bank.spec.params_per_slot(),
        "model": identity.to_dict() if isinstance(identity, ModelIdentity) else dict(identity),
        "extra": extra or {},
    }
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    write_checksums(directory, (TENSOR_FILE, CONFIG_FILE))


def read_bank_config(directory: Path) -> dict:
    """The JSON config of a saved bank; ``ArtifactError`` when missing or unreadable."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"no intervention in {directory}: {CONFIG_FILE} is missing (run `perfit-probe fit`)") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: malformed JSON at line {exc.lineno}") from None
    if config.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def check_identity(saved: dict, identity: ModelIdentity, where: Path, made: str = "trained on") -> None:
    """Refuse an artifact made with another model (different fingerprint or width).

    ``made`` completes "``where`` was ... model X" in the message ("trained on", "made with").
    """
    if saved.get("d_model") != identity.d_model or not identity.matches(saved):
        raise ArtifactError(
            f"{where} was {made} model {saved.get('name')!r} (fingerprint {saved.get('fingerprint')}, "
            f"d_model {saved.get('d_model')}) but the loaded model is {identity.name!r} "
            f"(fingerprint {identity.fingerprint}, d_model {identity.d_model}): load the same model in the same dtype"
        )


def load_bank(directory: Path, identity: ModelIdentity | None = None,
              device: torch.device | str = "cpu") -> tuple[InterventionBank, dict]:
    """Load a bank (and its config); with ``identity``, refuse a different model."""
    directory = Path(directory)
    config = read_bank_config(directory)
    verify_checksums(directory, (TENSOR_FILE, CONFIG_FILE), error=ArtifactError,
                     fix="refit with `perfit-probe fit --force`")
    if identity is not None:
        check_identity(config["model"], identity, directory)
    try:
        spec = BankSpec.from_dict(config)
        tensors = load_file(str(directory / TENSOR_FILE))
    except Exception as exc:  # safetensors raises several types on corrupt files
        raise ArtifactError(f"corrupt intervention in {directory}: {exc}".splitlines()[0]) from None
    bank = InterventionBank(spec, list(config["keys"]))
    with torch.no_grad():
        for unit, holder in enumerate(bank.site_params):
            for name, param in [*holder.named_parameters(), *holder.named_buffers()]:
                key = f"{spec.unit_name(unit)}.{name}"
                if key not in tensors or tensors[key].shape != param.shape:
                    raise ArtifactError(f"corrupt intervention in {directory}: tensor {key} missing or misshapen")
                param.copy_(tensors[key])
    bank.requires_grad_(False)
    return bank.to(device), config


@dataclass
class PerFit:
    """A fitted PerFit model: the collective bank, the personal bank and how they stack."""

    collective: InterventionBank
    """Stage-1 intervention (one slot)."""
    personal: InterventionBank | None
    """Stage-2 interventions (one slot per user), or None after stage 1 only."""
    stacking: str = "sum"
    """How the two stack: ``sum`` or ``compose`` (see ``perfit_probe.interventions.apply``)."""
    model: dict = field(default_factory=dict)
    """Identity of the model the banks were trained on."""

    @property
    def user_ids(self) -> list[str]:
        """Users with a personal intervention."""
        return [] if self.personal is None else list(self.personal.keys)

    def intervention(self, stage: str = "perfit", *, ablate_basis: torch.Tensor | None = None,
                     ablate_mode: str = "hidden") -> Intervention:
        """An ``Intervention`` for ``stage``: ``perfit`` (both banks), ``collective`` or ``none``."""
        if stage not in PERFIT_STAGES:
            raise ArtifactError(f"unknown stage {stage!r}: choose from {PERFIT_STAGES}")
        if stage == "perfit" and self.personal is None:
            raise ArtifactError("this fit has no personal (stage 2) bank: use stage='collective'")
        return Intervention(
            collective=None if stage == "none" else self.collective,
            personal=self.personal if stage == "perfit" else None,
            stacking=self.stacking,
            sites=self.collective.spec.sites,
            positions=self.collective.spec.positions,
            position_clamp=self.collective.spec.position_clamp,
            ablate_basis=ablate_basis,
            ablate_mode=ablate_mode,
        )

    def to(self, device: torch.device | str) -> PerFit:
        """Move the banks to ``device`` (in place); returns self."""
        self.collective.to(device)
        if self.personal is not None:
            self.personal.to(device)
        return self

    def save(self, directory: Path) -> None:
        """Write ``stage1/`` and ``bank/`` into ``directory`` (normally ``RUN/perfit``)."""
        directory = Path(directory)
        save_bank(self.collective, directory / "stage1", self.model, {"stage": "collective"})
        if self.personal is not None:
            save_bank(self.personal, directory / "bank", self.model,
                      {"stage": "personal", "stacking": self.stacking})


def perfit_dir(path: Path) -> Path:
    """``RUN/perfit`` for a run directory, or the path itself when it already is one."""
    path = Path(path)
    if (path / "stage1").is_dir():
        return path
    if (path / "perfit" / "stage1").is_dir():
        return path / "perfit"
    raise ArtifactError(f"no fitted interventions under {path}: run `perfit-probe fit --out {path}` first")


def load_perfit(path: Path, loaded: LoadedModel | None = None) -> PerFit:
    """Load a fit from a run directory (or its ``perfit/``); with ``loaded``, check the model and move there."""
    directory = perfit_dir(path)
    identity = loaded.identity if loaded is not None else None
    device = loaded.device if loaded is not None else "cpu"
    collective, config = load_bank(directory / "stage1", identity, device)
    personal, stacking = None, "sum"
    if (directory / "bank" / CONFIG_FILE).is_file():
        personal, pconfig = load_bank(directory / "bank", identity, device)
        stacking = pconfig.get("extra", {}).get("stacking", "sum")
    return PerFit(collective, personal, stacking, config["model"])
