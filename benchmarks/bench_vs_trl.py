"""DPO step throughput and peak memory on CPU: sacpo_jax against TRL's DPOTrainer and a
plain torch eager DPO step.

    python benchmarks/bench_vs_trl.py [--steps 6 --warmup 2 --batch 8 --prompt 128 \
        --completion 128 --repeats 3]

Run it on a quiet machine (nothing else running; the script prints the load average
before and after): torch's threads degrade badly when the cores are shared. The
programs run interleaved (A B C D, A B C D, ...) ``--repeats`` times, each in a fresh
process, and the table quotes the median over runs of each run's median step.

Both sides train the same LLaMA (random weights saved once by transformers and loaded
by both), in float32, on the same pairs: every prompt has exactly ``--prompt`` tokens
and every completion ``--completion`` tokens (its last one EOS), so no row is padded
and both count the same real tokens, 2 * batch * (prompt + completion) per step.
Each side runs in its own process; warmup steps (compilation, allocator warmup) are
excluded; peak memory is the process's peak resident set size (ru_maxrss).

Reference log-probs, each side's default:
    sacpo_jax  precomputed once before training (reference_mode: precompute). Reported
               as the step alone and amortised (step + the reference pass's share).
    sacpo_jax  on the fly (reference_mode: on_the_fly), for comparison.
    TRL        a frozen reference copy scored every step (precompute_ref_log_probs=False).
    torch      the same as TRL, written by hand: one forward of chosen+rejected rows, the
               reference under no_grad, sigmoid DPO loss, backward, AdamW (torch threads =
               the cores).
Needs ``pip install trl`` (not a sacpo_jax dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

WORDS = 4000  # tokenizer vocabulary: w0 ... w3999 plus 4 special tokens
LLAMA = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def make_tokenizer():
    """A whitespace word-level tokenizer, so that token counts are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    vocab.update({f"w{i}": i + 4 for i in range(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_pairs(n: int, prompt: int, completion: int, seed: int = 0) -> list[dict]:
    """Text pairs; a completion has completion - 1 words, TRL and we append EOS."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(f"w{i}" for i in rng.integers(0, WORDS, k))

    return [
        {
            "prompt": words(prompt),
            "chosen": words(completion - 1),
            "rejected": words(completion - 1),
        }
        for _ in range(n)
    ]


def save_model(path: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=WORDS + 4, **LLAMA)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)


def ours(args, model_path: str, on_the_fly: bool) -> dict:
    """Our compiled step on token batches built from the same pairs."""
    import jax
    import numpy as np

    from sacpo_jax import parallel
    from sacpo_jax.models import hf
    from sacpo_jax.training import objectives
    from sacpo_jax.training import step as steps
    from sacpo_jax.training.loop import Trainer
    from sacpo_jax.training.optim import make_optimizer
    from sacpo_jax.training.state import split_model

    tokenizer = make_tokenizer()
    pairs = make_pairs(args.batch * (args.warmup + args.steps), args.prompt, args.completion)
    mesh = parallel.make_mesh()
    model = hf.load_checkpoint(model_path, mesh=mesh)
    graphdef, params = split_model(model)
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(1e-6, 0.1))
    optimizer = make_optimizer(1000, warmup_ratio=0.0)
    trainer = Trainer(objective, graphdef, model.config, optimizer, mesh)
    state = trainer.fresh_state(params)
    reference_step = steps.make_reference_step(graphdef, objectives.PAIR_REFERENCE)
    reference_params = split_model(model)[1] if on_the_fly else None

    def batch_at(i):
        rows = pairs[i * args.batch : (i + 1) * args.batch]
        batch = {}
        for side in ("chosen", "rejected"):
            ids = np.array(
                [
                    tokenizer(r["prompt"])["input_ids"]
                    + tokenizer(r[side])["input_ids"]
                    + [tokenizer.eos_token_id]
                    for r in rows
                ],
                np.int32,
            )
            loss_mask = np.zeros_like(ids)
            loss_mask[:, args.prompt :] = 1
            batch.update(
                {
                    f"{side}_input_ids": ids,
                    f"{side}_attention_mask": np.ones_like(ids),
                    f"{side}_loss_mask": loss_mask,
                }
            )
        return batch

    batches = [batch_at(i) for i in range(args.warmup + args.steps)]
    # Precompute: one reference pass over every batch before training (timed apart).
    reference_seconds = 0.0
    if not on_the_fly:
        for i, batch in enumerate(batches):
            started = time.perf_counter()
            out = jax.block_until_ready(reference_step(params, batch))
            if i >= args.warmup:
                reference_seconds += time.perf_counter() - started
            batch.update({k: np.asarray(v) for k, v in out.items()})
    times = []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        if on_the_fly:
            batch = {**batch, **reference_step(reference_params, batch)}
        state, metrics = trainer.step(state, parallel.global_batch(batch, mesh))
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    return {"step_seconds": times, "reference_seconds": reference_seconds}


def trl(args, model_path: str) -> dict:
    """TRL's DPOTrainer.train(), timing each optimiser step with a callback."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    total = args.warmup + args.steps
    pairs = make_pairs(args.batch * total, args.prompt, args.completion)
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_length=args.prompt + args.completion,
            max_steps=total,
            learning_rate=1e-6,
            beta=0.1,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(pairs),
            processing_class=make_tokenizer(),
            callbacks=[Timer()],
        )
        trainer.train()
    return {"step_seconds": times[args.warmup :], "reference_seconds": 0.0}


def torch_eager(args, model_path: str) -> dict:
    """A minimal DPO step in plain torch: what TRL's step computes, without the trainer."""
    import copy

    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    policy = transformers.LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    tokenizer = make_tokenizer()
    total = args.warmup + args.steps
    pairs = make_pairs(args.batch * total, args.prompt, args.completion)

    def rows(batch_pairs, side):
        return [
            tokenizer(p["prompt"])["input_ids"] + tokenizer(p[side])["input_ids"]
            + [tokenizer.eos_token_id]
            for p in batch_pairs
        ]  # fmt: skip

    def completion_logps(model, ids):
        logits = model(input_ids=ids).logits[:, :-1].float()
        token = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
        return token[:, args.prompt - 1 :].sum(-1)

    times = []
    for i in range(total):
        batch = pairs[i * args.batch : (i + 1) * args.batch]
        ids = torch.tensor(rows(batch, "chosen") + rows(batch, "rejected"))
        started = time.perf_counter()
        with torch.no_grad():
            ref = completion_logps(reference, ids)
        logps = completion_logps(policy, ids)
        n = args.batch
        margin = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
        loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return {"step_seconds": times[args.warmup :], "reference_seconds": 0.0}


def run_one(args) -> None:
    if args.framework == "trl":
        result = trl(args, args.model)
    elif args.framework == "torch":
        result = torch_eager(args, args.model)
    else:
        result = ours(args, args.model, on_the_fly=args.framework == "ours-on-the-fly")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarise(name: str, results: list[dict], tokens_per_step: int) -> dict:
    """Medians over runs of each run's median step (and amortised reference share)."""
    steps = [median(r["step_seconds"]) for r in results]
    step = median(steps)
    row = {"name": name, "step_s": step, "tokens_per_s": tokens_per_step / step}
    row["runs_tokens_per_s"] = [round(tokens_per_step / s) for s in steps]
    if results[0]["reference_seconds"]:
        shares = [r["reference_seconds"] / len(r["step_seconds"]) for r in results]
        row["amortised_tokens_per_s"] = tokens_per_step / (step + median(shares))
    row["peak_rss_mib"] = median([r["peak_rss_mib"] for r in results])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per program")
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.framework:
        run_one(args)
        return
    tokens_per_step = 2 * args.batch * (args.prompt + args.completion)
    names = ("trl", "torch", "ours", "ours-on-the-fly")
    results: dict[str, list[dict]] = {name: [] for name in names}
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as model_dir:
        save_model(model_dir)
        for _ in range(args.repeats):
            for name in names:  # interleaved: A B C D, A B C D, ...
                command = [sys.executable, __file__, "--framework", name, "--model", model_dir]
                command += [f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch")]
                command += [f"--prompt={args.prompt}", f"--completion={args.completion}"]
                env = {**os.environ, "JAX_PLATFORMS": "cpu"}
                output = subprocess.run(command, capture_output=True, text=True, env=env)
                lines = [x for x in output.stdout.splitlines() if x.startswith("RESULT ")]
                if output.returncode or not lines:
                    raise SystemExit(f"{name} failed:\n{output.stderr[-3000:]}")
                results[name].append(json.loads(lines[-1][7:]))
    print(f"load average after: {os.getloadavg()}")
    rows = [summarise(name, results[name], tokens_per_step) for name in names]
    print(
        f"tokens per step: {tokens_per_step} (batch {args.batch} pairs, length "
        f"{args.prompt}+{args.completion}); median over {args.repeats} interleaved runs of "
        f"each run's median of {args.steps} steps after {args.warmup}"
    )
    print("| run | step (s) | tokens/s | tokens/s incl. reference pass | runs | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        amortised = f"{r['amortised_tokens_per_s']:.0f}" if "amortised_tokens_per_s" in r else "-"
        print(
            f"| {r['name']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {amortised} "
            f"| {r['runs_tokens_per_s']} | {r['peak_rss_mib']:.0f} |"
        )
    by_name = {r["name"]: r for r in rows}
    for baseline in ("trl", "torch"):
        for name in ("ours", "ours-on-the-fly"):
            r = by_name[name]
            rate = r.get("amortised_tokens_per_s", r["tokens_per_s"])
            print(f"{name} / {baseline}: {rate / by_name[baseline]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
