"""The typed schema of a run: YAML plus ``key.path=value`` overrides, validated by pydantic.

A run is a model, a tokenizer, a mesh and a chain of stages. Each stage kind is its own
class and accepts only its own fields. Every error is one line: an unknown key names
itself and the nearest valid key, a wrong type names the key and the expected type, a
missing file names the path, and cross-field problems (an adapter that does not fit the
stage kind, a loss option its loss ignores, a stage named before it exists, a NaN) are
caught here, before anything is computed.

    python -m sacpo_jax.train --config configs/demo.yaml stages.dpo_h.beta=0.2 seed=1

Override paths use dots; a list element is addressed by index (``stages.2.beta``) or,
for stages, by name (``stages.dpo_h.beta``). Values are parsed as YAML (``0.1``,
``[0.01, 0.05]``, ``true``, ``null``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sacpo_jax.data.adapters import ADAPTERS, PAIR, SCORE_PAIR, SFT, UNPAIRED
from sacpo_jax.data.spec import DataSpec, SourceSpec
from sacpo_jax.data.tokenize import BUNDLED_TOKENIZER
from sacpo_jax.errors import SacpoError
from sacpo_jax.losses import DISCOPOP_TAU, PAIR_LOSSES
from sacpo_jax.models import lora, peft_io, quant
from sacpo_jax.models.formats import detect
from sacpo_jax.models.hf import is_hub_id

INITIAL = "initial"
"""The name of the run's first model (``model:``) in the chain."""


class ConfigError(SacpoError, ValueError):
    """An invalid configuration; the message is one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MeshConfig(Strict):
    """Device mesh sizes; one axis may be -1 ("the rest of the devices")."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


class RandomModelConfig(Strict):
    """Architecture of a randomly initialised LLaMA (vocab_size: the tokenizer's)."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    head_dim: int | None = None
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)


class ModelConfig(Strict):
    """Where the first model comes from: ``path`` (a model directory or hub id "owner/name",
    in any format of ``sacpo_jax.models.formats``) or ``random``. ``format`` forces the
    format (default: told from the files); ``llama_config`` is the architecture of formats
    that store none (EasyLM, MaxText): a config.json path or an EasyLM name ("7b").
    ``quantize``: store the frozen projection weights of every model of the run in nf4 or
    int8 (QLoRA; every training stage then needs a ``lora`` block)."""

    format: Literal["auto", "safetensors", "flax_msgpack", "easylm", "maxtext"] = "auto"
    path: str | None = None
    llama_config: str | None = None
    random: RandomModelConfig | None = None
    dtype: Literal["float32", "bfloat16"] | None = None
    compute_dtype: Literal["float32", "bfloat16"] | None = None
    remat: bool = False
    scan_layers: bool = True
    quantize: Literal["nf4", "int8"] | None = None

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is not None and not is_hub_id(path):
            detect(path, info.data.get("format"))
        return path

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.random is None):
            raise ValueError("set exactly one of model.path and model.random")
        r = self.random
        if self.quantize is not None and r is not None:
            head_dim = r.head_dim or r.hidden_size // r.num_attention_heads
            inputs = {
                "hidden_size": r.hidden_size,
                "intermediate_size": r.intermediate_size,
                "num_attention_heads x head_dim": r.num_attention_heads * head_dim,
            }
            for name, rows in inputs.items():
                quant.check_rows(self.quantize, rows, f"model.random {name}")
        return self


class TokenizerConfig(Strict):
    """``path``: a tokenizer directory, ``bundled:oracle``, or null for model.path."""

    path: str | None = None
    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path in (None, BUNDLED_TOKENIZER) or is_hub_id(path):
            return path
        if not os.path.exists(path):
            raise ValueError(f"tokenizer path {path} does not exist")
        return path


class TrainConfig(Strict):
    """Optimisation of one stage (REFERENCE §2 defaults where they exist).

    ``adam_dtype``: dtype of Adam's two moments; null keeps the parameters' dtype.
    ``float32`` with ``model.dtype: bfloat16`` stores 12 bytes per parameter (bf16
    weights and gradients, float32 moments) instead of 8.
    ``max_checkpoints``: training checkpoints kept while the stage runs (the newest);
    ``keep_checkpoints``: keep them after the stage finished and exported (by default they
    are deleted then: the export is the stage's result).
    """

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    adam_dtype: Literal["float32"] | None = None
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int = Field(100, gt=0)
    max_checkpoints: int = Field(2, gt=0)
    keep_checkpoints: bool = False
    eval_batch_size: int | None = Field(None, gt=0)
    export_msgpack: bool = False  # also write flax_model.msgpack (transformers 4.x Flax)


class LoraSpec(Strict):
    """LoRA on a training stage: only the adapters train (REFERENCE-NEXT §3). ``targets``
    are PEFT's module names; the defaults are the CAID paper's (r 8, alpha 16, dropout
    0.05) on all seven projections. ``rslora``: scaling alpha / sqrt(rank)."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(lora.TARGETS), min_length=1)
    rslora: bool = False

    @field_validator("targets")
    @classmethod
    def _known(cls, targets: list[str]) -> list[str]:
        for target in targets:
            if target not in lora.TARGETS:
                raise ValueError(
                    f"'{target}' matches no projection; valid: {', '.join(lora.TARGETS)}"
                )
        return targets

    def settings(self) -> lora.LoraConfig:
        """The model-level LoRA settings (targets as our projection names)."""
        chosen = {lora.TARGETS[t] for t in self.targets}
        return lora.LoraConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=tuple(name for name in lora.PEFT_MODULES if name in chosen),
            rslora=self.rslora,
        )


class AdapterStart(Strict):
    """A start made of a base model (an earlier stage, a model directory or a hub id) and a
    PEFT LoRA adapter directory, merged into the base before the stage begins."""

    base: str
    adapter: str

    @field_validator("adapter")
    @classmethod
    def _readable(cls, adapter: str) -> str:
        peft_io.read_adapter_config(adapter)
        return adapter


# ----------------------------------------------------------------------------- stages

_ROWS = {
    PAIR: "pairs",
    SCORE_PAIR: "scored pairs",
    UNPAIRED: "unpaired labelled rows",
    SFT: "prompt-response rows",
}


class StageBase(Strict):
    """A named step of the chain. ``yields_policy``: its result is a causal LM (so an
    evaluate stage with ``models: all`` generates with it)."""

    name: str
    yields_policy: ClassVar[bool] = True

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or name.startswith(".") or any(c in name for c in "/\\ "):
            raise ValueError(
                f"stage name {name!r} must be non-empty, not start with '.', and have no "
                "'/', '\\' or spaces"
            )
        return name

    def sources(self) -> list[str]:
        """Names (stages, directories or hub ids) of the models this stage reads."""
        return []

    def swept(self) -> tuple[str, list[float]] | None:
        """(field, values) when the stage fans out into one stage per value."""
        return None

    def resolve(self, previous: str | None, earlier: list[StageBase]) -> StageBase:
        """This stage with chain-relative names made concrete (``previous``: the last
        model-producing stage before it, None right after a sweep)."""
        return self

    def prompt_set(self) -> tuple[PromptSet, bool] | None:
        """The prompts the stage generates on, and whether the bundled oracle scores them."""
        return None


class StartedStage(StageBase):
    """A stage that starts from a model: ``start`` is "previous", an earlier stage, an HF
    directory, or {base, adapter}: a PEFT adapter on a base."""

    start: str | AdapterStart = "previous"

    @field_validator("start", mode="before")
    @classmethod
    def _start(cls, start: Any) -> Any:
        """A mapping is an {base, adapter} start (errors as one line, not per union member)."""
        if not isinstance(start, dict):
            return start
        try:
            return AdapterStart.model_validate(start)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None

    @property
    def trains_full_model(self) -> bool:
        """Every weight of the start is trained (no LoRA adapters)."""
        return True

    def start_sources(self) -> list[str]:
        """The names the start reads: one model, or a base and an adapter directory."""
        if isinstance(self.start, AdapterStart):
            return [self.start.base, self.start.adapter]
        return [self.start]

    def sources(self) -> list[str]:
        return self.start_sources()

    def resolve(self, previous: str | None, earlier: list[StageBase]) -> StartedStage:
        if self.start != "previous":
            return self
        if previous is None:
            raise ValueError(
                f"stage '{self.name}' follows a sweep: name its start explicitly (one of the "
                "swept stages, e.g. start: NAME@beta=0.1)"
            )
        return self.model_copy(update={"start": previous})


class TrainedStage(StartedStage):
    """A stage that trains from its start on ``data``, whose adapter must make one of
    ``batch_kinds``. ``lora``: train LoRA adapters on the frozen start (absent: full
    fine-tuning); the stage's result is the start with the adapters merged."""

    train: TrainConfig = TrainConfig()
    data: DataSpec
    lora: LoraSpec | None = None
    batch_kinds: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _adapters_fit(self) -> TrainedStage:
        for key in ("data", "eval_data"):
            spec = getattr(self, key, None)
            if spec is not None and ADAPTERS[spec.adapter].kind not in self.batch_kinds:
                kind = type(self).model_fields["kind"].annotation.__args__[0]
                wanted = " or ".join(_ROWS[k] for k in self.batch_kinds)
                raise ValueError(
                    f"{key}.adapter '{spec.adapter}' does not make {wanted}, which a {kind} "
                    f"stage trains on (it makes {_ROWS[ADAPTERS[spec.adapter].kind]})"
                )
        return self

    @property
    def trains_full_model(self) -> bool:
        return self.lora is None

    @property
    def interleave_labels(self) -> bool:
        """Training batches alternate desirable and undesirable rows (KTO's "interleave")."""
        return False


class SupervisedStage(TrainedStage):
    """A trained stage with one objective and an optional held-out ``eval_data``."""

    eval_data: DataSpec | None = None


class SftStage(SupervisedStage):
    """Supervised fine-tuning on {prompt, response}: mean NLL per completion token."""

    kind: Literal["sft"]
    batch_kinds: ClassVar[tuple[str, ...]] = (SFT,)


class RewardStage(SupervisedStage):
    """A reward model (Bradley-Terry on better/worse pairs). ``start``: "previous" (a
    causal LM whose backbone gets a new score head), an earlier stage or an HF directory."""

    kind: Literal["reward"]
    batch_kinds: ClassVar[tuple[str, ...]] = (PAIR, SCORE_PAIR)
    yields_policy: ClassVar[bool] = False


class CostStage(SupervisedStage):
    """A cost model: safe-rlhf's cost loss on safer/unsafer pairs with safety signs
    (the ``pku_cost`` adapter)."""

    kind: Literal["cost"]
    batch_kinds: ClassVar[tuple[str, ...]] = (SCORE_PAIR,)
    yields_policy: ClassVar[bool] = False


class ReferencedStage(SupervisedStage):
    """Training against a frozen reference.

    ``reference``: "start" (the stage's own starting model: SACPO's realignment), an
    earlier stage's name, or an HF directory. ``beta`` may be a list: the stage fans out
    into one run per value (a beta/lambda sweep), each from the same start.
    ``reference_mode``: "precompute" (one pass before training, cached; only the policy
    is in memory while training) or "on_the_fly" (a frozen copy scores every batch; with
    LoRA and reference "start", the policy's own frozen base with its adapters off).
    """

    reference: str = "start"
    beta: float | list[float] = 0.1
    reference_mode: Literal["precompute", "on_the_fly"] = "precompute"

    @field_validator("beta")
    @classmethod
    def _positive(cls, beta: float | list[float]) -> float | list[float]:
        values = beta if isinstance(beta, list) else [beta]
        if not values or any(b <= 0 for b in values):
            raise ValueError("beta must be > 0 (or a non-empty list of values > 0)")
        return beta

    def sources(self) -> list[str]:
        return self.start_sources() + ([] if self.reference == "start" else [self.reference])

    def swept(self) -> tuple[str, list[float]] | None:
        return ("beta", self.beta) if isinstance(self.beta, list) else None


class DpoStage(ReferencedStage):
    """DPO family: TRL's ``loss_type`` names (keys of ``losses.PAIR_LOSSES``).

    ``loss_type`` may be a list, combined as TRL combines it: sum_k w_k * mean(loss_k)
    with ``loss_weights`` w (default all 1). ``label_smoothing``: eps of cDPO (sigmoid),
    robust, exo_pair (> 0 required) and aot; ``discopop_tau``: DiscoPOP's temperature.
    ``rpo_alpha``: TRL's older name for RPO, an added "sft" term of weight rpo_alpha
    (sigmoid + sft); 0 = none.
    """

    kind: Literal["dpo"]
    batch_kinds: ClassVar[tuple[str, ...]] = (PAIR, SCORE_PAIR)
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    discopop_tau: float = Field(DISCOPOP_TAU, gt=0)
    rpo_alpha: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _loss_options(self) -> DpoStage:
        types = self.loss_types
        unknown = [t for t in types if t not in PAIR_LOSSES]
        if not types or unknown:
            raise ValueError(
                f"loss_type: unknown {unknown[0] if unknown else '[]'!r}; valid: "
                f"{', '.join(PAIR_LOSSES)}"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights: {len(self.loss_weights)} weights for {len(types)} loss types "
                f"({', '.join(types)}); give one weight per loss type"
            )
        losses = [PAIR_LOSSES[t] for t in types]
        if self.label_smoothing and not any(loss.uses_label_smoothing for loss in losses):
            raise ValueError(
                f"label_smoothing {self.label_smoothing} is ignored by loss_type "
                f"'{', '.join(types)}'; set it to 0 or use a loss that smooths labels"
            )
        if not self.label_smoothing and any(loss.requires_label_smoothing for loss in losses):
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper: 1e-3)")
        if "discopop_tau" in self.model_fields_set and "discopop" not in types:
            raise ValueError("discopop_tau is read only by loss_type 'discopop'")
        if self.rpo_alpha and "sft" in types:
            raise ValueError(
                "rpo_alpha adds an 'sft' term and loss_type already has one: give its weight "
                "in loss_weights instead"
            )
        return self

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def loss_terms(self) -> list[tuple[str, float]]:
        """(loss type, weight) pairs of the objective, rpo_alpha as an "sft" term."""
        weights = self.loss_weights or [1.0] * len(self.loss_types)
        terms = list(zip(self.loss_types, weights, strict=True))
        return terms + ([("sft", self.rpo_alpha)] if self.rpo_alpha else [])


SAFEDPO_MARGIN = 5.0
"""Our default SafeDPO Delta (the paper's default was not available to us). Delta is the
penalty, in implicit-reward units (beta x log-ratio), that an unsafe answer pays: a pair
whose rejected answer is unsafe must be won by beta d > Delta before its gradient fades,
i.e. the safe answer is preferred with Bradley-Terry probability sigmoid(5) = 0.993 even
when the unsafe one was more helpful; at the start (beta d = 0) such a pair has gradient
weight 0.993 against 0.5 for a safe-safe pair. On the bundled task (README) Delta in
{0, 1, 2, 3, 5, 10} all gave >= 94% harmless answers and 5 and 10 the most helpful ones;
5 stays clear of the very large margins that push log-probs of whole answers far down."""


class SafeDpoStage(ReferencedStage):
    """SafeDPO (Kim et al. 2025): -log sigmoid(beta d - (h_r - h_c) * safety_margin) on
    helpfulness pairs reordered by safety (h = 1: unsafe; the ``pku_safedpo`` adapter).
    ``safety_margin``: Delta; 0 is DPO on the reordered, filtered pairs."""

    kind: Literal["safedpo"]
    batch_kinds: ClassVar[tuple[str, ...]] = (PAIR,)
    safety_margin: float = Field(SAFEDPO_MARGIN, ge=0)

    @model_validator(mode="after")
    def _safety_labelled(self) -> SafeDpoStage:
        for key in ("data", "eval_data"):
            spec = getattr(self, key)
            if spec is not None and not ADAPTERS[spec.adapter].safety_labels:
                labelled = [name for name, a in ADAPTERS.items() if a.safety_labels]
                raise ValueError(
                    f"a safedpo stage needs safety-labelled pairs: {key}.adapter "
                    f"'{spec.adapter}' has no safety labels; use {' or '.join(labelled)}"
                )
        return self


class KtoStage(ReferencedStage):
    """KTO with ``desirable_weight`` / ``undesirable_weight`` (``balanced`` =
    n_desirable / n_undesirable, SACPO's KTO(S)).

    ``sampling``: "shuffle" (every row once per epoch) or "interleave", the batches of
    the TRL versions SACPO used: desirable and undesirable rows alternate, the smaller
    class repeated until the larger one is used up, so an epoch is 2 max(n_d, n_u) rows
    and each batch is half desirable.
    """

    kind: Literal["kto"]
    batch_kinds: ClassVar[tuple[str, ...]] = (UNPAIRED,)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float | Literal["balanced"] = 1.0
    sampling: Literal["shuffle", "interleave"] = "shuffle"

    @field_validator("undesirable_weight")
    @classmethod
    def _positive_weight(cls, weight: float | str) -> float | str:
        if not isinstance(weight, str) and weight <= 0:
            raise ValueError("undesirable_weight must be > 0 or 'balanced'")
        return weight

    @property
    def interleave_labels(self) -> bool:
        return self.sampling == "interleave"


class SimpoStage(SupervisedStage):
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta (avg_c - avg_r) - gamma)
    on token-averaged policy log-probs, plus ``cpo_alpha`` x the chosen NLL (TRL's CPO
    trainer; 0 = pure SimPO). No reference model is run. Defaults are the SimPO authors'
    (beta 2.0, simpo_gamma = 0.25 beta); TRL's CPOTrainer defaults are beta 0.1,
    cpo_alpha 1.0. ``label_smoothing``: eps of the smoothed sigmoid, as in TRL."""

    kind: Literal["simpo"]
    batch_kinds: ClassVar[tuple[str, ...]] = (PAIR, SCORE_PAIR)
    beta: float = Field(2.0, gt=0)
    simpo_gamma: float = Field(0.5, ge=0)
    cpo_alpha: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class OrpoStage(SupervisedStage):
    """ORPO (Hong et al. 2024), reference-free: NLL(chosen) - beta * log sigmoid(log odds
    ratio of the token-averaged log-probs); ``beta`` is the paper's lambda (TRL's name and
    default 0.1). No reference model is run."""

    kind: Literal["orpo"]
    batch_kinds: ClassVar[tuple[str, ...]] = (PAIR, SCORE_PAIR)
    beta: float = Field(0.1, gt=0)


class MergeStage(StageBase):
    """P-SACPO: theta = sum_i w_i theta_i over ``models`` (stage names or HF directories).

    Two models take ``q`` (theta = (1-q) theta_0 + q theta_1); a list of q values fans
    out into one merge per value (name@q=...). More models take ``weights``.
    """

    kind: Literal["merge"]
    models: list[str] = Field(min_length=2)
    q: float | list[float] | None = None
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights(self) -> MergeStage:
        if (self.q is None) == (self.weights is None):
            raise ValueError("set exactly one of q (two models) and weights")
        if self.q is not None:
            if len(self.models) != 2:
                raise ValueError("q merges exactly two models; use weights for more")
            values = self.q if isinstance(self.q, list) else [self.q]
            if not values or any(not 0.0 <= q <= 1.0 for q in values):
                raise ValueError("q must lie in [0, 1]")
        elif len(self.weights) != len(self.models) or abs(sum(self.weights) - 1) > 1e-6:
            raise ValueError("weights: one per model, summing to 1")
        return self

    def sources(self) -> list[str]:
        return list(self.models)

    def swept(self) -> tuple[str, list[float]] | None:
        return ("q", self.q) if isinstance(self.q, list) else None


class EvalSettings(Strict):
    """Generation and rating settings of an evaluation (the paper: greedy, 512 tokens).

    ``template`` "auto": the tokenizer's chat template if it has one, else the PKU
    template; ``stop`` "auto": EOS ids only under the chat template, else the paper's
    stop strings (sacpo_jax.data.prompts, sacpo_jax.generate.resolve_stop).
    """

    template: str | None = "auto"
    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0)

    @field_validator("template")
    @classmethod
    def _has_prompt(cls, template: str | None) -> str | None:
        if template is not None and "{prompt}" not in template:
            raise ValueError("template must contain '{prompt}'")
        return template

    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    stop: str | list[str] | None = "auto"
    elo_trials: int = Field(50, gt=0)


class PromptSet(Strict):
    """Prompts to generate on: any data source; rows need ``field`` (and may have category).

    SACPO's prompt sets (../shared/data/sacpo_eval/*.json) are JSON lists of
    {prompt, category}: ``source: {type: json, path: .../safety_problem.json}``.
    """

    source: SourceSpec
    field: str = "prompt"
    limit: int | None = Field(None, gt=0)


class JudgeConfig(Strict):
    """A pairwise LLM judge behind an OpenAI-compatible endpoint (``sacpo_jax.judge``).

    ``protocol``: "sacpo", the SACPO paper's (each response scored, helpfulness 1-10 or
    harmlessness 0-10, both orders, 3 calls each at temperature 0.7), or "verdict"
    ([[A]] / [[B]] / [[C]], a win when both orders agree); ``repeats``, ``temperature``
    and ``max_tokens`` default to the protocol's. ``criteria``: what is judged (the
    paper: helpfulness on the helpful prompts, harmlessness on the red-team prompts).
    ``api_key_env``: the environment variable holding the key (the key is never stored).
    ``timeout`` (s per call), ``max_retries`` and ``workers`` (calls in flight) do not
    change the results.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    protocol: Literal["sacpo", "verdict"] = "sacpo"
    criteria: list[Literal["helpfulness", "harmlessness"]] = Field(
        default_factory=lambda: ["helpfulness", "harmlessness"], min_length=1
    )
    repeats: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, gt=0)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    workers: int = Field(4, gt=0)


class EvaluateStage(StageBase):
    """Generate with ``models`` ("all": every earlier language-model stage), score, compare.

    Scorers: the bundled ``oracle`` and/or ``reward_model`` / ``cost_model`` (stage
    names or HF directories), and/or a pairwise LLM ``judge``. ``baseline``: the model
    for win rates and the Elo anchor (with a judge: the model each other is judged
    against; without one every pair is judged).
    """

    kind: Literal["evaluate"]
    yields_policy: ClassVar[bool] = False
    models: list[str] | Literal["all"] = "all"
    prompts: PromptSet
    settings: EvalSettings = EvalSettings()
    oracle: bool = False
    reward_model: str | None = None
    cost_model: str | None = None
    baseline: str | None = None
    judge: JudgeConfig | None = None

    @model_validator(mode="after")
    def _has_scorer(self) -> EvaluateStage:
        if not (self.oracle or self.reward_model or self.cost_model or self.judge):
            raise ValueError("an evaluate stage needs oracle: true, a reward/cost model or a judge")
        return self

    def sources(self) -> list[str]:
        models = [] if self.models == "all" else list(self.models)
        return models + [m for m in (self.reward_model, self.cost_model) if m]

    def prompt_set(self) -> tuple[PromptSet, bool]:
        return self.prompts, self.oracle

    def resolve(self, previous: str | None, earlier: list[StageBase]) -> EvaluateStage:
        stage = self
        if self.models == "all":
            names = [stage.name for stage in earlier if stage.yields_policy]
            stage = self.model_copy(update={"models": names})
        if stage.judge is not None and len(stage.models) < 2:
            raise ValueError(f"stage '{stage.name}': a judge compares two or more models")
        return stage


class CaidConstraint(Strict):
    """One constraint of CAID: E_pi[g] - E_ref[g] >= threshold (relative) or E_pi[g] >= threshold.

    ``model``: MoCAID, a cost model (stage name, HF directory or hub id) or ``oracle``
    (the bundled task's cost), with g = -cost; PeCAID, a DPO policy aligned on this
    constraint's preference, with g = beta * log(pi_g / pi_ref), ``beta`` that policy's
    own (taken from its stage when it is one of the chain's DPO/KTO stages).
    """

    model: str
    threshold: float
    beta: float | None = Field(None, gt=0)


class CaidSampling(Strict):
    """The dual step's samples: each prompt answered ``responses_per_prompt`` times by the
    current policy (the paper: 600 training prompts x 64 responses, temperature 1, top_p
    0.9, up to 512 tokens). ``stop``: none by default (samples of the policy, ended only
    by EOS or the length; a stop list such as "sacpo" cuts them). ``prompts_per_step``:
    draw that many distinct prompts of the set at random for each dual step (seeded by
    the run's seed and the iteration); null uses every prompt every step."""

    responses_per_prompt: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(512, gt=0)
    template: str | None = "auto"  # as EvalSettings.template
    stop: str | list[str] | None = None  # as EvalSettings.stop
    batch_size: int = Field(64, gt=0)
    prompts_per_step: int | None = Field(None, gt=0)


ORACLE = "oracle"
"""CAID's name for the bundled task's oracle as a reward or constraint model."""


class CaidStage(TrainedStage):
    """CAID (REFERENCE §3): ``iterations`` rounds of a policy step (DPO on
    pseudo-preferences, from the current iterate against ``start``, which is pi_ref) and
    a dual step on the host, from the samples of the iterate it produced.

    ``data``: the fixed pairs (x, y0, y1) to pseudo-label (a pair adapter; the order of
    y0, y1 is not a preference). ``reward``: MoCAID, a reward model or ``oracle``;
    PeCAID, a DPO policy aligned on helpfulness (``reward_beta``: its own beta, taken
    from its stage when it is one of the chain's). ``prompts``: the prompt set the dual
    step samples (the paper: training prompts). ``train``: each policy step's
    optimisation (``epochs`` per iteration).

    The multipliers: ``lambda_init`` (null: the one-shot dual optimum on pi_ref's
    samples); ``first_step_lambda``: "init" takes the first policy step at lambda_init
    (following the one-shot solution exactly), "updated" first takes a dual step on
    pi_ref's own samples (the printed algorithm's order: with relative thresholds
    u_0 = -b, so the first step uses lambda_init + eta * b). Then
    lam <- max(0, lam - eta_t u) with eta_t = ``dual_lr`` / (t + 1) ** ``dual_lr_decay``
    for the t-th update (0: a constant step; 0.5 or 1 damp later steps).

    The stage's model (``output_iterate``): "feasible_reward", the feasible iterate with
    the highest estimated reward (pi_ref included; none feasible: the least violating);
    "dual_value", the paper's rule, the iterate whose multiplier has the lowest estimated
    dual value D(lam) = E[r] + lam . u - beta KL. ``feasibility_se``: an iterate counts
    as feasible when u + k * se >= 0 for every constraint (k = 0: the estimate itself;
    k = 2 accepts a violation within two standard errors, k < 0 is not allowed).
    """

    kind: Literal["caid"]
    batch_kinds: ClassVar[tuple[str, ...]] = (PAIR,)
    method: Literal["mocaid", "pecaid"] = "mocaid"
    reward: str
    reward_beta: float | None = Field(None, gt=0)
    constraints: list[CaidConstraint] = Field(min_length=1)
    relative_thresholds: bool = True
    prompts: PromptSet
    sampling: CaidSampling = CaidSampling()
    iterations: int = Field(4, gt=0)
    beta: float = Field(0.1, gt=0)
    dual_lr: float = Field(1.0, gt=0)
    dual_lr_decay: float = Field(0.0, ge=0)
    lambda_init: float | list[float] | None = None
    first_step_lambda: Literal["init", "updated"] = "init"
    output_iterate: Literal["feasible_reward", "dual_value"] = "feasible_reward"
    feasibility_se: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> CaidStage:
        if self.method == "pecaid" and ORACLE in self.models:
            raise ValueError("pecaid scores with DPO policies; 'oracle' is for mocaid")
        if self.method == "mocaid" and any(b is not None for b in self.model_betas):
            raise ValueError("reward_beta and constraints.*.beta are for pecaid's DPO policies")
        init = self.lambda_init
        values = init if isinstance(init, list) else [] if init is None else [init]
        if isinstance(init, list) and len(init) != len(self.constraints):
            raise ValueError(f"lambda_init: one value per constraint ({len(self.constraints)})")
        if any(v < 0 for v in values):
            raise ValueError("lambda_init must be >= 0")
        return self

    @property
    def models(self) -> list[str]:
        """The scoring models the stage reads, in order: reward, constraints."""
        return [self.reward] + [c.model for c in self.constraints]

    @property
    def model_betas(self) -> list[float | None]:
        """PeCAID: the beta of each scoring model, in the order of ``models``."""
        return [self.reward_beta] + [c.beta for c in self.constraints]

    def sources(self) -> list[str]:
        return self.start_sources() + [m for m in self.models if m != ORACLE]

    def prompt_set(self) -> tuple[PromptSet, bool]:
        return self.prompts, ORACLE in self.models

    def resolve(self, previous: str | None, earlier: list[StageBase]) -> CaidStage:
        stage = super().resolve(previous, earlier)
        if stage.method != "pecaid":
            return stage
        trained = {s.name: s.beta for s in earlier if isinstance(s, ReferencedStage)}
        betas = [
            beta if beta is not None else trained.get(name)
            for name, beta in zip(stage.models, stage.model_betas)
        ]
        for name, beta in zip(stage.models, betas):
            if beta is None:
                raise ValueError(
                    f"stage '{stage.name}': pecaid needs the beta that '{name}' was aligned "
                    "with (reward_beta or constraints.N.beta); only a DPO/KTO stage of the "
                    "chain supplies its own"
                )
        constraints = [
            c.model_copy(update={"beta": b}) for c, b in zip(stage.constraints, betas[1:])
        ]
        return stage.model_copy(update={"reward_beta": betas[0], "constraints": constraints})


class RolloutSettings(Strict):
    """How each round of an on-policy stage samples from the current policy (safe-rlhf
    and TRL: temperature 1, top_p 1; generation stops at EOS).

    ``prompts_per_round``: prompts answered per round (safe-rlhf: the per-device prompt
    batch times the devices); prompts longer than ``max_prompt_length`` tokens are left
    out (counted); ``batch_size``: rows per generation or scoring call; ``template`` as
    ``EvalSettings.template``.
    """

    prompts_per_round: int = Field(64, gt=0)
    max_new_tokens: int = Field(512, gt=0)
    max_prompt_length: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    template: str | None = "auto"
    batch_size: int = Field(64, gt=0)


class OnPolicyTrain(TrainConfig):
    """The policy's optimisation in an on-policy stage: ``batch_size`` responses per
    update, ``epochs`` passes over the prompts (unless the stage sets ``rounds``);
    ``adam_betas`` (safe-rlhf: 0.9, 0.95)."""

    adam_betas: tuple[float, float] = (0.9, 0.999)

    @model_validator(mode="after")
    def _counted_in_rounds(self) -> OnPolicyTrain:
        if self.max_steps is not None or self.eval_every is not None:
            raise ValueError(
                "max_steps and eval_every do not apply to on-policy stages: set the stage's "
                "rounds (each round samples, then updates)"
            )
        return self


class CriticTrain(Strict):
    """The critics' optimisation (safe-rlhf: lr 5e-6, no weight decay, constant after a
    3% warmup, Adam betas 0.9, 0.95); batches follow the policy's."""

    learning_rate: float = Field(5e-6, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    adam_betas: tuple[float, float] = (0.9, 0.999)


class OnPolicyStage(StartedStage):
    """An on-policy Lagrangian stage: rounds of sampling from the current policy, scoring
    and clipped policy updates, under E[cost] <= ``threshold`` with safe-rlhf's multiplier
    (``sacpo_jax.algorithms.lagrangian``: ``lambda_init``, ``lambda_lr``, ``lambda_max``,
    ``episode_cost_window``; lambda_init 0 keeps lambda at 0: unconstrained).

    ``reward_model`` / ``cost_model``: score models (a stage, an HF directory or hub id,
    e.g. PKU-Alignment/beaver-7b-v1.0-reward / -cost) or ``oracle`` (the bundled task's
    reward and cost). ``prompts``: the training prompts, visited in a seeded order.
    ``rounds``: default ``train.epochs`` passes over the prompts. ``update_epochs``: passes
    over each round's samples (PPO epochs). The reference is the frozen start model.
    ``lora``: train LoRA adapters (and, for PPO, the critics' adapters and heads) on frozen
    starts; the reference reads the policy's frozen base; absent: full fine-tuning.
    """

    train: OnPolicyTrain = OnPolicyTrain()
    lora: LoraSpec | None = None
    prompts: PromptSet
    reward_model: str
    cost_model: str
    rollout: RolloutSettings = RolloutSettings()
    rounds: int | None = Field(None, gt=0)
    update_epochs: int = Field(1, gt=0)
    threshold: float = 0.0
    lambda_init: float = Field(1.0, ge=0)
    lambda_lr: float = Field(0.1, ge=0)
    lambda_max: float | None = Field(5.0, gt=0)
    episode_cost_window: int = Field(128, gt=0)

    @field_validator("lora")
    @classmethod
    def _no_dropout(cls, spec: LoraSpec | None) -> LoraSpec | None:
        """No LoRA dropout (default 0 here): the clipped ratio pi / pi_old must be 1 at the
        policy that sampled the round, and dropout in the update alone would break that."""
        if spec is None:
            return spec
        if "dropout" not in spec.model_fields_set:
            return spec.model_copy(update={"dropout": 0.0})
        if spec.dropout:
            raise ValueError(
                f"lora.dropout {spec.dropout}: on-policy stages train without dropout (the "
                "ratio pi / pi_old must be 1 at the sampling policy); set it to 0 or leave it out"
            )
        return spec

    @property
    def trains_full_model(self) -> bool:
        return self.lora is None

    @property
    def samples_per_prompt(self) -> int:
        return 1

    @property
    def rows_per_round(self) -> int:
        return self.rollout.prompts_per_round * self.samples_per_prompt

    @model_validator(mode="after")
    def _consistent(self) -> OnPolicyStage:
        if self.lambda_max is not None and self.lambda_max < self.lambda_init:
            raise ValueError(
                f"lambda_max {self.lambda_max} is below lambda_init {self.lambda_init}"
            )
        if self.rows_per_round % self.train.batch_size:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} does not divide the "
                f"{self.rows_per_round} responses of a round"
            )
        return self

    @property
    def score_models(self) -> list[str]:
        """The reward and cost models, in that order."""
        return [self.reward_model, self.cost_model]

    def sources(self) -> list[str]:
        return self.start_sources() + self.named_models()

    def named_models(self) -> list[str]:
        """The models the stage reads besides its start (score models that are not the
        oracle; the PPO critics' starts)."""
        return [m for m in self.score_models if m != ORACLE]

    def prompt_set(self) -> tuple[PromptSet, bool]:
        return self.prompts, ORACLE in self.score_models


class PpoLagrangianStage(OnPolicyStage):
    """Safe RLHF's PPO-Lagrangian (REFERENCE-NEXT §1; safe-rlhf's argument names): a KL
    penalty to the reference (``kl_coeff``) shaped into the per-token reward and cost,
    reward and cost critics (value heads, from ``reward_critic`` / ``cost_critic`` or by
    default the reward / cost model; the policy's backbone with a zero head for the
    oracle), GAE (``gamma``, ``gae_lambda``), the clipped actor loss on
    (A_r - lam A_c) / (1 + lam) and clipped critic losses; scores clipped to
    +-``clip_range_score``. ``critic_train``: the critics' optimiser."""

    kind: Literal["ppo_lagrangian"]
    kl_coeff: float = Field(0.02, ge=0)
    clip_range_ratio: float = Field(0.2, gt=0)
    clip_range_value: float = Field(5.0, gt=0)
    clip_range_score: float = Field(50.0, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    reward_critic: str | None = None
    cost_critic: str | None = None
    critic_train: CriticTrain = CriticTrain()

    def named_models(self) -> list[str]:
        critics = [c for c in (self.reward_critic, self.cost_critic) if c is not None]
        return super().named_models() + critics


class GrpoLagrangianStage(OnPolicyStage):
    """A critic-free Lagrangian: ``group_size`` samples per prompt, reward and cost each
    standardised within the group (TRL's GRPO advantage), combined as
    (Z_r - lam Z_c) / (1 + lam), GRPO's clipped objective (``epsilon``, ``epsilon_high``:
    default epsilon) with ``beta`` times the k3 KL estimate to the reference per token."""

    kind: Literal["grpo_lagrangian"]
    group_size: int = Field(8, gt=1)
    beta: float = Field(0.04, ge=0)
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size


STAGE_TYPES = (SftStage, DpoStage, KtoStage, RewardStage, CostStage, MergeStage, EvaluateStage)
STAGE_TYPES += (CaidStage, SafeDpoStage, SimpoStage, OrpoStage)
STAGE_TYPES += (PpoLagrangianStage, GrpoLagrangianStage)
Stage = Annotated[
    SftStage
    | DpoStage
    | SafeDpoStage
    | SimpoStage
    | OrpoStage
    | KtoStage
    | RewardStage
    | CostStage
    | MergeStage
    | EvaluateStage
    | CaidStage
    | PpoLagrangianStage
    | GrpoLagrangianStage,
    Field(discriminator="kind"),
]
_STAGE_BY_KIND = {cls.model_fields["kind"].annotation.__args__[0]: cls for cls in STAGE_TYPES}


def sweep_name(name: str, key: str, value: float) -> str:
    return f"{name}@{key}={value:g}"


def expand_stages(stages: list[StageBase]) -> list[StageBase]:
    """The chain as it runs: one stage per swept value (beta lists: name@beta=b, merge q
    lists: name@q=q), starts and "all" resolved.

    Swept training stages keep the original start (resolved to a concrete name) so all
    of them start from the same model; a later "previous" after a sweep is ambiguous.
    """
    expanded: list[StageBase] = []
    previous: str | None = INITIAL
    for stage in stages:
        stage = stage.resolve(previous, expanded)
        swept = stage.swept()
        if swept is None:
            expanded.append(stage)
            if stage.yields_policy or isinstance(stage, TrainedStage):
                previous = stage.name
            continue
        key, values = swept
        expanded += [
            stage.model_copy(update={"name": sweep_name(stage.name, key, value), key: value})
            for value in values
        ]
        previous = None
    return expanded


class RunConfig(Strict):
    """A run. ``on_change``: what a rerun does with a stage whose settings, inputs or data
    changed since its results were written: run it again (its old results move to
    ``superseded/``) or refuse with one line."""

    name: str = "run"
    run_dir: str | None = None
    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    model: ModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    stages: list[Stage]
    tensorboard: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True
    on_change: Literal["retrain", "refuse"] = "retrain"

    @model_validator(mode="after")
    def _chain(self) -> RunConfig:
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique: {', '.join(duplicates)}")
        if self.tokenizer.path is None and self.model.path is None:
            raise ValueError("tokenizer.path is needed when the model is random")
        if self.model.quantize is not None:
            for stage in self.stages:
                if isinstance(stage, StartedStage) and stage.trains_full_model:
                    raise ValueError(
                        f"model.quantize is {self.model.quantize}, but stage '{stage.name}' "
                        "trains the full model: a quantized base is frozen; give the stage "
                        "a lora block"
                    )
        _check_sources(expand_stages(self.stages))
        return self

    @property
    def directory(self) -> Path:
        return Path(self.run_dir or os.path.join("runs", self.name))

    def expanded_stages(self) -> list[StageBase]:
        return expand_stages(self.stages)


def _check_sources(stages: list[StageBase]) -> None:
    """Every model a stage reads is an earlier stage, a model directory or a hub id."""
    available = {INITIAL}
    for stage in stages:
        for source in stage.sources():
            if source not in available and not os.path.exists(source) and not is_hub_id(source):
                raise ValueError(
                    f"stage '{stage.name}' names '{source}', which is neither an earlier stage, "
                    "a model directory or file nor a hub id"
                )
        if isinstance(stage, EvaluateStage) and stage.baseline not in (None, *stage.models):
            raise ValueError(
                f"stage '{stage.name}': baseline '{stage.baseline}' is not among its models "
                f"{stage.models}"
            )
        if not isinstance(stage, EvaluateStage):
            available.add(stage.name)


# ----------------------------------------------------------------------------- loading


def apply_override(tree: dict, assignment: str) -> None:
    """Set ``a.b.2.c=value`` in a nested dict/list tree (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    path, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {path}: invalid YAML value {raw!r} ({_first_line(e)})"
        ) from None
    keys = path.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key, path)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"override {path}: {'.'.join(keys[:i])} is not a mapping or list")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _list_index(node: list, key: str, path: str) -> int:
    if key.lstrip("-").isdigit():
        index = int(key)
        if not -len(node) <= index < len(node):
            raise ConfigError(f"override {path}: index {key} out of range")
        return index
    for index, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    raise ConfigError(f"override {path}: no list element named {key!r}")


def _location(loc: tuple) -> str:
    """'stages.1.beta' from pydantic's location, without union-member tags."""
    return ".".join(str(p) for p in loc if not _is_union_tag(p))


def _is_union_tag(part: Any) -> bool:
    if not isinstance(part, str):
        return False
    return part in _STAGE_BY_KIND or "[" in part or part in ("float", "int", "str", "bool")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the location ``loc`` (for key suggestions)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int) or (_is_union_tag(part) and part not in _STAGE_BY_KIND):
            continue
        if isinstance(part, str) and part in _STAGE_BY_KIND:
            model = _STAGE_BY_KIND[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _field_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field_model(annotation: Any) -> Any:
    for candidate in getattr(annotation, "__args__", ()) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        nested = _field_model(candidate) if getattr(candidate, "__args__", None) else None
        if nested is not None:
            return nested
    return annotation if isinstance(annotation, type) else None


def _one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc = tuple(first["loc"])
    where = _location(loc) or "<top level>"
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc)
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{source}: unknown key '{where}'{hint}"
    message = " ".join(first["msg"].removeprefix("Value error, ").split())
    if first["type"] == "missing":
        return f"{source}: missing required key '{where}'"
    return f"{source}: {where}: {message} (got {first.get('input')!r})"[:2000]


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (or start empty), apply overrides, validate; ConfigError on any problem."""
    tree: dict = {}
    source = path or "<overrides>"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found")
        try:
            with open(path, encoding="utf-8") as f:
                tree = yaml.safe_load(f) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({_first_line(e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source)) from None
