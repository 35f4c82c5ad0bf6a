"""CAID's scores: the reward r and constraint utilities g, on samples and on the fixed pairs.

Samples (the dual step) are text: prompts and generated responses. The fixed pairs (the
policy step's pseudo-preferences) are a tokenised pair dataset, slot 0 = y0, slot 1 = y1,
scored on its own tokens so that they match training exactly. Scorers:

- ``OracleScorer``: the bundled task's oracle (r, or g = -cost); pairs are decoded back
  to text, which the oracle reads exactly (word-level tokenizer).
- ``ScoreModelScorer`` (MoCAID): a reward model, r = s(x, y), or a cost model,
  g = -c(x, y), read at the last real token.
- ``LogRatioScorer`` (PeCAID): beta * [log pi(y|x) - log pi_ref(y|x)] with a DPO policy
  pre-aligned on one preference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sacpo_jax import parallel
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.loader import BatchLoader
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.models.llama import Llama
from sacpo_jax.scoring import score_responses, sequence_logprobs
from sacpo_jax.training.runner import StageContext, TrainingError, add_reference_logps

ORACLE = "oracle"
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")


class CaidError(TrainingError):
    """A CAID stage that cannot run as configured (e.g. a causal LM named as a cost model,
    non-finite scores); one line. A TrainingError, so the CLI prints it without a traceback."""


@dataclasses.dataclass(frozen=True)
class PairSet:
    """The fixed pairs: tokens (slot 0 = y0, slot 1 = y1) with pi_ref's log-prob columns."""

    dataset: TokenizedDataset
    spec: DataSpec
    ctx: StageContext
    batch_size: int


class Scorer(Protocol):
    def on_samples(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """One value per (prompt, response), float64 (n,)."""

    def on_pairs(self, pairs: PairSet) -> np.ndarray:
        """Values of y0 and y1 for every pair, float64 (n, 2)."""


@dataclasses.dataclass(frozen=True)
class OracleScorer:
    """The bundled oracle's reward (``key="reward"``) or safety utility -cost (``"cost"``)."""

    key: str
    tokenizer: Any

    def on_samples(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        from sacpo_jax.data.oracle_task import score_batch

        reward, cost = score_batch(list(prompts), list(responses))
        return reward if self.key == "reward" else -cost

    def on_pairs(self, pairs: PairSet) -> np.ndarray:
        data, decode = pairs.dataset, self.tokenizer.decode
        prompts = [
            decode(data.prompts[i].tolist(), skip_special_tokens=True) for i in range(len(data))
        ]
        columns = []
        for slot in data.completions:
            responses = [
                decode(slot[i].tolist(), skip_special_tokens=True) for i in range(len(data))
            ]
            columns.append(self.on_samples(prompts, responses))
        return np.stack(columns, axis=1)


@dataclasses.dataclass(frozen=True)
class ScoreModelScorer:
    """A reward model (``sign=1``: r = s) or cost model (``sign=-1``: g = -c)."""

    model: Llama
    tokenizer: Any
    template: str | None
    sign: float

    def on_samples(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        scores = score_responses(
            self.model, self.tokenizer, prompts, responses, template=self.template
        )
        return self.sign * scores.astype(np.float64)

    def on_pairs(self, pairs: PairSet) -> np.ndarray:
        graphdef, params = nnx.split(self.model)
        mesh = pairs.ctx.mesh
        scores = jax.jit(
            functools.partial(_pair_scores, graphdef), out_shardings=parallel.replicated(mesh)
        )
        return self.sign * _over_pairs(pairs, lambda batch: scores(params, batch))


def _pair_scores(graphdef: nnx.GraphDef, params, batch: dict) -> jax.Array:
    """(b, 2) scores of the chosen (y0) and rejected (y1) slots in one forward."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    scores = nnx.merge(graphdef, params)(ids, mask)
    return jnp.stack(jnp.split(scores, 2), axis=1)


def _over_pairs(pairs: PairSet, score_batch) -> np.ndarray:
    """Every pair in stored order through ``score_batch`` (each process scores all pairs)."""
    loader = BatchLoader(
        pairs.dataset,
        global_batch_size=pairs.batch_size,
        buckets=pairs.spec.buckets(),
        pad_id=pairs.ctx.tokenizer.pad_token_id,
        shuffle=False,
        drop_remainder=False,
    )
    parts = []
    for _, batch in loader.iterate():
        tokens = {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}
        parts.append(np.asarray(score_batch(tokens), np.float64)[batch["valid"].astype(bool)])
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class LogRatioScorer:
    """beta * log(pi / pi_ref): PeCAID's reward or utility from a pre-aligned DPO policy."""

    policy: Llama
    reference: Llama
    tokenizer: Any
    template: str | None
    beta: float

    def on_samples(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        logps = [
            sequence_logprobs(model, self.tokenizer, prompts, responses, template=self.template)
            for model in (self.policy, self.reference)
        ]
        return self.beta * (logps[0].astype(np.float64) - logps[1])

    def on_pairs(self, pairs: PairSet) -> np.ndarray:
        bare = TokenizedDataset(
            pairs.dataset.kind, pairs.dataset.prompts, pairs.dataset.completions
        )
        policy = add_reference_logps(
            bare, pairs.spec, self.policy, "dpo", pairs.ctx, pairs.batch_size
        ).columns
        ratios = [
            np.asarray(policy[name], np.float64) - pairs.dataset.columns[name]
            for name in REFERENCE_COLUMNS
        ]
        return self.beta * np.stack(ratios, axis=1)


def build_scorer(
    name: str,
    models: dict[str, Llama],
    *,
    role: str,
    method: str,
    reference: Llama,
    tokenizer: Any,
    template: str | None,
    beta: float,
) -> Scorer:
    """The scorer of ``name`` for ``role`` "reward" or "constraint" under mocaid / pecaid."""
    if name == ORACLE:
        return OracleScorer("reward" if role == "reward" else "cost", tokenizer)
    model = models[name]
    if method == "pecaid":
        if model.config.score_model:
            raise CaidError(
                f"pecaid needs DPO policies, but '{name}' is a score model; use method: mocaid"
            )
        return LogRatioScorer(model, reference, tokenizer, template, beta)
    if not model.config.score_model:
        raise CaidError(
            f"mocaid needs a {'reward' if role == 'reward' else 'cost'} model, but '{name}' is "
            "a causal LM; use method: pecaid for DPO policies"
        )
    return ScoreModelScorer(model, tokenizer, template, 1.0 if role == "reward" else -1.0)
