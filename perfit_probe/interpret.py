"""A fitted run in a notebook: prompts, predictions and label distributions in the run's terms.

::

    from perfit_probe.interpret import PerFitRun

    run = PerFitRun.open("runs/demo")                 # the model recorded in run.json
    run.prompt("u3", "u3-o29")                        # the plain prompt evaluate built
    out = run.predict("u3", "u3-o29")                 # or raw input text instead of a query id
    out.distributions                                 # rows: base, stage1, perfit, rag, steer_delta
    out.predictions["perfit"]

Prompts are built exactly as ``evaluate`` built them: the task reloaded with the fit's options
(``RUN/perfit/task.json``), the split's history (held-out items removed from the profile),
``k``, retriever, chat template, seed and ``max_prompt_tokens`` as the evaluation recorded
them (``stages.fitted.prompt_settings``). ``steer_delta`` adds the user's delta vector
(``alpha`` times; ``RUN/deltas``) at the last prompt position of the first fit site that was
cached (``steer_site``). Loading prints nothing (no weight-loading bars).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from perfit_probe.data.prompts import continuation, enhanced_prompt, plain_prompt
from perfit_probe.data.records import Query, User
from perfit_probe.data.splits import history_user
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.evaluate import predict, steer_site
from perfit_probe.evaluation.interpret import PromptSettings
from perfit_probe.interventions.steering import AdditiveSteering, steered_label_logprobs
from perfit_probe.models import LoadedModel, default_cache_dir, load_model
from perfit_probe.sites import parse_site
from perfit_probe.stages.fitted import FittedRun, load_fitted_run, prompt_settings
from perfit_probe.stages.rundir import RunDir

log = logging.getLogger(__name__)

CONDITIONS = ("base", "stage1", "perfit", "rag", "steer_delta")
"""What ``PerFitRun.predict`` compares: the plain prompt without and with the interventions,
the history-enhanced prompt, and the plain prompt steered with the user's delta vector."""


@dataclass
class UserPrediction:
    """Predictions of one user's item under each condition."""

    user_id: str
    """The user."""
    prompt: str
    """The plain prompt."""
    predictions: dict[str, str]
    """Condition -> predicted output (a label under constrained decoding)."""
    distributions: pd.DataFrame | None
    """Rows: conditions; columns: labels; values: softmax over the labels (None for generation tasks)."""


def load_run_model(run_dir: Path, *, device: str | None = None, cache_dir: Path | None = None,
                   offline: bool = True) -> LoadedModel:
    """The model a run was made with (``run.json``), loaded without progress bars."""
    from transformers.utils import logging as hf_logging  # heavy: transformers is imported when a model loads

    hf_logging.disable_progress_bar()
    recorded = RunDir.open(run_dir).model_options()
    return load_model(recorded["name"] or "smollm2", dtype=recorded["dtype"] or "float32",
                      device=device or recorded["device"] or "cpu", cache_dir=cache_dir or default_cache_dir(),
                      offline=offline)


class PerFitRun:
    """A fitted run directory opened for interactive use (see the module docstring)."""

    def __init__(self, path: Path, loaded: LoadedModel, fitted: FittedRun, settings: PromptSettings,
                 deltas=None) -> None:
        self.path, self.loaded, self.fitted, self.settings, self.deltas = Path(path), loaded, fitted, settings, deltas

    @classmethod
    def open(cls, run_dir: Path | str, loaded: LoadedModel | None = None, *, device: str | None = None) -> PerFitRun:
        """Open ``run_dir``; ``loaded`` defaults to the model recorded in its ``run.json``."""
        path = Path(run_dir)
        loaded = loaded if loaded is not None else load_run_model(path, device=device)
        fitted = load_fitted_run(path, loaded)
        deltas = Deltas.load(path / "deltas") if (path / "deltas" / "deltas.json").is_file() else None
        return cls(path, loaded, fitted, prompt_settings(path), deltas)

    @property
    def task(self):
        """The run's ``TaskData``."""
        return self.fitted.task

    @property
    def users(self) -> list[str]:
        """Users with a personal intervention (the test users)."""
        return self.fitted.perfit.user_ids

    def queries(self, user_id: str) -> list[str]:
        """The user's held-out query ids (what ``evaluate`` scored)."""
        return list(self.fitted.split.heldout.get(user_id, ()))

    def _history(self, user_id: str) -> User:
        return history_user(self.task.user(user_id), self.fitted.split)

    def _query(self, user_id: str, item: str) -> Query:
        for query in self.task.user(user_id).queries:
            if query.id == item:
                return query
        return Query(id="new", input=item)

    def prompt(self, user_id: str, item: str, variant: str = "plain") -> str:
        """The ``plain`` or ``enhanced`` prompt of ``item`` (a query id of the user, or raw input text)."""
        spec, tok, s = self.task.spec, self.loaded.tokenizer, self.settings
        query = self._query(user_id, item)
        if variant == "plain":
            return plain_prompt(spec, query, tok, chat=s.chat)
        if variant == "enhanced":
            return enhanced_prompt(spec, self._history(user_id), query, tok, k=s.k, retriever=s.retriever,
                                   chat=s.chat, seed=s.seed)
        raise ConfigError(f"unknown prompt variant {variant!r}: choose plain or enhanced")

    @property
    def steer_site(self) -> str | None:
        """The site ``steer_delta`` uses: the first fit site with cached deltas (None without)."""
        return None if self.deltas is None else steer_site(self.fitted.perfit, self.deltas)

    def delta(self, user_id: str, site: str | None = None) -> torch.Tensor:
        """The user's delta vector ``[d]`` at ``site`` (default ``steer_site``)."""
        site = site or self.steer_site
        if self.deltas is None or site is None or user_id not in self.deltas.user_ids:
            raise ConfigError(f"no delta vector of user {user_id!r} at {site}: run `perfit-probe cache` on the fit's sites")
        return self.deltas.enhanced[self.deltas.user_ids.index(user_id), self.deltas.site_index(site)]

    def predict(self, user_id: str, item: str, *, alpha: float = 1.0, steer_site: str | None = None,
                conditions: tuple[str, ...] = CONDITIONS) -> UserPrediction:
        """Predictions and label distributions of ``item`` for ``user_id`` under ``conditions``."""
        spec, s = self.task.spec, self.settings
        plain = self.prompt(user_id, item)
        stages = {"base": ("none", plain), "stage1": ("collective", plain), "perfit": ("perfit", plain),
                  "rag": ("none", self.prompt(user_id, item, "enhanced") if "rag" in conditions else plain)}
        preds, rows = {}, {}
        for name in conditions:
            if name == "steer_delta":
                continue
            stage, prompt = stages[name]
            out = predict(self.loaded, [prompt], spec, chat=s.chat, perfit=self.fitted.perfit, user_ids=[user_id],
                          stage=stage, max_prompt_tokens=s.max_prompt_tokens)
            preds[name] = out.outputs[0]
            if out.label_logprobs is not None:
                rows[name] = out.label_logprobs[0].softmax(-1).numpy()
        if "steer_delta" in conditions and spec.labels and self.steer_site is not None \
                and user_id in self.deltas.user_ids:
            site = steer_site or self.steer_site
            steering = AdditiveSteering(self.delta(user_id, site).view(1, 1, -1), [parse_site(site)])
            labels = [continuation(lab, self.loaded.tokenizer, s.chat) for lab in spec.labels]
            logp = steered_label_logprobs(self.loaded, [plain], labels, steering=steering, slots=[0], scales=[alpha],
                                          max_prompt_tokens=s.max_prompt_tokens)[0]
            preds["steer_delta"] = spec.labels[int(logp.argmax())]
            rows["steer_delta"] = logp.softmax(-1).numpy()
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(spec.labels)) if rows else None
        return UserPrediction(user_id, plain, preds, frame)

