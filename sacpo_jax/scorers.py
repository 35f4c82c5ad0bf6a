"""Scorers: one value per (prompt, response), for evaluation and for CAID.

A scorer scores text (generated samples) with ``on_samples`` and the fixed tokenised
pairs of CAID's policy step with ``on_pairs`` (slot 0 = y0, slot 1 = y1, scored on
their own tokens so that they match training exactly). ``name`` is the quantity
("reward" or "cost" in evaluation tables); ``sign`` multiplies every value (CAID's
safety utility is g = -cost: ``sign=-1``).

- ``OracleScorer``: the bundled task's ground-truth reward or cost; pairs are decoded
  back to text, which the oracle reads exactly (word-level tokenizer).
- ``ScoreModelScorer``: a reward or cost model's score at the last real token.
- ``LogRatioScorer``: beta * [log pi(y|x) - log pi_ref(y|x)] with a DPO policy
  pre-aligned on one preference (PeCAID's r and g).
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
from jax.sharding import Mesh

from sacpo_jax import parallel
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.loader import BatchLoader
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.logprobs import pair_logps
from sacpo_jax.models.llama import Llama
from sacpo_jax.scoring import score_responses, sequence_logprobs

REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")


@dataclasses.dataclass(frozen=True)
class PairSet:
    """Tokenised pairs (slot 0 = y0, slot 1 = y1), batched like an eval loader; for
    ``LogRatioScorer`` with pi_ref's log-probs in ``REFERENCE_COLUMNS``."""

    dataset: TokenizedDataset
    spec: DataSpec
    batch_size: int
    pad_id: int
    mesh: Mesh | None = None

    def map(self, score_batch) -> np.ndarray:
        """``score_batch(pair tokens) -> (b, ...)`` over every pair, in stored order."""
        loader = BatchLoader(
            self.dataset,
            global_batch_size=self.batch_size,
            buckets=self.spec.buckets(),
            pad_id=self.pad_id,
            shuffle=False,
            drop_remainder=False,
        )
        parts = []
        for _, batch in loader.iterate():
            tokens = {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}
            values = np.asarray(score_batch(tokens), np.float64)
            parts.append(values[batch["valid"].astype(bool)])
        return np.concatenate(parts)

    def jit(self, fn):
        """``fn`` jitted with its outputs replicated on the mesh (readable on every host)."""
        if self.mesh is None:
            return jax.jit(fn)
        return jax.jit(fn, out_shardings=parallel.replicated(self.mesh))


class Scorer(Protocol):
    name: str

    def on_samples(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """One value per (prompt, response), float64 (n,)."""

    def on_pairs(self, pairs: PairSet) -> np.ndarray:
        """Values of y0 and y1 for every pair, float64 (n, 2)."""


@dataclasses.dataclass(frozen=True)
class OracleScorer:
    """The bundled oracle's ``name``: "reward" (helpfulness) or "cost" (harm)."""

    name: str
    tokenizer: Any
    sign: float = 1.0

    def on_samples(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        from sacpo_jax.data.oracle_task import score_batch

        reward, cost = score_batch(list(prompts), list(responses))
        values = reward if self.name == "reward" else cost
        return self.sign * np.asarray(values, np.float64)

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
    """A reward or cost model's score, read at the last real token."""

    name: str
    model: Llama
    tokenizer: Any
    template: str | None
    sign: float = 1.0

    def on_samples(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        scores = score_responses(
            self.model, self.tokenizer, prompts, responses, template=self.template
        )
        return self.sign * scores.astype(np.float64)

    def on_pairs(self, pairs: PairSet) -> np.ndarray:
        graphdef, params = nnx.split(self.model)
        scores = pairs.jit(functools.partial(_pair_scores, graphdef))
        return self.sign * pairs.map(lambda batch: scores(params, batch))


def _pair_scores(graphdef: nnx.GraphDef, params, batch: dict) -> jax.Array:
    """(b, 2) scores of the chosen (y0) and rejected (y1) slots in one forward."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    scores = nnx.merge(graphdef, params)(ids, mask)
    return jnp.stack(jnp.split(scores, 2), axis=1)


@dataclasses.dataclass(frozen=True)
class LogRatioScorer:
    """beta * log(pi / pi_ref) of a pre-aligned DPO policy pi against ``reference``."""

    name: str
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
        """From the policy's log-probs of the pair tokens and pi_ref's stored columns."""
        graphdef, params = nnx.split(self.policy)
        logps = pairs.jit(functools.partial(_pair_logps, graphdef))
        policy = pairs.map(lambda batch: logps(params, batch))
        reference = np.stack([pairs.dataset.columns[n] for n in REFERENCE_COLUMNS], axis=1)
        return self.beta * (policy - reference)


def _pair_logps(graphdef: nnx.GraphDef, params, batch: dict) -> jax.Array:
    """(b, 2) completion log-probs of the chosen (y0) and rejected (y1) slots."""
    out = pair_logps(nnx.merge(graphdef, params), batch)
    return jnp.stack([out["chosen_logps"], out["rejected_logps"]], axis=1)
