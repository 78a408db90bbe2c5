"""Every configuration of perfit-probe, typed once: the TOML files and the CLI are built from it.

- **Choices** are ``Literal`` types defined here once (``Retriever``, ``Backend``,
  ``InterventionKind``, ...); a module that needs the allowed values at run time takes
  ``typing.get_args`` of the type. ``SiteKind`` and ``PositionClamp`` live in
  ``perfit_probe.sites``, below this module.
- **Shared parts** are defined once and inherited: ``ModelConfig`` (``[model]`` of a pipeline
  file) and ``ModelFields`` (the same model as the flat ``model``/``dtype``/``device`` of the
  stages that may load it); ``TaskConfig`` (``[task]``) and ``TaskFields`` (its flat
  ``task``/``task_path``/``task_outputs``); both share ``UserSample`` (``n_users``,
  ``max_queries``, ``seed``) and ``PromptConfig`` (``k``, ``retriever``, ``chat``);
  ``OptimConfig`` holds what ``FitConfig`` passes on to each stage's ``TrainConfig``.
- **Stage configs**: ``CacheConfig``, ``AnalysisConfig``, ``FitConfig``, ``EvalConfig`` (with
  ``LoraBaselineConfig`` and ``UncertaintyConfig``), ``SteerConfig``, ``InterpretConfig``; and
  ``TuneConfig`` (with ``PerFitSpace`` and ``LoraSpace``) of the search the pipeline does not run;
  ``CapabilityConfig`` of the capability check (``perfit_probe.evaluation.capability``).
- **The pipeline**: ``PipelineConfig`` holds ``[model]``, ``[task]``, ``stages`` and every
  stage's resolved config; ``pipeline_config`` builds it from TOML-shaped tables (the
  ``[task]``/``[model]`` values reach every stage that has a field for them, a stage's own
  table overrides them), ``load_pipeline_config`` from a file.

Every config is a frozen, strict ``pydantic`` dataclass (``dataclasses.replace``, ``fields``
and ``asdict`` work as on any dataclass) that refuses unknown keys and values of the wrong type
with a one-line ``ConfigError`` naming the key: no string for a number, no ``True`` for an
integer, no ``1.5`` for an integer; an integer is a valid float, a list a valid tuple
(``Items``) and a string a valid path (``PathValue``). TOML tables are read by the same rules.
``__post_init__`` checks ranges; ``validate`` methods hold the checks that need more than one
field (or the model's depth).

``n_users``, ``max_profile_examples`` and ``max_queries`` read ``0`` as "no limit" (``None``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, TypeVar, get_args

import pydantic
from pydantic import ConfigDict, Strict, TypeAdapter, ValidationError, field_validator
from tyro.conf import arg

from perfit_probe.errors import ConfigError, PerfitError
from perfit_probe.sites import PositionClamp, SiteKind, parse_positions, parse_sites

# ----------------------------------------------------------------------------------------
# Choices

Stage = Literal["cache", "analyze", "fit", "evaluate", "steer", "interpret"]
"""Pipeline stages, in the order they run; each reads what the earlier ones wrote."""
Dtype = Literal["float32", "bfloat16", "float16", "auto"]
"""Dtype a model computes in (``auto``: as its weights are stored)."""
StorageDtype = Literal["float32", "bfloat16", "float16"]
"""Dtype of cached activations on disk."""
PaddingSide = Literal["left", "right"]
"""Padding side of batches."""
Backend = Literal["hooks", "transformer_lens", "nnsight"]
"""Activation backends (``perfit_probe.backends``)."""
Retriever = Literal["bm25", "recent", "random"]
"""History retrievers (``perfit_probe.data.retrieval``)."""
BaseVariant = Literal["plain", "enhanced", "control"]
"""Prompt variants cached by default: task input alone; with retrieved history; with neutral
random text of the history's token length."""
ControlVariant = Literal["other_user", "format_random", "permuted"]
"""Opt-in controls for the shift claims, each the history template filled with something else:
another user's retrieved history (``other_user``), random items with random outputs from all
users' profiles (``format_random``), the user's own retrieved items with their outputs
permuted among them (``permuted``). See ``perfit_probe.data.controls``."""
Variant = Literal[BaseVariant, ControlVariant]
"""Every prompt variant ``build_examples`` can make."""
TestUsersBy = Literal["history", "queries"]
"""How test users are chosen: the users with the most ``history`` (profile items, as OPPU
does) or with the most ``queries`` (the toolkit's earlier rule)."""
PersonalSource = Literal["profile", "queries"]
"""Where a personal stage's training examples come from (see ``PersonalData.source``)."""
ProfileExampleMode = Literal["all", "task_only"]
"""``all``: every task has profile examples (the stand-ins of LaMP-1/7 included);
``task_only``: tasks whose items have no task form get none."""
InterventionKind = Literal["loreft", "noreft", "lobireft"]
"""Intervention modules (``perfit_probe.interventions.modules``)."""
Init = Literal["zero", "random"]
"""Initialisations of an intervention: an edit of exactly 0, or pyreft's random one."""
PersonalInit = Literal[Init, "stage1"]
"""Initialisations of a personal intervention: ``Init`` or a copy of the collective one."""
Stacking = Literal["sum", "compose"]
"""How personal and collective edits stack."""
AblateMode = Literal["hidden", "edit"]
"""What a subspace ablation projects out of: the edited hidden state, or the edit only."""
Baseline = Literal["user_mean", "user_median", "user_majority", "global_majority", "global_mean", "bm25_top1"]
"""Trivial, model-free baselines (``perfit_probe.evaluation.baselines``)."""
Method = Literal["base", "rag", "stage1", "perfit", "lora", "lora_task", "oppu", "steer_delta", Baseline]
"""Methods ``perfit-probe evaluate`` compares (``perfit_probe.evaluation.evaluate``)."""
Decoding = Literal["auto", "constrained", "greedy"]
"""Decoding of predictions (``auto``: constrained for label tasks, greedy for generation)."""
Experiment = Literal["swap", "ablation", "dose", "control"]
"""Causal checks of ``perfit-probe steer``."""
SteerMethod = Literal["full", "personal", "pca", "other_user", "random"]
"""Vectors ``perfit-probe interpret`` adds to the plain prompt."""
AnalysisSource = Literal["deltas", "gaussian_null", "control", "shuffled", ControlVariant]
"""Every source the shift analysis can compare, the real deltas first; the control variants
come from the opt-in prompt variants (``Deltas.variant_deltas``)."""
Bootstrap = Literal["bayesian", "classic"]
"""Kinds of bootstrap over users (``perfit_probe.analysis.nulls.bootstrap_weights``)."""
Classifier = Literal["centroid", "logistic"]
"""User-identification classifiers: nearest class mean (fast, the default), and multinomial
logistic regression on standardised features (slow with many users: minutes per site for
hundreds of users on a small CPU)."""
Svd = Literal["auto", "exact", "randomized"]
"""SVD solvers of the shift analysis."""
Centring = Literal["both", "uncentred", "centred"]
"""Which deltas the shift analysis reads: as measured, mean-centred, or both."""
Search = Literal["perfit", "lora"]
"""Methods ``perfit-probe tune`` can search: ``perfit`` (stages 1 and 2) and ``lora`` (OPPU's
task LoRA, then its per-user LoRA, whose settings the ``lora`` and ``oppu`` methods share)."""
SelectBy = Literal["metric", "loss"]
"""What picks a searched stage's trial: the task's headline metric (ties: the lower validation
loss) or the validation loss (ties: the better metric)."""

STAGES: tuple[Stage, ...] = get_args(Stage)
"""Stages in the order they run."""


# ----------------------------------------------------------------------------------------
# How every config class is declared

_PYDANTIC = ConfigDict(extra="forbid", strict=True)

T = TypeVar("T")
Items = Annotated[tuple[T, ...], Strict(False)]
"""A tuple of ``T`` (a list is accepted too; each item is checked strictly)."""
PathValue = Annotated[Path, Strict(False)]
"""A path (a string is accepted too)."""


def config_class(cls: type) -> type:
    """A frozen pydantic dataclass refusing unknown keys; a bad value is a one-line ``ConfigError``."""
    cls = pydantic.dataclasses.dataclass(cls, config=_PYDANTIC, frozen=True)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, type(self).__name__)) from None

    cls.__init__ = __init__
    return cls


def _zero_is_none(value: Any) -> Any:
    """``0`` means "no limit" (``None``) for counts such as ``n_users``."""
    return None if value == 0 and type(value) is int else value


def query_cap(max_queries: int | None) -> int | None:
    """The one meaning of every ``max_queries`` option: ``None`` or ``0``: no cap (each task
    loader's own default applies: MovieLens 40, synthetic 12, LaMP all); ``N >= 1``: at most
    ``N`` queries per user. Negative values (and non-integers) raise ``ConfigError``."""
    if max_queries is None:
        return None
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 0:
        raise ConfigError(f"max_queries={max_queries!r} must be an integer >= 1, or 0 for no cap")
    return max_queries or None


# ----------------------------------------------------------------------------------------
# Shared parts


@config_class
class ModelPlacement:
    """How a model computes: its dtype and device."""

    dtype: Dtype = "float32"
    """Dtype the model computes in: ``float32``, ``bfloat16``, ``float16`` or ``auto``."""
    device: str = "cpu"
    """Device of the model: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""


@config_class
class ModelConfig(ModelPlacement):
    """The model of a pipeline (``[model]``)."""

    name: str = "smollm2"
    """``smollm2`` (the embedded SmolLM2-135M-Instruct), a local Hugging Face model directory,
    a ``.gguf`` file or a hub id."""


@config_class
class ModelFields(ModelPlacement):
    """The model of a stage that may load it itself (``ModelConfig`` as flat fields)."""

    model: str = ModelConfig.name
    """The model to load when none is passed in (``ModelConfig.name``; the pipeline's ``[model] name``)."""


@config_class
class ModelSource:
    """Where model weights are looked for (options of the CLI, not recorded in a config)."""

    cache_dir: PathValue | None = None
    """Where converted model weights are cached (None: ``$PERFIT_PROBE_CACHE``, else
    ``~/.cache/perfit_probe``)."""
    offline: bool = False
    """Never try the network for hub ids (also when ``$HF_HUB_OFFLINE`` is set)."""


@config_class
class RecordedModel(ModelSource):
    """The model of a command on an existing run directory: each field unset (None) takes the
    value that the run's ``run.json`` records, then ``ModelFields``'s default."""

    model: str | None = None
    """Model name, directory, ``.gguf`` file or hub id (None: as recorded in RUN_DIR/run.json)."""
    dtype: Dtype | None = None
    """Dtype the model computes in (None: as recorded in RUN_DIR/run.json)."""
    device: str | None = None
    """Device of the model (None: as recorded in RUN_DIR/run.json)."""


@config_class
class UserSample:
    """Which users and queries of a task are used, and the seed of everything seeded."""

    n_users: Annotated[int | None, arg(aliases=("--users",))] = 24
    """Users to load, a seeded choice (None or 0: all)."""
    max_queries: int | None = None
    """At most this many queries per user, a seeded choice (None or 0: all the task loader
    gives: MovieLens 40, synthetic 12, LaMP all; see ``query_cap``)."""
    seed: int = 0
    """Seed of the choice of users and queries, of prompt construction and of the stage's own
    seeded steps (split, initialisations, data order)."""

    @field_validator("n_users", mode="before")
    @classmethod
    def _all_users(cls, value: Any) -> Any:
        return _zero_is_none(value)


@config_class
class PromptConfig:
    """How history-enhanced prompts are built."""

    k: int = 4
    """History items retrieved into an enhanced prompt."""
    retriever: Retriever = "bm25"
    """History retriever: ``bm25``, ``recent`` or ``random``."""
    chat: bool | None = None
    """Apply the tokenizer's chat template (None: when the tokenizer has one)."""


@config_class
class TaskConfig(PromptConfig, UserSample):
    """The task of a pipeline (``[task]``), shared by every stage that loads it."""

    name: str = "movielens"
    """Task name for ``perfit_probe.data.load_task`` (``movielens``, ``synthetic``, ``LaMP-3``, ...)."""
    path: PathValue | None = None
    """Data of the task: a LaMP questions file or OPPU per-user file (JSON), or the directory
    holding the MovieLens parquet files (None: the embedded MovieLens)."""
    outputs: PathValue | None = None
    """Gold outputs file of a LaMP task, when separate from the questions."""


@config_class
class TaskFields(PromptConfig, UserSample):
    """The task of a stage that loads it (``TaskConfig`` as flat fields)."""

    task: str = TaskConfig.name
    """Task name (``TaskConfig.name``): ``movielens``, ``synthetic``, ``LaMP-1``, ``LaMP-2M``, ..."""
    task_path: PathValue | None = None
    """Data of the task (``TaskConfig.path``): a LaMP questions file or OPPU per-user file (JSON),
    or the directory holding the MovieLens parquet files (None: the embedded MovieLens)."""
    task_outputs: PathValue | None = None
    """Gold outputs file of a LaMP task (``TaskConfig.outputs``), when separate from the questions."""


@config_class
class OptimConfig:
    """Optimisation settings that both PerFit stages share."""

    weight_decay: float = 1e-2
    """AdamW decoupled weight decay, applied to W and b (R's free parameter is scale-free) (paper: 1e-2)."""
    max_grad_norm: float = 0.3
    """Gradient-norm clip, per user in stage 2 (paper: 0.3; 0 disables)."""
    batch_size: int = 8
    """Rows per step in stage 1; rows per user per step in stage 2."""
    rows_per_forward: int = 32
    """Memory cap: at most this many rows per forward/backward pass (a step is split into chunks)."""


# ----------------------------------------------------------------------------------------
# Stage configs


@config_class
class CacheConfig(ModelFields, TaskFields):
    """Everything ``perfit-probe cache`` needs; recorded in ``run.json``."""

    examples: PathValue | None = None
    """JSON-lines file of ready prompts (``user_id, query_id, variant, prompt``); replaces the task."""
    variants: Items[Variant] = get_args(BaseVariant)
    """Prompt variants to cache: ``plain``, ``enhanced``, ``control`` (the default) and the
    format-matched controls ``other_user``, ``format_random``, ``permuted``
    (``perfit_probe.data.controls``; one more forward pass per query each)."""
    sites: Annotated[list[str | int], Strict(False)] | None = None
    """Sites or layer indices to cache; None: ``default_sites`` (a spread of layers)."""
    positions: str = "last"
    """Position spec: ``last``, ``mean`` or ``f<p>+l<s>``."""
    storage_dtype: StorageDtype = "float32"
    """Dtype of stored activations: ``float32``, ``bfloat16`` or ``float16``."""
    batch_size: int = 16
    """Prompts per forward pass."""
    shard_rows: int = 1024
    """Rows per shard file (the unit of resuming and of memory use)."""
    padding_side: PaddingSide = "left"
    """Padding side of batches (values do not depend on it)."""
    backend: Backend = "hooks"
    """Activation backend: ``hooks`` (fast, early stop), ``transformer_lens`` or ``nnsight``."""
    resume: bool = False
    """Continue a stopped run in the same directory instead of refusing to overwrite it."""

    def validate(self, n_layers: int | None = None) -> None:
        """Cheap checks of every option before anything is loaded or written (``ConfigError``);
        with ``n_layers``, the sites too."""
        if self.n_users is not None and self.n_users < 1:
            raise ConfigError(f"n_users={self.n_users} must be >= 1 (None: all users)")
        query_cap(self.max_queries)
        if not self.variants:
            raise ConfigError(f"give at least one prompt variant among {get_args(Variant)}")
        if self.k < 1:
            raise ConfigError(f"k={self.k}: enhanced prompts need at least 1 history item (k >= 1); "
                              "with k=0 they equal the plain prompts and every delta is 0")
        if parse_positions(self.positions).mode == "all":
            raise ConfigError("positions 'all' cannot be cached (unbounded row size): use 'mean', 'last' or 'f<p>+l<s>'")
        if self.batch_size < 1 or self.shard_rows < 1:
            raise ConfigError(f"batch_size ({self.batch_size}) and shard_rows ({self.shard_rows}) must be at least 1")
        if n_layers is not None and self.sites:
            parse_sites(self.sites, n_layers)


@config_class
class AnalysisConfig:
    """Options of the shift analysis (recorded in ``run.json``)."""

    taus: Items[float] = (0.8, 0.9, 0.95)
    """Energy shares at which ranks are reported."""
    center: Centring = "both"
    """Analyse the deltas as measured (``uncentred``), mean-centred (``centred``), or ``both``."""
    sources: Items[AnalysisSource] = get_args(AnalysisSource)
    """Sources to compare; ``deltas`` is always analysed, unavailable nulls are skipped."""
    n_boot: int = 200
    """Bootstrap resamples of users for confidence intervals (0: none)."""
    bootstrap: Bootstrap = "bayesian"
    """``bayesian`` (Dirichlet user weights) or ``classic`` (users drawn with replacement);
    see ``perfit_probe.analysis.nulls.bootstrap_weights``."""
    n_perm: int = 200
    """Label permutations for the F-ratio p-value."""
    ci_level: float = 0.95
    """Coverage of the percentile bootstrap intervals."""
    classifier: Classifier = "centroid"
    """User-identification classifier: ``centroid`` (nearest class mean) or ``logistic``."""
    heldout_fraction: float = 0.3
    """Share of each user's queries (the last ones) held out for user identification."""
    svd: Svd = "auto"
    """SVD solver of the point estimates: ``auto``, ``exact`` or ``randomized``."""
    figure_sites: Items[str] | None = None
    """Sites for PC projections and cosine heatmaps (None: up to ``max_figure_sites``
    evenly spaced sites)."""
    max_figure_sites: int = 4
    """How many sites ``figure_sites=None`` picks."""
    seed: int = 0
    """Seed of nulls, bootstraps, permutations and classifiers."""
    progress: bool = False
    """Show a progress bar over sites."""
    n_null_draws: int = 200
    """Independent draws of each Gaussian null (``nulls.NULLS``) for the rank p-values and the
    null intervals (0: a single draw, no p-values)."""
    alpha: float = 0.05
    """Significance level that words the directions of the controls table and the report."""
    blas_threads: int | None = 1
    """BLAS threads while analysing. The work is many small SVDs and eigen-decompositions,
    which multi-threaded BLAS slows down (20x measured on a busy 2-core machine); None
    keeps the library default."""

    def __post_init__(self) -> None:
        if self.n_boot < 0 or self.n_perm < 0 or self.n_null_draws < 0:
            raise ConfigError("n_boot, n_perm and n_null_draws must be >= 0")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha={self.alpha} must lie in (0, 1)")

    @property
    def centers(self) -> tuple[bool, ...]:
        """``center`` as the centrings analysed: ``False`` (as measured), ``True`` (mean-centred)."""
        return {"both": (False, True), "uncentred": (False,), "centred": (True,)}[self.center]


@config_class
class TrainConfig(OptimConfig):
    """Optimisation settings of one PerFit stage (``FitConfig.train_config``)."""

    epochs: int = 2
    """Passes over the data (each user's own data in stage 2)."""
    lr: float = 1e-3
    """AdamW learning rate (the paper reports 1e-4 for Llama-2-7B)."""
    betas: Annotated[tuple[float, float], Strict(False)] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    seed: int = 0
    """Seed of the data order."""

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.rows_per_forward < 1:
            raise ConfigError("epochs must be >= 0, batch_size and rows_per_forward >= 1")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")


@config_class
class PersonalData:
    """What a personal stage (PerFit stage 2, the per-user LoRA, OPPU's per-user step) trains on."""

    source: PersonalSource = "profile"
    """``profile``: the user's history items as task examples (OPPU's protocol, the default);
    ``queries``: the user's queries that are not held out (the toolkit's earlier protocol)."""
    max_examples: int | None = 32
    """``profile``: at most this many of the user's most recent items (None: all)."""
    mode: ProfileExampleMode = "all"
    """``profile``: ``all`` or ``task_only`` (see ``ProfileExampleMode``)."""

    def __post_init__(self) -> None:
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max profile examples {self.max_examples} must be >= 1 (or none for all)")

    def to_dict(self) -> dict:
        """Plain-JSON form (what ``RUN/perfit/task.json`` records under ``personal``)."""
        return dataclasses.asdict(self)


@config_class
class FitConfig(OptimConfig, ModelFields, TaskFields):
    """Everything ``perfit-probe fit`` needs besides the model and the output directory."""

    n_test_users: Annotated[int | None, arg(aliases=("--test-users",))] = None
    """Users who get a personal intervention (None: ``test_fraction`` of the users)."""
    test_fraction: float = 0.5
    """Share of users who are test users when ``n_test_users`` is None."""
    test_users_by: TestUsersBy = "history"
    """Test users are those with the most ``history`` (profile items; OPPU's choice) or ``queries``."""
    n_heldout: Annotated[int | None, arg(aliases=("--heldout",))] = None
    """Queries held out per test user for evaluation (None: all of them, as OPPU evaluates)."""
    personal_data: PersonalSource = "profile"
    """What stage 2 (and the per-user LoRA baselines) train on: ``profile`` (the user's history
    items as task examples, OPPU's protocol) or ``queries`` (non-held-out queries; needs
    ``n_heldout``)."""
    max_profile_examples: int | None = 32
    """``profile``: each test user's most recent items trained on (None or 0: all); bounds CPU cost."""
    profile_examples: ProfileExampleMode = "all"
    """``profile``: ``all``, or ``task_only`` to skip tasks whose items have no task form (LaMP-1, LaMP-7)."""
    layers: Items[int] = (8, 12)
    """Layers edited (negative counts from the end)."""
    site_kind: SiteKind = "resid_post"
    """Site kind edited at each layer (``resid_post`` as in the paper)."""
    positions: str = "f1+l2"
    """Prompt positions edited (LoReFT grammar: ``l1``, ``f1+l2``, ...)."""
    position_clamp: PositionClamp = "pyreft"
    """How a short prompt of ``n`` tokens clamps ``f{p}+l{s}`` (``perfit_probe.sites.PositionClamp``):
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
    intervention: InterventionKind = "loreft"
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
    val_per_user: int = 0
    """Stage-2 model selection: this many of each test user's history examples (a seeded
    choice, at most all but one) are held out of training, and the user keeps the epoch with
    the lowest loss on them, epoch 0 being the initialisation (0: no selection, last epoch)."""
    stacking: Stacking = "sum"
    """How personal and collective edits stack: ``sum`` or ``compose`` (not published)."""
    collective_init: Init = "zero"
    """Stage-1 start: ``zero`` (edit exactly 0) or ``random`` (pyreft's)."""
    personal_init: PersonalInit = "zero"
    """Stage-2 start: ``zero``, ``random`` or ``stage1`` (copy of the collective; needs equal ranks)."""
    prompt_variant: Annotated[BaseVariant, arg(aliases=("--variant",))] = "plain"
    """Prompt variant trained on (``plain``: the intervention must carry the personal signal)."""
    max_prompt_tokens: int | None = 256
    """Longer prompts keep their last tokens."""

    @field_validator("max_profile_examples", mode="before")
    @classmethod
    def _all_examples(cls, value: Any) -> Any:
        return _zero_is_none(value)

    def validate(self) -> None:
        """Cheap checks of the options, before any data or model is loaded."""
        if self.personal_init == "stage1" and self.personal_rank != self.collective_rank:
            raise ConfigError("--personal-init stage1 copies the collective intervention: give both ranks the same value")
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
        self.personal()
        if self.personal_data == "queries" and self.n_heldout is None:
            raise ConfigError("personal_data='queries' trains on the queries that are not held out: "
                              "set n_heldout (e.g. 4)")
        if self.n_heldout is not None and self.n_heldout < 1:
            raise ConfigError(f"n_heldout={self.n_heldout} must be >= 1 (or none: every query)")
        self._validate_data()

    def personal(self) -> PersonalData:
        """What the personal stages train on."""
        return PersonalData(self.personal_data, self.max_profile_examples, self.profile_examples)

    def _validate_data(self) -> None:
        """Checks of the data options (users, queries, prompts) that need no data loaded."""
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
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimConfig)}
        return TrainConfig(epochs=self.epochs1 if stage == 1 else self.epochs2,
                           lr=self.lr1 if stage == 1 else self.lr2, seed=self.seed, **shared)

    def task_json(self) -> dict:
        """What ``RUN/perfit/task.json`` records: how to reload the task and rebuild prompts."""
        return {"load": {"name": self.task, "path": self.task_path, "outputs": self.task_outputs,
                         "n_users": self.n_users, "seed": self.seed, "max_queries": self.max_queries},
                "prompts": {"variant": self.prompt_variant, "k": self.k, "retriever": self.retriever,
                            "chat": self.chat, "max_prompt_tokens": self.max_prompt_tokens},
                "personal": self.personal().to_dict()}


@config_class
class LoraBaselineConfig:
    """Hyperparameters of the per-user LoRA baseline (OPPU defaults)."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 8.0
    """LoRA scaling numerator (``lora_alpha``); the update is ``alpha / r * B A``."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    targets: Items[str] = ()
    """Module names to adapt; empty: ``q_proj`` and ``v_proj``, or the fused qkv projection
    (GPT-2's ``c_attn``) when the model has no separate ones."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    max_grad_norm: float = 0.3
    """Gradient-norm clip."""
    epochs: int = 2
    """Passes over the user's history examples."""
    batch_size: int = 4
    """Examples per optimisation step."""
    warmup_ratio: float = 0.1
    """Share of steps of linear warm-up before the linear decay to 0."""
    max_length: int = 512
    """Longest training sequence in tokens; longer prompts lose their first tokens."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("LoRA rank, epochs and batch size must be at least 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@config_class
class UncertaintyConfig:
    """Settings of the bootstrap intervals and permutation tests."""

    n_boot: int = 2000
    """Bootstrap resamples of the test users."""
    n_perm: int = 2000
    """Random user-blocked swap patterns of the permutation test (exact when 2^n_users <= n_perm)."""
    level: float = 0.95
    """Coverage of the percentile intervals."""
    reference: str = "perfit"
    """Method every other method is compared with."""

    def __post_init__(self) -> None:
        if self.n_boot < 1 or self.n_perm < 1:
            raise ConfigError(f"n_boot={self.n_boot} and n_perm={self.n_perm} must be >= 1")
        if not 0 < self.level < 1:
            raise ConfigError(f"level={self.level} must be between 0 and 1")


@config_class
class EvalConfig:
    """Settings of ``perfit-probe evaluate``."""

    methods: Items[Method] = get_args(Method)
    """Methods to evaluate (default: all)."""
    decoding: Decoding = "auto"
    """``auto``, ``constrained`` or ``greedy`` (see ``perfit_probe.evaluation.evaluate``)."""
    max_new_tokens: int = 16
    """Tokens generated per prompt by greedy decoding."""
    batch_size: int = 16
    """Prompts per forward pass."""
    k: int | None = None
    """History items retrieved into the ``rag`` prompt (None: the fit's value; 4 without one)."""
    retriever: Retriever | None = None
    """Retriever of the ``rag`` prompt (None: the fit's; ``bm25`` without one)."""
    chat: bool | None = None
    """Wrap prompts in the chat template (None: as the fit did, else when the tokenizer has one)."""
    use_stemmer: Annotated[bool, arg(aliases=("--stemmer",))] = False
    """ROUGE with the Porter stemmer (LaMP's evaluation uses none)."""
    max_prompt_tokens: int | None = None
    """Longer prompts keep their last tokens (None: no limit)."""
    lora: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    """Hyperparameters of the per-user LoRA adapters (``lora`` and ``oppu``)."""
    lora_task: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    """Hyperparameters of OPPU's shared task LoRA (``lora_task`` and ``oppu``)."""
    seed: int = 0
    """Seed of prompt construction and LoRA training (and of the bootstrap in ``write_results``)."""
    val_per_user: Annotated[int | None, arg(aliases=("--lora-val-per-user",))] = None
    """Model selection of the per-user LoRAs (``lora``, ``oppu``): this many of each test user's
    history examples are held out and the user keeps its best epoch on them, epoch 0 being no
    adapter (None: the fit's ``val_per_user`` in ``run_evaluate``, so the budgets match; 0: no
    selection, every example trained on for all epochs)."""
    val_seed: int | None = None
    """Seed of the held-out choice (None: the fit's seed in ``run_evaluate``, else ``seed``)."""
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    """Bootstrap and permutation settings of the intervals and differences in ``write_results``."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError(f"give at least one method among {', '.join(get_args(Method))}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"batch_size ({self.batch_size}) and max_new_tokens ({self.max_new_tokens}) "
                              "must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1 (or None)")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k={self.k} must be >= 1: the rag prompt needs history items")
        if self.val_per_user is not None and self.val_per_user < 0:
            raise ConfigError(f"val_per_user={self.val_per_user} must be >= 0 (0: no model selection)")

    def with_fit(self, recorded: dict) -> EvalConfig:
        """Prompt options left unset (None) take the fit's ``recorded`` values, then the defaults.

        An option set explicitly always wins, even when it equals a default.
        """
        fallback = {"k": 4, "retriever": "bm25", "chat": None}
        values = {key: getattr(self, key) if getattr(self, key) is not None else recorded.get(key, default)
                  for key, default in fallback.items()}
        return dataclasses.replace(self, **values)


@config_class
class SteerConfig:
    """Settings of ``perfit-probe steer``."""

    experiments: Items[Experiment] = get_args(Experiment)
    """Which checks to run (default: all)."""
    alphas: Items[float] = tuple(i / 4 for i in range(13))
    """Scales of the personal edit for the dose response (0, 0.25, ..., 3)."""
    max_pairs: int = 60
    """At most this many (donor, recipient) pairs in the swap (a seeded sample of all pairs)."""
    ablate_energy: float = 0.9
    """Share of the personal edits' squared norm the ablated subspace holds."""
    ablate_max_k: int = 16
    """Largest ablated subspace."""
    ablate_mode: AblateMode = "hidden"
    """``hidden`` (project out of the edited hidden state) or ``edit`` (out of the edit only)."""
    n_random_subspaces: int = 50
    """Random subspaces of the ablation's control distribution (the demo keeps 50: with
    single-token labels they share the prompt prefix and cost about 3 ordinary passes)."""
    n_boot: int = 2000
    """Bootstrap resamples of the users (swap: recipients; dose: test users)."""
    n_perm: int = 10000
    """Sign patterns / donor permutations of the swap tests (exact over all 2^n_recipients
    sign patterns when that is <= n_perm)."""
    level: float = 0.95
    """Coverage of the intervals."""
    rows_per_pass: int = 64
    """Rows of one forward pass when variants share a prompt prefix (each row copies its
    prompt's key/value cache)."""
    decoding: Decoding = "auto"
    """Decoding of the metric rows (see ``perfit_probe.evaluation.evaluate``)."""
    chat: bool | None = None
    """Wrap prompts in the chat template (None: when the tokenizer has one)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    max_new_tokens: int = 16
    """Tokens generated by greedy decoding."""
    max_prompt_tokens: int | None = None
    """Longer prompts keep their last tokens (None: no limit)."""
    seed: int = 0
    """Seed of pair sampling, the random subspace and the random bank."""

    def __post_init__(self) -> None:
        if not self.experiments:
            raise ConfigError(f"give at least one experiment among {', '.join(get_args(Experiment))}")
        if not 0 < self.ablate_energy <= 1:
            raise ConfigError(f"ablate_energy={self.ablate_energy} must be in (0, 1]")
        if self.n_random_subspaces < 1 or self.n_boot < 1 or self.n_perm < 1 or self.rows_per_pass < 1:
            raise ConfigError(f"n_random_subspaces={self.n_random_subspaces}, n_boot={self.n_boot}, "
                              f"n_perm={self.n_perm} and rows_per_pass={self.rows_per_pass} must be >= 1")
        if not 0 < self.level < 1:
            raise ConfigError(f"level={self.level} must be between 0 and 1")
        if not self.alphas:
            raise ConfigError("alphas must hold at least one scale")
        small = {name: getattr(self, name) for name in ("max_pairs", "ablate_max_k", "batch_size", "max_new_tokens")
                 if getattr(self, name) < 1}
        if small:
            raise ConfigError(f"{', '.join(f'{k}={v}' for k, v in small.items())}: must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1 (or None)")


@config_class
class InterpretConfig:
    """Settings of ``perfit-probe interpret``."""

    sites: Items[str] | None = None
    """Sites to study (None: the fit's sites that the cache measured)."""
    alphas: Items[float] = (0.0, 0.5, 1.0, 2.0)
    """Scales of the added delta vectors (0 is the unsteered plain prompt)."""
    methods: Items[SteerMethod] = get_args(SteerMethod)
    """Steering vectors (default: all)."""
    subspace_dim: int = 4
    """Top centred principal directions of the deltas (the delta subspace)."""
    n_null: int = 200
    """Random subspaces in the principal-angle null."""
    n_boot: int = 1000
    """Bootstrap resamples of users for the KL intervals."""
    level: float = 0.95
    """Coverage of the bootstrap intervals."""
    n_tokens: int = 10
    """Promoted and demoted tokens listed per direction."""
    n_pcs: int = 2
    """Personal principal directions read with the logit lens."""
    max_queries_per_user: Annotated[int | None, arg(aliases=("--max-queries",))] = None
    """Held-out queries per test user in the steering and monitoring (None: all)."""
    seed: int = 0
    """Seed of the derangement, the random vectors, the null and the bootstrap."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError(f"give at least one steering method among {get_args(SteerMethod)}")
        if not self.alphas:
            raise ConfigError("give at least one alpha")
        if self.subspace_dim < 1 or self.n_null < 1 or self.n_boot < 1:
            raise ConfigError("subspace_dim, n_null and n_boot must be >= 1")
        if not 0 < self.level < 1:
            raise ConfigError(f"level={self.level} must lie in (0, 1)")


@config_class
class PerFitSpace:
    """Choices of PerFit's search (``perfit-probe tune``)."""

    lrs: Items[float] = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
    """Learning rates (``lr1`` in stage 1, ``lr2`` in stage 2)."""
    epochs: Items[int] = (1, 2, 3)
    """Epochs (``epochs1``, ``epochs2``)."""
    collective_ranks: Items[int] = (4, 8, 16)
    """Ranks of the stage-1 intervention."""
    personal_ranks: Items[int] = (2, 4, 8)
    """Ranks of each user's stage-2 intervention (with ``personal_init = "stage1"``: the chosen
    collective rank)."""
    layer_sets: Items[str] | None = None
    """Sets of edited layers, each a ``+``-joined list (``8+14``; negative counts from the end);
    None: the fit's ``layers`` and sets at 27/47%, 17/37% and 47/67% of the model's depth."""
    positions: Items[str] = ("l1", "l2", "f1+l2")
    """Position specs (LoReFT grammar)."""

    def layer_tuples(self) -> tuple[tuple[int, ...], ...] | None:
        """``layer_sets`` as tuples of layers (``ConfigError`` for a malformed set)."""
        if self.layer_sets is None:
            return None
        try:
            return tuple(tuple(int(x) for x in text.split("+") if x.strip()) for text in self.layer_sets)
        except ValueError:
            raise ConfigError(f"layer sets {list(self.layer_sets)}: write each as layers joined by '+', "
                              "e.g. 8+14") from None


@config_class
class LoraSpace:
    """Choices of the LoRA baselines' search (task LoRA and per-user LoRA alike)."""

    lrs: Items[float] = (1e-4, 3e-4, 1e-3, 3e-3)
    """Learning rates."""
    epochs: Items[int] = (1, 2, 3)
    """Epochs."""
    ranks: Items[int] = (4, 8, 16)
    """LoRA ranks (``alpha`` keeps the base config's ``alpha / rank``)."""


@config_class
class TuneConfig:
    """Settings of ``perfit-probe tune`` besides the base ``FitConfig`` (what is not searched)."""

    n_trials: Annotated[int, arg(aliases=("--trials",))] = 8
    """Trials per stage of each searched method (the same budget for all)."""
    searches: Items[Search] = get_args(Search)
    """Methods searched (default: both)."""
    perfit: PerFitSpace = field(default_factory=PerFitSpace)
    """PerFit's choices."""
    lora: LoraSpace = field(default_factory=LoraSpace)
    """The LoRA baselines' choices."""
    stage1_val_queries: int = 2
    """Queries held out of each train user (a seeded choice, at most all but one) to score the
    stage-1 trials; stage 2 is scored on each test user's ``val_per_user`` validation rows."""
    select_by: SelectBy = "metric"
    """``metric``: the best task metric, ties broken by the lower validation loss; ``loss``: the
    lowest validation loss, ties broken by the better metric."""
    sampler_seed: int | None = None
    """Seed of the draw of the trials (None: the fit's ``seed``)."""
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    """How trials are scored (decoding, batch size, prompt length) and the LoRA baselines' base
    settings (``lora``, ``lora_task``: what is not searched); also the evaluation of ``--apply``."""

    def validate(self) -> None:
        """Checks that need no model: budget, methods, every choice list non-empty and valid."""
        if self.n_trials < 1:
            raise ConfigError(f"n_trials={self.n_trials} must be >= 1")
        if not self.searches:
            raise ConfigError(f"give at least one search among {', '.join(get_args(Search))}")
        if self.stage1_val_queries < 1:
            raise ConfigError(f"stage1_val_queries={self.stage1_val_queries} must be >= 1")
        p, q = self.perfit, self.lora
        for name, values in (("perfit.lrs", p.lrs), ("perfit.epochs", p.epochs),
                             ("perfit.collective_ranks", p.collective_ranks),
                             ("perfit.personal_ranks", p.personal_ranks), ("perfit.positions", p.positions),
                             ("lora.lrs", q.lrs), ("lora.epochs", q.epochs), ("lora.ranks", q.ranks)):
            if not values:
                raise ConfigError(f"the search space's {name} is empty: give at least one value")
        sets = p.layer_tuples()
        if sets is not None and (not sets or not all(sets)):
            raise ConfigError("the search space's perfit.layer_sets is empty or holds an empty set: "
                              "give sets of layers such as 8+14,6+12")
        if not all(lr > 0 for lr in (*p.lrs, *q.lrs)):
            raise ConfigError("learning rates of the search space must be positive")
        if min(*p.epochs, *q.epochs) < 1 or min(*p.collective_ranks, *p.personal_ranks, *q.ranks) < 1:
            raise ConfigError("epochs and ranks of the search space must be >= 1")
        for spec in p.positions:
            parse_positions(spec)

    def check_model(self, d_model: int, n_layers: int) -> None:
        """Ranks at most ``d_model`` and layers inside the model (``ConfigError``)."""
        ranks = (*self.perfit.collective_ranks, *self.perfit.personal_ranks, *self.lora.ranks)
        if max(ranks) > d_model:
            raise ConfigError(f"rank {max(ranks)} of the search space is larger than the model's d_model={d_model}")
        out = [layer for s in self.perfit.layer_tuples() or () for layer in s if not -n_layers <= layer < n_layers]
        if out:
            raise ConfigError(f"layer {out[0]} of the search space is outside the model's {n_layers} layers")


# ----------------------------------------------------------------------------------------
# The capability check

Verdict = Literal["learns", "partial", "no gain"]
"""Verdicts of the capability check (``perfit_probe.evaluation.capability``)."""


DEMO_FIT_RECIPE: dict[str, Any] = {
    "positions": "l2", "collective_rank": 8, "personal_rank": 4, "epochs1": 2, "epochs2": 2, "batch_size": 8,
    "max_prompt_tokens": 160, "val_per_user": 3, "max_profile_examples": 12}
"""The demo's PerFit recipe besides its layers and data sizes (learning rates: ``FitConfig``'s
defaults); ``perfit_probe.pipeline.demo_config`` and ``demo_fit`` both read it."""

FIT_DATA_FIELDS = frozenset({"task", "task_path", "task_outputs", "n_users", "max_queries", "seed", "model", "dtype",
                             "device", "n_test_users", "test_fraction", "test_users_by", "n_heldout"})
"""``FitConfig`` fields that say which model, data and users a fit uses; the others are its recipe
(what the capability check tests and a run's claims match it by)."""

DEMO_FIT_DEPTHS = (0.27, 0.47)
"""The demo's intervention layers as fractions of the model's depth (layers 8 and 14 of 30)."""


def demo_fit_layers(n_layers: int) -> tuple[int, ...]:
    """The demo's intervention layers for a model of ``n_layers`` layers."""
    return tuple(sorted({min(n_layers - 1, int(n_layers * f)) for f in DEMO_FIT_DEPTHS}))


def demo_fit(n_layers: int = 30) -> FitConfig:
    """The demo's PerFit recipe (``DEMO_FIT_RECIPE`` at ``demo_fit_layers``), without its data sizes."""
    return FitConfig(layers=demo_fit_layers(n_layers), **DEMO_FIT_RECIPE)


@config_class
class CapabilityConfig:
    """The capability check: the planted task's size, the PerFit recipe under test, the verdict's thresholds."""

    n_train_users: int = 5
    """Users whose queries train stage 1 (their constants cover 1..5 when a multiple of 5)."""
    n_test_users: int = 10
    """Users who get a personal stage and are evaluated."""
    n_history: int = 12
    """Rated movies per user that are not queries: a test user's personal training data."""
    n_queries: int = 6
    """Queries per user: stage 1's data (train users), the evaluated queries (test users)."""
    p_off: float = 0.1
    """Chance that a rating is one step off the user's constant (``perfit_probe.data.planted``; at most 0.5)."""
    fit: FitConfig = field(default_factory=demo_fit)
    """The PerFit recipe under test (default: the demo's); its task, user and held-out options are unused."""
    margin: float = 0.15
    """``learns`` needs PerFit's MAE at most the realised noise floor + this."""
    min_recovered: float = 0.8
    """``learns`` needs at least this share of the test users' constants recovered."""
    alpha: float = 0.05
    """Level of the permutation test of PerFit against stage 1."""
    batch_size: int = 16
    """Prompts per forward pass when predicting."""
    seed: int = 0
    """Seed of the task and of the bootstrap."""

    def __post_init__(self) -> None:
        if self.n_train_users < 1 or self.n_test_users < 1 or self.n_history < 1 or self.n_queries < 1:
            raise ConfigError(f"need n_train_users, n_test_users, n_history and n_queries >= 1 (got "
                              f"{self.n_train_users}, {self.n_test_users}, {self.n_history}, {self.n_queries})")
        if not (0 <= self.p_off <= 0.5 and self.margin >= 0 and 0 < self.min_recovered <= 1 and 0 < self.alpha < 1):
            raise ConfigError(f"p_off={self.p_off} must be in [0, 0.5], margin={self.margin} >= 0, "
                              f"min_recovered={self.min_recovered} in (0, 1], alpha={self.alpha} in (0, 1)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")

    def validate(self) -> None:
        """The fit's checks, and a personal stage that trains on the profile."""
        if self.fit.personal_data != "profile":
            raise ConfigError("the capability check trains the personal stage on the profile "
                              "(fit.personal_data='profile')")
        self.fit.validate()


# ----------------------------------------------------------------------------------------
# The pipeline

STAGE_CONFIGS: dict[str, type] = {"cache": CacheConfig, "analyze": AnalysisConfig, "fit": FitConfig,
                                  "evaluate": EvalConfig, "steer": SteerConfig, "interpret": InterpretConfig}
"""The config class of each stage (its table in a pipeline file)."""


@config_class
class PipelineConfig:
    """A full pipeline run: the shared model and task, the stages to run and each stage's
    resolved config. Build one with ``pipeline_config`` (or ``load_pipeline_config``), which
    passes ``[model]`` and ``[task]`` on to the stages."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model every stage uses (``[model]``)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task (``[task]``): its values reach the stages that load it (cache, fit), its prompt
    options the evaluation, its seed every stage."""
    stages: Items[Stage] = STAGES
    """Which stages to run (in pipeline order)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The cache stage (``[cache]``: ``CacheConfig`` fields)."""
    analyze: AnalysisConfig = field(default_factory=AnalysisConfig)
    """The shift analysis (``[analyze]``: ``AnalysisConfig`` fields)."""
    fit: FitConfig = field(default_factory=FitConfig)
    """The PerFit fit (``[fit]``: ``FitConfig`` fields)."""
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    """The evaluation (``[evaluate]``: ``EvalConfig`` fields, ``[evaluate.lora]`` ...)."""
    steer: SteerConfig = field(default_factory=SteerConfig)
    """The causal steering checks (``[steer]``: ``SteerConfig`` fields)."""
    interpret: InterpretConfig = field(default_factory=InterpretConfig)
    """Steering with the measured shifts and read-outs (``[interpret]``: ``InterpretConfig`` fields)."""
    capability: PathValue | None = None
    """A capability check's ``capability.json`` (``analyses/capability.py``): the claims quote its
    verdict for the run's fit recipe when one of its recipes is it (top-level ``capability = PATH``)."""


def _shared(stage: str, model: ModelConfig, task: TaskConfig, task_table: Mapping) -> dict:
    """The ``[model]``/``[task]`` values a stage's config takes before its own table: the task,
    model and prompts for cache and fit; the prompt options ``[task]`` sets for evaluate (its
    own defaults defer to the fit's); the seed for every stage."""
    if stage in ("cache", "fit"):
        fields = {f.name for f in dataclasses.fields(UserSample) + dataclasses.fields(PromptConfig)}
        return {"task": task.name, "task_path": task.path, "task_outputs": task.outputs,
                "model": model.name, "dtype": model.dtype, "device": model.device,
                **{name: getattr(task, name) for name in fields}}
    if stage == "evaluate":
        prompts = {f.name for f in dataclasses.fields(PromptConfig)}
        return {"seed": task.seed, **{name: getattr(task, name) for name in prompts if name in task_table}}
    return {"seed": task.seed}


def pipeline_config(tables: Mapping[str, Any], source: str = "") -> PipelineConfig:
    """A ``PipelineConfig`` from TOML-shaped tables (``model``, ``task``, ``stages`` and one
    table per stage), validated strictly; ``source`` prefixes error messages (a file name)."""
    known = [f.name for f in dataclasses.fields(PipelineConfig)]
    unknown = sorted(set(tables) - set(known))
    if unknown:
        raise ConfigError(f"{source}unknown section(s) {unknown}; known: {sorted(known)}")
    stages = tables.get("stages", STAGES)
    if isinstance(stages, str) or not isinstance(stages, (list, tuple)):
        raise ConfigError(f"{source}stages must be a list of stage names such as {list(STAGES[:2])}, "
                          f"got {type(stages).__name__} {stages!r}")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"{source}unknown stage(s) {bad}: choose from {list(STAGES)}")
    for name in ("model", "task", *STAGE_CONFIGS):
        if not isinstance(tables.get(name, {}), Mapping):
            raise ConfigError(f"{source}[{name}] must be a table, got {type(tables[name]).__name__}")
    model = validate_table(ModelConfig, tables.get("model", {}), f"{source}[model]")
    task = validate_table(TaskConfig, tables.get("task", {}), f"{source}[task]")
    resolved = {}
    for stage, cls in STAGE_CONFIGS.items():
        own = dict(tables.get(stage, {}))
        names = {f.name for f in dataclasses.fields(cls)}
        _check_keys(cls, own, f"{source}[{stage}]")
        shared = {k: v for k, v in _shared(stage, model, task, tables.get("task", {})).items() if k in names}
        resolved[stage] = validate_table(cls, {**shared, **own}, f"{source}[{stage}]")
    capability = tables.get("capability")
    if capability is not None and not isinstance(capability, str):
        raise ConfigError(f"{source}capability must be a path (a string), got {type(capability).__name__}")
    return PipelineConfig(model=model, task=task, stages=tuple(stages), capability=capability, **resolved)


def load_pipeline_config(path: Path | str) -> PipelineConfig:
    """Read a pipeline TOML file (``pipeline_config``); unknown sections and keys are refused."""
    path = Path(path)
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    return pipeline_config(tables, source=f"{path}: ")


def stage_configs(config: PipelineConfig) -> dict[str, Any]:
    """The resolved config of every stage, by stage name."""
    return {stage: getattr(config, stage) for stage in STAGE_CONFIGS}


def seed_config(config: PipelineConfig, seed: int) -> PipelineConfig:
    """A copy of ``config`` whose task and every stage run with ``seed`` (a stage's own seed is
    replaced too, so one number sets them all)."""
    stages = {stage: dataclasses.replace(value, seed=seed) for stage, value in stage_configs(config).items()}
    return dataclasses.replace(config, task=dataclasses.replace(config.task, seed=seed), **stages)


# ----------------------------------------------------------------------------------------
# Validation and its messages


def _check_keys(cls: type, values: Mapping[str, Any], where: str) -> None:
    """``ConfigError`` naming the keys of ``values`` that are not fields of ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        allowed = f"allowed: {names}" if len(names) <= 12 else f"see the fields of {cls.__name__}"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; {allowed}")


def validate_table(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls`` from a TOML table, by the same strict rules as its constructor (read as JSON, so
    that a list is a tuple and a string a path); ``ConfigError`` naming ``where`` and the key
    when a key is unknown or a value wrong."""
    _check_keys(cls, values, where)
    try:
        text = json.dumps(dict(values), default=str)
        return TypeAdapter(cls).validate_json(text, strict=True)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where)) from None
    except PerfitError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_EXPECTED = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "list": "a list", "tuple": "a list", "dataclass": "a table", "dict": "a table", "model": "a table",
    "path": "a path (string)", "none": "nothing",
}
"""What an error type (before ``_type``/``_parsing``/...) expects, in a config file's words."""


def _expected(error: dict) -> str:
    kind = error["type"]
    if kind == "literal_error":
        return "one of " + error.get("ctx", {}).get("expected", "the listed choices")
    for prefix, words in _EXPECTED.items():
        if kind.startswith(prefix):
            return words
    return error["msg"].removeprefix("Input should be ")


def _where(loc: tuple) -> str:
    """A pydantic location as a key path (``lora.lr``, ``alphas[0]``); union member tags dropped."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "none"):
            text += f".{part}" if text else part
    return text


def describe_errors(exc: ValidationError, where: str) -> str:
    """One line for a pydantic ``ValidationError``: the first wrong key (a union's alternatives
    joined), what was expected and what was given."""
    errors = exc.errors()
    extra = [e for e in errors if e["type"] in ("extra_forbidden", "unexpected_keyword_argument")]
    if extra:
        keys = sorted({_where(e["loc"]) for e in extra})
        return f"{where}: unknown key(s) {keys}"
    first = _where(errors[0]["loc"])
    same = [e for e in errors if _where(e["loc"]) == first]
    expected = " or ".join(dict.fromkeys(_expected(e) for e in same))
    given = errors[0].get("input")
    more = len({_where(e["loc"]) for e in errors}) - 1
    text = f"{where} {first}: expected {expected}, got {type(given).__name__} {given!r}"
    return text + (f" (and {more} more wrong value(s))" if more else "")
