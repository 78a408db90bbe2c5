"""``run_fit``: the whole PerFit fit of one task on one model, written into a run directory.

Writes, under ``RUN/perfit/``: ``stage1/`` (collective bank), ``bank/`` (personal bank),
``split.json`` (train/test users, held-out queries), ``task.json`` (how to reload the task
and rebuild the prompts), ``curves.csv`` (loss per step, user and stage), ``params.json``
(parameter counts: collective, per user, and LoRA rank 8 on q/v for the same model); wall
times and loss summaries go into ``RUN/metrics.json`` under ``fit``.

Data (OPPU's protocol): stage 1 trains on every query of the *train users*; stage 2 on each
*test user*'s history, its profile items turned into task examples
(``perfit_probe.data.profile_examples``: the ``max_profile_examples`` most recent items, with
retrieval over earlier items only); the test users' queries (all of them by default,
``n_heldout``) are left for evaluation. ``personal_data = "queries"`` trains stage 2 on the
test users' non-held-out queries instead. With ``val_per_user`` > 0, that many of a test
user's training examples are set aside and each user keeps its stage-2 epoch with the lowest
loss on them (``curves.csv`` rows with ``split == "val"``; a summary under
``fit.stage2.selection`` in ``metrics.json``). Prompts are ``build_examples(...,
variants=(prompt_variant,))``; a target is the gold output as it follows the prompt
(``prompts.continuation``, the same text the evaluation scores) and the end-of-text token.

``RUN/perfit/`` is written as a whole (``rundir.staged_dir``): into ``perfit.tmp-<pid>``,
swapped into place once everything is written, so an interrupted ``--force`` rerun leaves the
previous fit as it was. ``RUN/perfit/checksums.json`` holds the SHA-256 of its files (each
bank directory has its own), verified when evaluation reads them. A run directory made
(cached) with another model is refused before any work.

Several processes (``torchrun``): pass ``rank``/``world_size`` with ``torch.distributed``
initialised. Rank 0 trains stage 1 and saves it; the others wait and load it; stage-2 users
are sharded across ranks (user i to rank i mod world_size); rank 0 merges the shards. The
ranks exchange stage 1 and the shards through ``RUN/perfit.exchange/``, deleted at the end.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from perfit_probe.data import load_task
from perfit_probe.data.profile_examples import PersonalData, personal_examples
from perfit_probe.data.prompts import build_examples, continuation
from perfit_probe.data.records import Example, TaskData
from perfit_probe.data.splits import TEST_USER_CHOICES, Split, make_split
from perfit_probe.errors import ConfigError, DataError
from perfit_probe.interventions.apply import STACKINGS
from perfit_probe.interventions.artifact import check_identity, load_bank, save_bank
from perfit_probe.interventions.batching import Encoded, encode
from perfit_probe.interventions.modules import INITS, INTERVENTION_KINDS, BankSpec, InterventionBank, slot_generator
from perfit_probe.interventions.train import TrainConfig, curve_summary, train_collective, train_personal
from perfit_probe.models import LoadedModel
from perfit_probe.rundir import RunDir, atomic_write_text, staged_dir, write_checksums, write_json
from perfit_probe.sites import POSITION_CLAMPS, SITE_KINDS, Site, decoder_layers, parse_positions, resolve_site

log = logging.getLogger(__name__)

PERSONAL_INITS = ("zero", "random", "stage1")
FIT_FILES = ("split.json", "task.json", "curves.csv", "params.json")
"""Files of ``RUN/perfit/`` besides the banks, covered by its ``checksums.json``."""


@dataclass(frozen=True)
class FitConfig:
    """Everything ``perfit-probe fit`` needs besides the model and the output directory."""

    task: str = "movielens"
    """Task name for ``perfit_probe.data.load_task``."""
    task_path: Path | None = None
    """Data file or directory of the task (LaMP tasks need one)."""
    task_outputs: Path | None = None
    """Gold outputs file of a LaMP task (optional)."""
    n_users: int | None = 20
    """Users to load (seeded choice); None = all."""
    max_queries: int | None = None
    """Cap on queries per user (None = the task loader's default)."""
    n_test_users: int | None = None
    """Users who get a personal intervention; None = ``test_fraction`` of the users."""
    test_fraction: float = 0.5
    """Share of users who are test users when ``n_test_users`` is None."""
    test_users_by: str = "history"
    """Test users are those with the most ``history`` (profile items; OPPU's choice) or ``queries``."""
    n_heldout: int | None = None
    """Queries held out per test user for evaluation (None: all of them, as OPPU evaluates)."""
    personal_data: str = "profile"
    """What stage 2 (and the per-user LoRA baselines) train on: ``profile`` (the user's history
    items as task examples, OPPU's protocol) or ``queries`` (non-held-out queries; needs
    ``n_heldout``)."""
    max_profile_examples: int | None = 32
    """``profile``: each test user's most recent items trained on (None: all); bounds CPU cost."""
    profile_examples: str = "all"
    """``profile``: ``all``, or ``task_only`` to skip tasks whose items have no task form (LaMP-1, LaMP-7)."""
    layers: tuple[int, ...] = (8, 12)
    """Layers edited (negative counts from the end)."""
    site_kind: str = "resid_post"
    """Site kind edited at each layer (``resid_post`` as in the paper)."""
    positions: str = "f1+l2"
    """Prompt positions edited (LoReFT grammar)."""
    position_clamp: str = "pyreft"
    """How a short prompt of ``n`` tokens clamps ``f{p}+l{s}`` (``perfit_probe.sites.POSITION_CLAMPS``):
    ``pyreft`` takes ``min(p, n // 2)`` first and ``min(s, n // 2)`` last tokens, whether or
    not both sides are used (a one-token prompt is not edited); ``cover`` takes ``min(p, n // 2)``
    and ``min(s, ceil(n / 2))`` when both are used, each side alone up to ``n`` (perfit-probe's
    earlier rule). Default ``pyreft``: it is the reference LoReFT implementation's rule
    (``get_intervention_locations``), so a fit edits the tokens a pyreft run would; the two
    rules differ only on prompts shorter than ``2 * max(p, s)`` tokens."""
    share_weights: bool = False
    """False (default): separate interventions for the first-p and the last-s positions of an
    ``f{p}+l{s}`` spec, two per site; True: one intervention per site for all positions
    (perfit-probe's earlier behaviour, half the parameters). Specs of one side (``l1``, ``f2``)
    have one intervention per site either way. Default False: it is pyreft's default, so a
    fit and its parameter counts are those of a pyreft run with the same spec (with ``f1+l2``
    twice the parameters of the earlier shared default)."""
    intervention: str = "loreft"
    """``loreft``, ``noreft`` or ``lobireft``."""
    collective_rank: int = 8
    """Rank of the stage-1 intervention (paper: often 32 for Llama-2-7B)."""
    personal_rank: int = 4
    """Rank of each user's intervention (paper: 4-32)."""
    epochs1: int = 2
    """Stage-1 epochs (paper: 3)."""
    epochs2: int = 2
    """Stage-2 epochs over each user's history (paper: 2)."""
    lr1: float = 2e-3
    """Stage-1 learning rate (paper: 1e-4 on a 7B model; larger here so a small demo learns)."""
    lr2: float = 2e-3
    """Stage-2 learning rate."""
    weight_decay: float = 1e-2
    """AdamW weight decay (paper: 1e-2)."""
    max_grad_norm: float = 0.3
    """Gradient-norm clip (paper: 0.3), per user in stage 2."""
    batch_size: int = 8
    """Rows per step in stage 1, rows per user per step in stage 2."""
    rows_per_forward: int = 32
    """Memory cap: rows per forward/backward pass."""
    val_per_user: int = 0
    """Stage-2 model selection: this many of each test user's history examples (a seeded
    choice, at most all but one) are held out of training, and the user keeps the epoch with
    the lowest loss on them, epoch 0 being the initialisation (0: no selection, last epoch)."""
    stacking: str = "sum"
    """How personal and collective edits stack: ``sum`` or ``compose`` (not published)."""
    collective_init: str = "zero"
    """Stage-1 start: ``zero`` (edit exactly 0) or ``random`` (pyreft's)."""
    personal_init: str = "zero"
    """Stage-2 start: ``zero``, ``random`` or ``stage1`` (copy of the collective; needs equal ranks)."""
    prompt_variant: str = "plain"
    """Prompt variant trained on (``plain``: the intervention must carry the personal signal)."""
    k: int = 4
    """Retrieved history items in ``enhanced`` prompts."""
    retriever: str = "bm25"
    """Retriever of history items."""
    chat: bool | None = None
    """Apply the tokenizer's chat template (None: when it has one)."""
    max_prompt_tokens: int | None = 256
    """Longer prompts keep their last tokens."""
    seed: int = 0
    """Seed of the split, the initialisations and the data order."""
    model: str = "smollm2"
    """Model to load when ``run_fit`` is not given one (see ``perfit_probe.models.load_model``)."""
    dtype: str = "float32"
    """Model dtype when ``run_fit`` loads the model."""
    device: str = "cpu"
    """Device when ``run_fit`` loads the model (cpu, cuda, cuda:N, auto)."""

    def validate(self) -> None:
        """Cheap checks of the options, before any data or model is loaded."""
        if self.intervention not in INTERVENTION_KINDS:
            raise ConfigError(f"unknown intervention {self.intervention!r}: choose from {INTERVENTION_KINDS}")
        if self.stacking not in STACKINGS:
            raise ConfigError(f"unknown stacking {self.stacking!r}: choose from {STACKINGS}")
        if self.collective_init not in INITS:
            raise ConfigError(f"unknown collective init {self.collective_init!r}: choose from {INITS}")
        if self.personal_init not in PERSONAL_INITS:
            raise ConfigError(f"unknown personal init {self.personal_init!r}: choose from {PERSONAL_INITS}")
        if self.personal_init == "stage1" and self.personal_rank != self.collective_rank:
            raise ConfigError("--personal-init stage1 copies the collective intervention: give both ranks the same value")
        if self.site_kind not in SITE_KINDS:
            raise ConfigError(f"unknown site kind {self.site_kind!r}: choose from {SITE_KINDS}")
        if not self.layers:
            raise ConfigError("give at least one layer (--layers 8,12)")
        if min(self.collective_rank, self.personal_rank) < 1:
            raise ConfigError("ranks must be >= 1")
        if self.epochs1 < 0 or self.epochs2 < 0 or self.batch_size < 1 or self.rows_per_forward < 1:
            raise ConfigError("epochs must be >= 0, batch size and rows per forward >= 1")
        if self.val_per_user < 0:
            raise ConfigError(f"val_per_user must be >= 0, got {self.val_per_user}")
        if not (self.lr1 > 0 and self.lr2 > 0):
            raise ConfigError("learning rates must be positive")
        parse_positions(self.positions)
        if self.position_clamp not in POSITION_CLAMPS:
            raise ConfigError(f"unknown position clamp {self.position_clamp!r}: choose from {POSITION_CLAMPS}")
        if not isinstance(self.share_weights, bool):
            raise ConfigError(f"share_weights must be true or false, got {self.share_weights!r}")
        self.personal()
        if self.personal_data == "queries" and self.n_heldout is None:
            raise ConfigError("personal_data='queries' trains on the queries that are not held out: "
                              "set n_heldout (e.g. 4)")
        if self.n_heldout is not None and self.n_heldout < 1:
            raise ConfigError(f"n_heldout={self.n_heldout} must be >= 1 (or none: every query)")
        if self.test_users_by not in TEST_USER_CHOICES:
            raise ConfigError(f"unknown test user choice {self.test_users_by!r}: choose from {TEST_USER_CHOICES}")
        self._validate_data()

    def personal(self) -> PersonalData:
        """What the personal stages train on."""
        return PersonalData(self.personal_data, self.max_profile_examples, self.profile_examples)

    def _validate_data(self) -> None:
        """Checks of the data options (users, queries, prompts) that need no data loaded."""
        from perfit_probe.data import query_cap

        query_cap(self.max_queries)
        if self.n_users is not None and self.n_users < 2:
            raise ConfigError(f"a fit needs at least 2 users (train and test users), got n_users={self.n_users}")
        if self.n_test_users is not None and not (
                1 <= self.n_test_users and (self.n_users is None or self.n_test_users < self.n_users)):
            raise ConfigError(f"n_test_users={self.n_test_users} must be between 1 and n_users - 1")
        if self.k < 1:
            raise ConfigError(f"k={self.k}: enhanced prompts need at least 1 history item (k >= 1)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1 (or None)")

    def train_config(self, stage: int) -> TrainConfig:
        """Optimisation settings of stage 1 or 2."""
        return TrainConfig(epochs=self.epochs1 if stage == 1 else self.epochs2,
                           lr=self.lr1 if stage == 1 else self.lr2, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, batch_size=self.batch_size,
                           rows_per_forward=self.rows_per_forward, seed=self.seed)

    def task_json(self) -> dict:
        """What ``RUN/perfit/task.json`` records: how to reload the task and rebuild prompts."""
        return {"load": {"name": self.task, "path": self.task_path, "outputs": self.task_outputs,
                         "n_users": self.n_users, "seed": self.seed, "max_queries": self.max_queries},
                "prompts": {"variant": self.prompt_variant, "k": self.k, "retriever": self.retriever,
                            "chat": self.chat, "max_prompt_tokens": self.max_prompt_tokens},
                "personal": self.personal().to_dict()}


def bank_specs(config: FitConfig, loaded: LoadedModel) -> tuple[BankSpec, BankSpec]:
    """The collective and personal ``BankSpec`` of a fit on ``loaded``: checks the layers
    against the model and the ranks against ``d_model`` (``SiteError``/``ConfigError``)."""
    sites = tuple(resolve_site(Site(layer, config.site_kind), loaded.n_layers) for layer in config.layers)
    positions = parse_positions(config.positions)
    return tuple(BankSpec(config.intervention, sites, positions, rank, loaded.d_model,
                          config.position_clamp, config.share_weights)
                 for rank in (config.collective_rank, config.personal_rank))


def lora_parameter_count(model: nn.Module, rank: int = 8) -> int:
    """Trainable parameters of LoRA of ``rank`` on q_proj and v_proj (GPT-2: the fused ``c_attn``).

    For each adapted matrix of shape ``d_out x d_in``: ``rank * (d_in + d_out)``.
    """
    total = 0
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            last = name.rsplit(".", 1)[-1]
            if last in ("q_proj", "v_proj") and isinstance(module, nn.Linear):
                total += rank * (module.in_features + module.out_features)
            elif last == "c_attn" and hasattr(module, "weight"):  # GPT-2 Conv1D, weight [d_in, 3 d]
                d_in, d_out = module.weight.shape
                total += rank * (d_in + d_out)
    return total


def parameter_counts(spec1: BankSpec, spec2: BankSpec, model: nn.Module) -> dict:
    """Collective, per-user and LoRA (rank 8, q/v) parameter counts, and their ratios."""
    lora = lora_parameter_count(model, 8)
    collective, per_user = spec1.params_per_slot(), spec2.params_per_slot()
    return {"collective": collective, "per_user": per_user, "lora_r8_qv_per_user": lora,
            "per_user_over_lora": per_user / lora if lora else float("nan"),
            "collective_over_lora": collective / lora if lora else float("nan")}


def encode_examples(loaded: LoadedModel, examples: list[Example], config: FitConfig) -> dict[str, list[Encoded]]:
    """Examples as training rows by user: the prompt, then ``continuation(target)`` and end-of-text."""
    out: dict[str, list[Encoded]] = {}
    for ex in examples:
        if ex.target is None or ex.target == "":
            raise DataError(f"query {ex.query_id} of user {ex.user_id} has no gold output to train on")
        out.setdefault(ex.user_id, []).append(
            encode(loaded.tokenizer, ex.prompt, continuation(ex.target, loaded.tokenizer, config.chat), eos=True,
                   max_prompt_tokens=config.max_prompt_tokens))
    return out


def stage1_examples(loaded: LoadedModel, task: TaskData, split: Split, config: FitConfig) -> list[Example]:
    """Stage 1's data: every query of the train users, in the fit's prompt variant."""
    users = [task.user(u) for u in split.train_users]
    return build_examples(users, task.spec, loaded.tokenizer, variants=(config.prompt_variant,), k=config.k,
                          retriever=config.retriever, chat=config.chat, seed=config.seed)


def validation_indices(user: str, n_examples: int, n_val: int, seed: int) -> list[int]:
    """Positions (ascending) of the ``n_val`` of a user's ``n_examples`` personal training
    examples that are held out for model selection: the first ``min(n_val, n_examples - 1)``
    of a permutation seeded by ``(seed, user)``, so every user keeps a training example.

    The one definition of the choice: PerFit's stage 2 (``validation_split``) and the per-user
    LoRA baselines (``perfit_probe.evaluation.evaluate``) hold out the same examples.
    """
    k = min(n_val, n_examples - 1)
    if k <= 0:
        return []
    order = torch.randperm(n_examples, generator=slot_generator(seed, f"{user}/validation")).tolist()
    return sorted(order[:k])


def validation_split(examples: dict[str, list[Encoded]], n_val: int,
                     seed: int) -> tuple[dict[str, list[Encoded]], dict[str, list[Encoded]]]:
    """Hold ``n_val`` examples of each user out (``validation_indices``); returns (train, validation)."""
    train, val = {}, {}
    for user, rows in examples.items():
        held = set(validation_indices(user, len(rows), n_val, seed))
        train[user] = [r for i, r in enumerate(rows) if i not in held]
        val[user] = [r for i, r in enumerate(rows) if i in held]
    return train, val


def personal_start(collective: InterventionBank, spec: BankSpec, keys: list[str], init: str,
                   seed: int) -> InterventionBank:
    """Stage 2's personal bank before training: its edit is exactly zero, so stage 2 starts at stage 1.

    ``zero``: random orthonormal R, W = R, b = 0 (a zero edit up to the rounding of R's QR);
    ``random``: pyreft's random start; ``stage1``: a copy of the collective intervention. All are
    *anchored* (the edit is measured from the start, ``perfit_probe.interventions.modules``), which
    makes the start exactly stage 1 whatever the initialisation and the stacking.
    """
    if init == "stage1":
        return InterventionBank.copied_from(collective, keys).anchored()
    return InterventionBank.initialised(spec, keys, init, seed=seed).anchored()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def check_run_model(out: Path, loaded: LoadedModel) -> None:
    """Refuse to fit into a run directory whose ``run.json`` records another model.

    The same check (``artifact.check_identity``) that later refuses to load the banks onto
    a different model, made before any work so that a mismatched fit is never written.
    """
    info_path = Path(out) / "run.json"
    if not info_path.is_file():
        return
    recorded = RunDir(Path(out)).info().get("model")
    if recorded:
        check_identity(recorded, loaded.identity, info_path, made="made with")


def run_fit(config: FitConfig, out: Path, loaded: LoadedModel | None = None, *, rank: int = 0,
            world_size: int = 1, progress: bool = False, overwrite: bool = False) -> RunDir:
    """Fit both stages and write them into the run directory ``out``; returns it.

    ``loaded``: the model (default: ``load_model(config.model, ...)``). Every option is checked
    (layers in range, ranks <= d_model, ...) before any training.
    """
    from perfit_probe.models import load_model

    config.validate()
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError("world_size > 1 needs torch.distributed initialised (run under torchrun)")
    out = Path(out)
    if rank == 0 and (out / "perfit" / "stage1").exists() and not overwrite:
        raise ConfigError(f"{out}/perfit already holds a fit: choose another --out or pass --force")
    check_run_model(out, loaded)
    spec1, spec2 = bank_specs(config, loaded)

    task = load_task(config.task, path=config.task_path, outputs=config.task_outputs, n_users=config.n_users,
                     seed=config.seed, max_queries=config.max_queries)
    split = make_split(task, n_test_users=config.n_test_users, test_fraction=config.test_fraction,
                       n_heldout=config.n_heldout, test_users_by=config.test_users_by, seed=config.seed)
    my_test = [u for i, u in enumerate(split.test_users) if i % world_size == rank]

    if rank == 0:
        if (out / "run.json").exists():
            run = RunDir.open(out)
            run.add_stage("fit", config)
        else:
            run = RunDir.create(out, "fit", config, config.seed, loaded.identity)
        shutil.rmtree(out / "perfit.exchange", ignore_errors=True)
    else:
        run = RunDir(out)
    exchange = out / "perfit.exchange"  # stage 1 and stage-2 shards passed between ranks
    shard_dir = exchange / "shards" / f"rank{rank}"

    # ---------------------------------------------------------------- stage 1
    t0 = time.perf_counter()
    curve1 = pd.DataFrame()
    if rank == 0:
        examples1 = [e for exs in encode_examples(loaded, stage1_examples(loaded, task, split, config),
                                                  config).values() for e in exs]
        collective = InterventionBank.initialised(spec1, ["collective"], config.collective_init,
                                                  seed=config.seed).to(loaded.device)
        log.info("stage 1: %d train users, %d examples, %d parameters", len(split.train_users), len(examples1),
                 spec1.params_per_slot())
        curve1 = train_collective(loaded, collective, examples1, config.train_config(1), progress=progress)
        if world_size > 1:
            save_bank(collective, exchange / "stage1", loaded.identity, {"stage": "collective"})
    stage1_s = time.perf_counter() - t0
    _barrier(world_size)
    if rank != 0:
        collective, _ = load_bank(exchange / "stage1", loaded.identity, loaded.device)

    # ---------------------------------------------------------------- stage 2
    t0 = time.perf_counter()
    raw2 = personal_examples(loaded.tokenizer, task, split, my_test, config.personal(),
                             variant=config.prompt_variant, k=config.k, retriever=config.retriever,
                             chat=config.chat, seed=config.seed)
    examples2 = encode_examples(loaded, [e for exs in raw2.values() for e in exs], config)
    validation2 = None
    if config.val_per_user:
        examples2, validation2 = validation_split(examples2, config.val_per_user, config.seed)
    keys = [u for u in my_test if examples2.get(u)]
    if len(keys) < len(my_test):
        log.warning("stage 2 skipped: %d test users have no personal training examples (task %s, %s)",
                    len(my_test) - len(keys), task.spec.name, config.personal())
    curve2 = pd.DataFrame()
    personal = None
    if keys:
        personal = personal_start(collective, spec2, keys, config.personal_init, seed=config.seed + 1)
        personal.to(loaded.device)
        log.info("stage 2 (rank %d): %d users, %d parameters each", rank, len(keys), spec2.params_per_slot())
        curve2 = train_personal(loaded, collective, personal, examples2, config.train_config(2),
                                stacking=config.stacking, validation=validation2, progress=progress)
    if world_size > 1:
        if personal is not None:
            save_bank(personal, shard_dir, loaded.identity, {"stage": "personal", "stacking": config.stacking})
            atomic_write_text(shard_dir / "curve.csv", curve2.to_csv(index=False))
        _barrier(world_size)
        if rank != 0:
            return run
        shards, curves = [], []
        for r in range(world_size):
            directory = exchange / "shards" / f"rank{r}"
            if (directory / "intervention.json").exists():
                shards.append(load_bank(directory, loaded.identity)[0])
                curves.append(pd.read_csv(directory / "curve.csv", dtype={"user_id": str}))
        merged = InterventionBank.concat(shards)
        personal = merged.subset(list(split.test_users)).to(loaded.device)
        curve2 = pd.concat(curves, ignore_index=True)
    stage2_s = time.perf_counter() - t0

    curves = pd.concat([curve1, curve2], ignore_index=True)
    params = parameter_counts(spec1, spec2, loaded.model)
    with staged_dir(run.path / "perfit") as pdir:  # the previous fit stays until this one is whole
        split.save(pdir / "split.json")
        write_json(pdir / "task.json", config.task_json())
        save_bank(collective, pdir / "stage1", loaded.identity, {"stage": "collective"})
        if personal is not None:
            save_bank(personal, pdir / "bank", loaded.identity, {"stage": "personal", "stacking": config.stacking})
        atomic_write_text(pdir / "curves.csv", curves.to_csv(index=False))
        write_json(pdir / "params.json", {**params, "spec_collective": spec1.to_dict(),
                                          "spec_personal": spec2.to_dict(), "stacking": config.stacking,
                                          "personal_init": config.personal_init, "config": asdict(config)})
        write_checksums(pdir, FIT_FILES)
    shutil.rmtree(exchange, ignore_errors=True)
    pdir = run.path / "perfit"
    n_test = len(split.test_users)
    metrics = {
        "stage1_train_s": stage1_s, "stage2_train_s": stage2_s,
        "stage2_train_s_per_user": stage2_s / n_test if n_test else float("nan"),
        "n_train_users": len(split.train_users), "n_test_users": n_test, "world_size": world_size,
        "params": params,
        "stage1": curve_summary(curve1) if not curve1.empty else {"steps": 0},
        "stage2": curve_summary(curve2) if not curve2.empty else {"steps": 0},
    }
    run.add_metrics("fit", metrics)
    log.info("fit written to %s (stage 1 %.1f s, stage 2 %.1f s)", pdir, stage1_s, stage2_s)
    return run
