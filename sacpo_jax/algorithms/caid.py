"""CAID: iterative dualization for constrained alignment (Zhang et al. 2025; REFERENCE §3).

    theta_0 = pi_ref;  lam_0 = lambda_init (default: the one-shot dual optimum on pi_ref's
                                samples, which iterate 0's dual step draws)
    first_step_lambda "updated": lam_0 <- max(0, lam_0 - eta_0 u_0)  (the printed order)
    for t = 0 .. T-1:
        policy step:  label the fixed pairs y1 > y0 ~ Bernoulli(sigmoid(w1 - w0)),
                      w = r + lam_t . g, then DPO epochs against pi_ref from theta_t
        dual step:    sample N prompts x M responses from pi_theta_{t+1} and score them;
                      u_{t+1} = mean g - (E_ref[g] + b)     (absolute thresholds: mean g - b)
                      lam_{t+1} = max(0, lam_t - eta_k * u_{t+1})

E_ref[g] is the mean utility of iterate 0's samples (theta_0 = pi_ref), so u_0 = -b under
relative thresholds. Each iterate's record (``caid_history.json``) holds its estimates
(reward, u, its standard error, KL to pi_ref), the multiplier it was trained under
(``policy_lambda``), its estimated dual value D(lam) = reward + lam . u - beta KL at that
multiplier, and ``lambda``, the multiplier after its dual step, which the next policy
step uses. Every iterate is kept: its model (``iterates/<t>/``, an HF export; iterate 0
is the stage's start), its samples (``samples/<t>.jsonl``), the metrics log and
``dual_trajectories.png``. The stage's model is chosen by ``output_iterate``
(``best_iterate``).

lam reaches the compiled DPO step only through the labels, i.e. as data: one train step,
compiled once, serves every iteration (``CaidRun.train_step``). Each policy step starts
a fresh optimiser state (its own warmup and cosine schedule) from the previous iterate.

LoRA (``stage.lora``): the policy is pi_ref plus adapters that carry over from one policy
step to the next; pi_ref's weights stay frozen (no optimiser state, no second copy) and
every iterate t also exports its adapters (``adapters/<t>/``, PEFT's format; ``adapter``
links the best one).

Resume: checkpoint meta holds (iteration, local step, history); a rerun continues inside
the policy step it was in, or with the next dual step. Samples, prompts and labels are
pure functions of (seed, iteration), so a resumed run repeats the same draws.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import numpy as np
from flax import nnx

from sacpo_jax import checkpoint, plots
from sacpo_jax.algorithms.dual import DualInputError, InfeasibleConstraintError, solve_dual
from sacpo_jax.algorithms.pseudo_labels import (
    PseudoLabelError,
    check_pair_scores,
    draw_second_preferred,
    second_preferred_probability,
)
from sacpo_jax.config import ORACLE, CaidStage
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.prompts import read_prompts
from sacpo_jax.generate import generate
from sacpo_jax.models.llama import Llama
from sacpo_jax.scorers import LogRatioScorer, OracleScorer, PairSet, ScoreModelScorer, Scorer
from sacpo_jax.scoring import sequence_logprobs
from sacpo_jax.training import objectives
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer, TrainingError, TrainingLoop
from sacpo_jax.training.optim import stage_optimizer
from sacpo_jax.training.reference import add_reference_columns
from sacpo_jax.training.stages import (
    ADAPTER_DIR,
    MODEL_DIR,
    export,
    export_adapter,
    is_finished,
    load_export,
    open_checkpoints,
    open_logger,
    report_disk_use,
    trainable_leaves,
    with_stage_adapters,
)
from sacpo_jax.training.state import TrainState, split_model


class CaidError(TrainingError):
    """A CAID stage that cannot run as configured (e.g. a causal LM named as a cost model,
    non-finite scores); one line."""


HISTORY_FILE = "caid_history.json"
ITERATES_DIR = "iterates"
ADAPTERS_DIR = "adapters"


# ----------------------------------------------------------------------------- dual math


def dual_update(
    lam: np.ndarray | list[float], u: np.ndarray | list[float], eta: float
) -> np.ndarray:
    """Projected subgradient step ``max(0, lam - eta * u)`` (u < 0: violated, lam grows)."""
    return np.maximum(0.0, np.asarray(lam, np.float64) - eta * np.asarray(u, np.float64))


def step_size(dual_lr: float, decay: float, k: int) -> float:
    """eta_k = dual_lr / (k + 1) ** decay for the k-th dual update (k = 0, 1, ...)."""
    return dual_lr / (k + 1) ** decay


def iterate_estimates(
    r: np.ndarray,
    g: np.ndarray,
    reference_utility: np.ndarray,
    thresholds: np.ndarray,
    *,
    relative: bool,
    se_margin: float = 0.0,
) -> dict:
    """Estimates of one iterate from its samples: r (n,), g (n, M).

    reward = mean r; utility = mean g; improvement = utility - E_ref[g];
    u = improvement - b (relative) or utility - b (absolute); se = std(g) / sqrt(n), the
    standard error of u (E_ref[g] taken as known); feasible = every u + se_margin * se >= 0.
    """
    utility = g.mean(axis=0)
    improvement = utility - reference_utility
    u = (improvement if relative else utility) - thresholds
    se = g.std(axis=0, ddof=1) / math.sqrt(len(g)) if len(g) > 1 else np.zeros_like(u)
    return {
        "reward": float(r.mean()),
        "utility": utility.tolist(),
        "improvement": improvement.tolist(),
        "u": u.tolist(),
        "u_se": se.tolist(),
        "feasible": bool(np.all(u + se_margin * se >= 0)),
    }


def dual_value(reward: float, lam: list[float], u: list[float], kl: float, beta: float) -> float:
    """The Lagrangian at an iterate trained under ``lam``, which estimates the dual function
    there: D(lam) = max_pi E[r] + lam . E[h] - beta KL(pi || pi_ref) ~ reward + lam . u
    - beta * kl (weak duality: every D(lam) bounds the constrained optimum from above)."""
    return float(reward + np.dot(lam, u) - beta * kl)


def best_iterate(history: list[dict], rule: str = "feasible_reward") -> int:
    """The iterate the stage outputs.

    "feasible_reward": the feasible iterate with the highest reward, else the one with the
    smallest total violation sum(max(0, -u)). "dual_value": among the trained iterates,
    the one with the lowest estimated dual value (the multiplier nearest the dual optimum).
    """
    if rule == "dual_value":
        trained = [i for i, record in enumerate(history) if "dual_value" in record]
        return min(trained, key=lambda i: history[i]["dual_value"])
    feasible = [i for i, record in enumerate(history) if record["feasible"]]
    if feasible:
        return max(feasible, key=lambda i: history[i]["reward"])
    violation = [float(np.sum(np.maximum(0.0, -np.asarray(r["u"])))) for r in history]
    return int(np.argmin(violation))


def round_seed(seed: int, iteration: int, purpose: int) -> int:
    """A 31-bit seed for (run seed, iteration, purpose: 0 sampling, 1 shuffling, 2 prompts)."""
    return int(np.random.SeedSequence([seed, iteration, purpose]).generate_state(1)[0] >> 1)


def draw_prompts(prompts: list[str], count: int | None, seed: int, iteration: int) -> list[str]:
    """``count`` distinct prompts drawn at random for one dual step (all when None)."""
    if count is None:
        return list(prompts)
    rng = np.random.default_rng(round_seed(seed, iteration, 2))
    return [prompts[i] for i in rng.choice(len(prompts), size=count, replace=False)]


# ----------------------------------------------------------------------------- the run


def run_caid(
    stage: CaidStage, reference: Llama, models: dict[str, Llama], ctx: StageContext
) -> Llama:
    """CAID from ``reference`` (pi_ref) with scorers from ``models`` (by name); returns the
    best iterate. A finished stage is loaded from its export."""
    if is_finished(ctx):
        return load_export(ctx, reference)
    return CaidRun(stage, reference, models, ctx).run()


class CaidRun:
    """One CAID stage: pairs, scorers, the policy steps' trainer, and the outer loop."""

    def __init__(
        self, stage: CaidStage, reference: Llama, models: dict[str, Llama], ctx: StageContext
    ):
        self.stage, self.reference, self.ctx = stage, reference, ctx
        self.thresholds = np.asarray([c.threshold for c in stage.constraints], np.float64)
        self.reward = self.scorer(stage.reward, stage.reward_beta, models, role="reward")
        self.constraints = [
            self.scorer(c.model, c.beta, models, role="constraint") for c in stage.constraints
        ]
        self.prompts = self.read_prompts()
        self.pairs = self.prepare_pairs()
        self.pair_r, self.pair_g = self.score_pairs()
        train = stage.train
        # lambda reaches the DPO step only through the labels (data): one compiled step.
        objective = objectives.dpo(
            "sigmoid", objectives.DpoCoefficients(train.learning_rate, stage.beta)
        )
        self.start_policy = with_stage_adapters(stage, reference, ctx.seed)
        graphdef, _ = split_model(self.start_policy)
        self.trainer = Trainer(
            objective,
            graphdef,
            self.start_policy.config,
            stage_optimizer(train, self.steps_per_iteration),
            ctx.mesh,
            grad_accum=train.grad_accum,
            trainable=trainable_leaves(stage, score_model=False),
            seed=ctx.seed,
        )
        self.loop = TrainingLoop(
            stage.name,
            self.trainer,
            train,
            ctx,
            open_checkpoints(ctx, train),
            open_logger(ctx, stage.name),
        )
        self.logger, self.checkpointer = self.loop.logger, self.loop.checkpointer

    def read_prompts(self) -> list[str]:
        """The distinct prompts of the stage's prompt set, in order."""
        p, wanted = self.stage.prompts, self.stage.sampling.prompts_per_step
        rows = read_prompts(p.source, p.field, p.limit)
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))
        if wanted is not None and wanted > len(prompts):
            raise CaidError(
                f"[{self.stage.name}] sampling.prompts_per_step {wanted} exceeds the "
                f"{len(prompts)} distinct prompts of the prompt set"
            )
        return prompts

    def scorer(
        self, name: str, beta: float | None, models: dict[str, Llama], *, role: str
    ) -> Scorer:
        """The reward or constraint scorer of ``name`` under mocaid / pecaid: r, and the
        utility g = -cost (MoCAID) or beta * log(pi_g / pi_ref) with the pre-aligned
        policy's own ``beta`` (PeCAID)."""
        stage, tokenizer, template = self.stage, self.ctx.tokenizer, self.stage.sampling.template
        reward = role == "reward"
        if name == ORACLE:
            return OracleScorer("reward" if reward else "cost", tokenizer, 1.0 if reward else -1.0)
        model = models[name]
        if stage.method == "pecaid":
            if model.config.score_model:
                raise CaidError(
                    f"pecaid needs DPO policies, but '{name}' is a score model; use method: mocaid"
                )
            return LogRatioScorer(role, model, self.reference, tokenizer, template, beta)
        if not model.config.score_model:
            raise CaidError(
                f"mocaid needs a {'reward' if reward else 'cost'} model, but '{name}' is "
                "a causal LM; use method: pecaid for DPO policies"
            )
        kind = "reward" if reward else "cost"
        return ScoreModelScorer(kind, model, tokenizer, template, 1.0 if reward else -1.0)

    def prepare_pairs(self) -> PairSet:
        """The tokenised pairs with pi_ref's log-probs (computed once, cached on disk)."""
        stage, ctx = self.stage, self.ctx
        dataset, skipped = build_dataset(stage.data, ctx.tokenizer, cache_dir=ctx.cache_dir)
        if skipped and jax.process_index() == 0:
            print(
                f"[{stage.name}] skipped pairs: "
                + ", ".join(f"{k}={v}" for k, v in skipped.items())
            )
        train = stage.train
        loader = ctx.loader(dataset, stage.data, train.batch_size, train=True)  # >= 1 batch
        self.steps_per_iteration = train.max_steps or max(
            1, math.ceil(train.epochs * loader.steps_per_epoch)
        )
        batch = train.eval_batch_size or train.batch_size
        dataset = add_reference_columns(
            dataset, stage.data, self.reference, objectives.PAIR_REFERENCE, ctx, batch
        )
        return PairSet(dataset, stage.data, batch, ctx.tokenizer.pad_token_id, ctx.mesh)

    def score_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """r (n, 2) and g (n, 2, M) of the fixed pairs, computed once."""
        r = self.reward.on_pairs(self.pairs)
        g = np.stack([c.on_pairs(self.pairs) for c in self.constraints], axis=-1)
        try:
            return check_pair_scores(r, g)
        except PseudoLabelError as e:
            raise CaidError(f"[{self.stage.name}] scores of the pairs: {e}") from None

    # -- state ------------------------------------------------------------------------

    def init_or_restore(self) -> tuple[TrainState, int, int, list[dict]]:
        """(state, iteration, local step, history): a fresh start or the latest checkpoint."""
        params = split_model(self.start_policy)[1]
        latest = self.checkpointer.latest_step()
        if latest is None:
            return self.trainer.fresh_state(params), 0, 0, []
        state, meta = self.trainer.restore(self.checkpointer, latest, params)
        if jax.process_index() == 0:
            where = f"iteration {meta['iteration']}, step {meta['local_step']}"
            print(f"[{self.stage.name}] resuming at {where}")
        return state, int(meta["iteration"]), int(meta["local_step"]), list(meta["history"])

    def policy(self, state: TrainState) -> Llama:
        return nnx.merge(self.trainer.graphdef, state.model_params())

    # -- loop -------------------------------------------------------------------------

    def run(self) -> Llama:
        with self.loop:
            state, first, first_step, history = self.init_or_restore()
            total = self.stage.iterations
            for t in range(first, total + 1):
                if len(history) == t:
                    history.append(self.dual_step(t, self.policy(state), history))
                if t == total:
                    break
                lam = np.asarray(history[t]["lambda"])
                state = self.policy_step(t, lam, state, first_step if t == first else 0, history)
                self.export_iterate(t + 1, self.policy(state))
                step = (t + 1) * self.steps_per_iteration
                meta = {"iteration": t + 1, "local_step": 0, "history": history}
                self.loop.save(step, state, meta, force=True)
            return self.finish(history)

    def export_iterate(self, t: int, policy: Llama) -> None:
        """``iterates/<t>/`` (the merged model) and, with LoRA, ``adapters/<t>/``."""
        msgpack = self.stage.train.export_msgpack
        export(policy, self.ctx, os.path.join(ITERATES_DIR, str(t)), msgpack=msgpack)
        if policy.config.lora is not None:
            export_adapter(policy, self.ctx, os.path.join(ADAPTERS_DIR, str(t)))

    # -- dual step --------------------------------------------------------------------

    def dual_step(self, t: int, policy: Llama, history: list[dict]) -> dict:
        """Sample iterate t, score it, record its estimates and the multiplier after it."""
        stage = self.stage
        prompts, responses = self.sample(policy, t)
        r = self.reward.on_samples(prompts, responses)
        g = np.stack([c.on_samples(prompts, responses) for c in self.constraints], axis=-1)
        reference_utility = g.mean(axis=0) if t == 0 else np.asarray(history[0]["utility"])
        record: dict = {"iteration": t}
        record.update(
            iterate_estimates(
                r,
                g,
                reference_utility,
                self.thresholds,
                relative=stage.relative_thresholds,
                se_margin=stage.feasibility_se,
            )
        )
        record["kl"] = 0.0 if t == 0 else self.kl(policy, prompts, responses)
        if t == 0:
            lam = np.asarray(self.initial_lambda(r, g))
            record["lambda_init"] = lam.tolist()
            if stage.first_step_lambda == "updated":
                lam = self.dual_step_from(lam, record, updates_before=0)
        else:
            trained = history[t - 1]["lambda"]
            record["policy_lambda"] = trained
            record["dual_value"] = dual_value(
                record["reward"], trained, record["u"], record["kl"], stage.beta
            )
            updates_before = t - 1 if stage.first_step_lambda == "init" else t
            lam = self.dual_step_from(np.asarray(trained), record, updates_before)
        record["lambda"] = lam.tolist()
        record["samples"] = len(r)
        self.write_samples(t, prompts, responses, r, g)
        self.log_dual(record)
        return record

    def dual_step_from(self, lam: np.ndarray, record: dict, updates_before: int) -> np.ndarray:
        """max(0, lam - eta_k u) with the record's u; records eta_k as ``step_size``."""
        eta = step_size(self.stage.dual_lr, self.stage.dual_lr_decay, updates_before)
        record["step_size"] = eta
        return dual_update(lam, record["u"], eta)

    def sample(self, policy: Llama, t: int) -> tuple[list[str], list[str]]:
        """Each of the step's prompts answered M times by ``policy``; prompts repeated to
        match."""
        s = self.stage.sampling
        drawn = draw_prompts(self.prompts, s.prompts_per_step, self.ctx.seed, t)
        prompts = [p for p in drawn for _ in range(s.responses_per_prompt)]
        responses = generate(
            policy,
            self.ctx.tokenizer,
            prompts,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=round_seed(self.ctx.seed, t, 0),
            template=s.template,
            stop=s.stop,
            batch_size=s.batch_size,
            mesh=self.ctx.mesh,
        )
        return prompts, responses

    def kl(self, policy: Llama, prompts: list[str], responses: list[str]) -> float:
        """KL(pi || pi_ref) estimated on the policy's own samples: mean of log pi(y|x) -
        log pi_ref(y|x) (sampled at top_p < 1, so an estimate of the truncated policy's)."""
        template = self.stage.sampling.template
        logps = [
            sequence_logprobs(model, self.ctx.tokenizer, prompts, responses, template=template)
            for model in (policy, self.reference)
        ]
        return float(np.mean(logps[0].astype(np.float64) - logps[1]))

    def initial_lambda(self, r: np.ndarray, g: np.ndarray) -> list[float]:
        """lambda_init from the config, or the one-shot dual optimum on pi_ref's samples."""
        count = len(self.thresholds)
        init = self.stage.lambda_init
        if init is not None:
            return list(init) if isinstance(init, list) else [float(init)] * count
        m = self.stage.sampling.responses_per_prompt
        try:
            solution = solve_dual(
                r.reshape(-1, m),
                g.reshape(-1, m, count),
                self.thresholds,
                self.stage.beta,
                relative=self.stage.relative_thresholds,
            )
        except (InfeasibleConstraintError, DualInputError) as e:
            raise CaidError(
                f"[{self.stage.name}] one-shot warm start: {e}; or set lambda_init"
            ) from None
        if jax.process_index() == 0:
            print(f"[{self.stage.name}] one-shot dual warm start: lambda = {solution.lam.tolist()}")
        return solution.lam.tolist()

    def write_samples(self, t, prompts, responses, r, g) -> None:
        if jax.process_index() != 0:
            return
        directory = os.path.join(self.ctx.stage_dir, "samples")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{t}.jsonl"), "w", encoding="utf-8") as f:
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                row = {
                    "prompt": prompt,
                    "response": response,
                    "reward": r[i],
                    "utility": g[i].tolist(),
                }
                f.write(json.dumps(row) + "\n")

    def log_dual(self, record: dict) -> None:
        t = record["iteration"]
        values = {"iteration": t, "reward": record["reward"], "feasible": float(record["feasible"])}
        values["kl"] = record["kl"]
        if "dual_value" in record:
            values["dual_value"] = record["dual_value"]
        for key in ("lambda", "u", "u_se", "utility", "improvement"):
            values.update({f"{key}/{i}": v for i, v in enumerate(record[key])})
        self.logger.log(t * self.steps_per_iteration, values, prefix="caid/")
        if jax.process_index() == 0:
            shown = ", ".join(
                f"{k}={np.round(record[k], 4).tolist()}"
                for k in ("policy_lambda", "u", "reward", "kl", "dual_value")
                if k in record
            )
            lam = np.round(record["lambda"], 4).tolist()
            print(
                f"[{self.stage.name}] iterate {t}: {shown}, feasible={record['feasible']}; "
                f"next lambda={lam}"
            )

    # -- policy step ------------------------------------------------------------------

    def policy_step(
        self, t: int, lam: np.ndarray, state: TrainState, first: int, history: list[dict]
    ) -> TrainState:
        """DPO from the current iterate on pairs pseudo-labelled under ``lam``: one run of
        the training loop with a fresh optimiser state (its own warmup and schedule)."""
        seed, total = self.ctx.seed, self.steps_per_iteration
        swap = draw_second_preferred(self.pair_r, self.pair_g, lam, seed=seed, iteration=t)
        labelled = self.pairs.dataset.swap_pairs(swap)
        ctx = dataclasses.replace(self.ctx, seed=round_seed(seed, t, 1))
        train = self.stage.train
        loader = ctx.loader(
            labelled,
            self.stage.data,
            train.batch_size,
            train=True,
            grad_accum=train.grad_accum,
            packing=self.stage.data.packing,  # DPO's loss reads packed rows exactly
        )
        if first == 0:
            state = self.trainer.fresh_state(state.model_params())
            rate = float(second_preferred_probability(self.pair_r, self.pair_g, lam).mean())
            self.logger.log(
                t * total,
                {"second_preferred_rate": rate, "drawn_rate": float(swap.mean())},
                prefix="caid/",
            )
        return self.loop.run(
            state,
            loader.iterate(first, total - first),
            first=first,
            total=total,
            offset=t * total,
            meta=lambda done: {"iteration": t, "local_step": done, "history": history},
            description=f"{self.stage.name} iteration {t + 1}/{self.stage.iterations}",
        )

    # -- the end ----------------------------------------------------------------------

    def finish(self, history: list[dict]) -> Llama:
        """History file, plot, the best iterate as the stage's model, FINISHED marker."""
        best = best_iterate(history, self.stage.output_iterate)
        stage_dir = self.ctx.stage_dir
        if jax.process_index() == 0:
            summary = {
                "best_iterate": best,
                "output_iterate": self.stage.output_iterate,
                "thresholds": self.thresholds.tolist(),
                "relative_thresholds": self.stage.relative_thresholds,
                "constraints": [c.model for c in self.stage.constraints],
                "history": history,
            }
            with open(os.path.join(stage_dir, HISTORY_FILE), "w") as f:
                json.dump(summary, f, indent=2)
            plots.plot_dual_trajectories(history, os.path.join(stage_dir, "dual_trajectories.png"))
            print(f"[{self.stage.name}] best iterate: {best} ({self.why(history, best)})")
        self.publish_model(best)
        self.checkpointer.close()
        self.logger.close()
        info = {"best_iterate": best, "iterations": self.stage.iterations}
        checkpoint.mark_finished(stage_dir, info)
        if not self.stage.train.keep_checkpoints and jax.process_index() == 0:
            shutil.rmtree(self.checkpointer.directory, ignore_errors=True)
        report_disk_use(self.stage.name, stage_dir)
        return self.reference if best == 0 else load_export(self.ctx, self.reference)

    def why(self, history: list[dict], best: int) -> str:
        if self.stage.output_iterate == "dual_value":
            return f"lowest estimated dual value {history[best]['dual_value']:.4g}"
        return "feasible" if history[best]["feasible"] else "none feasible: least violating"

    def publish_model(self, best: int) -> None:
        """``model/``: a link to ``iterates/<best>``, or an export of pi_ref for iterate 0;
        with LoRA, ``adapter/`` likewise (iterate 0: the fresh adapters, B = 0)."""
        lora = self.stage.lora is not None
        if best == 0:
            export(self.reference, self.ctx, msgpack=self.stage.train.export_msgpack)
            if lora:
                export_adapter(self.start_policy, self.ctx)
            return
        self.link(MODEL_DIR, os.path.join(ITERATES_DIR, str(best)))
        if lora:
            self.link(ADAPTER_DIR, os.path.join(ADAPTERS_DIR, str(best)))

    def link(self, name: str, target: str) -> None:
        """``stage_dir/name`` -> ``target`` (relative), replacing an earlier link atomically."""
        if jax.process_index() != 0:
            return
        path = os.path.join(self.ctx.stage_dir, name)
        link = os.path.join(self.ctx.stage_dir, f".{name}.link")
        if os.path.lexists(link):  # left by a killed run
            os.unlink(link)
        os.symlink(target, link)
        os.replace(link, path)
