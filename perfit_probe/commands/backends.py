"""``perfit-probe backends``: read hidden states through every backend and compare them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tyro.conf import UseAppendAction

from perfit_probe._repro import seed_everything
from perfit_probe.backends.agreement import backend_agreement
from perfit_probe.commands.common import Flat, load_cli_model
from perfit_probe.config import ModelFields, ModelSource
from perfit_probe.sites import parse_sites
from perfit_probe.stages.rundir import RunDir

DEFAULT_PROMPTS = (
    "I loved Star Wars (1977) and Fargo (1996). How would I rate Toy Story (1995)?",
    "Give me a one-word tag for a movie about a boy and his dog.",
    "Rate the movie Heat (1995) from 1 to 5.",
)


def backends(model: Flat[ModelFields] = ModelFields(), source: Flat[ModelSource] = ModelSource(),
             sites: tuple[str, ...] | None = None, prompt: UseAppendAction[tuple[str, ...]] = (),
             out: Path | None = None, seed: int = 0) -> int:
    """Cache hidden states through every backend and print their agreement.

    Args:
        model: The model.
        source: Where model weights are looked for.
        sites: Comma-separated sites or layer indices (default: every layer's resid_post).
        prompt: Prompt to run (repeatable; default: three short movie prompts).
        out: Run directory to write (optional).
        seed: Seed of everything seeded.
    """
    seed_everything(seed)
    loaded = load_cli_model(model, source)
    sites_ = parse_sites(list(sites) if sites else list(range(loaded.n_layers)), loaded.n_layers)
    prompts = list(prompt or DEFAULT_PROMPTS)
    frame = backend_agreement(loaded, prompts, sites_)
    worst = frame.groupby("backend")["max_abs_diff"].max()
    print(f"model {loaded.identity.name}: {loaded.n_layers} layers, d_model {loaded.d_model}; "
          f"{len(prompts)} prompts, {len(sites_)} sites, left-padded batch vs reference hooks")
    for backend, value in worst.items():
        print(f"  {backend:>17}: max |difference| over all sites and positions = {value:.2e}")
    if out is not None:
        options = {**dataclasses.asdict(model), **dataclasses.asdict(source), "sites": sites,
                   "prompt": list(prompt), "out": out, "seed": seed}
        run_dir = RunDir.create(out, "backends", options, seed, loaded.identity, exist_ok=True)
        frame.to_csv(run_dir.path / "backend_agreement.csv", index=False)
        run_dir.add_metrics("backends", worst.to_dict())
        print(f"wrote {run_dir.path / 'backend_agreement.csv'}")
    return 0 if worst.max() < 1e-4 else 1
