"""DPO train-step throughput and peak memory: precomputed vs on-the-fly reference, and
full fine-tuning vs LoRA.

    python benchmarks/bench_dpo_step.py [--layers 4 --hidden 256 --batch 16 --length 128] \
        [--lora 16] [--repeats 3]

Each mode runs in its own process: ``precompute`` steps on batches that already carry
the reference log-probs (the one-time reference pass is timed per batch);
``on_the_fly`` keeps a frozen copy of the model and runs its forward before every
step, as the SACPO paper did. Step time is the median (and the minimum, robust to other
load on the machine) over the timed steps; tokens/s counts the chosen and the rejected
sequence of every pair (all tokens real, no padding). Memory: the resident high-water
mark while training (VmHWM, reset after warm-up, Linux) and over the whole process
(ru_maxrss, which includes the reference pass and compilation).
Random token ids; a LLaMA with the given width and depth, vocabulary ``--vocab``.
``--lora R`` adds a third program: the precomputed-reference step with LoRA adapters of
rank R (alpha 2R) on all seven projections, the base frozen. The programs run
interleaved (A B C, A B C, ...) ``--repeats`` times in fresh processes; the table quotes
the median over runs. Prints one markdown table row per program.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MODES = ("precompute", "on_the_fly", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    parser.add_argument("--lora", type=int, default=0, help="also time LoRA of this rank")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per program")
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process")
    return parser.parse_args(argv)


def random_pairs(args, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (args.batch, args.length)
    prompt = args.length // 4
    loss_mask = np.zeros(shape, np.int32)
    loss_mask[:, prompt:] = 1
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = rng.integers(4, args.vocab, shape, dtype=np.int32)
        batch[f"{side}_attention_mask"] = np.ones(shape, np.int32)
        batch[f"{side}_loss_mask"] = loss_mask
    return batch


def _place(batch: dict) -> dict:
    import jax

    return jax.block_until_ready({name: jax.device_put(x) for name, x in batch.items()})


def measure(args) -> dict:
    import jax

    from sacpo_jax import parallel
    from sacpo_jax.models.init import init_model
    from sacpo_jax.models.llama import LlamaConfig
    from sacpo_jax.models.lora import PEFT_MODULES, LoraConfig, is_adapter
    from sacpo_jax.models.transforms import with_adapters
    from sacpo_jax.training import objectives
    from sacpo_jax.training import step as steps
    from sacpo_jax.training.loop import Trainer
    from sacpo_jax.training.optim import make_optimizer
    from sacpo_jax.training.state import split_model, train_all

    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    architecture = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
    )
    model = init_model(architecture, mesh, seed=0)
    if args.mode == "lora":  # all seven projections, alpha 2 r; the base is frozen
        model = with_adapters(
            model, LoraConfig(args.lora, 2.0 * args.lora, targets=tuple(PEFT_MODULES))
        )
    graphdef, params = split_model(model)
    config = model.config
    del model
    reference_step = steps.make_reference_step(graphdef, objectives.PAIR_REFERENCE)
    batches = [_place(random_pairs(args, seed)) for seed in range(args.steps + 2)]
    reference_seconds = reference_params = None
    if args.mode in ("precompute", "lora"):
        # The reference is the start model: one pass, then only the policy stays.
        jax.block_until_ready(reference_step(params, batches[0]))  # compile
        start = time.perf_counter()
        outs = [jax.block_until_ready(reference_step(params, batch)) for batch in batches]
        reference_seconds = (time.perf_counter() - start) / len(batches)
        batches = [{**batch, **out} for batch, out in zip(batches, outs)]
    else:
        reference_params = jax.tree.map(lambda x: x.copy(), params)  # the frozen copy
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(1e-5, 0.1))
    trainable = is_adapter if args.mode == "lora" else train_all
    trainer = Trainer(objective, graphdef, config, make_optimizer(1000), mesh, trainable=trainable)
    state = trainer.fresh_state(params)
    del params

    def one_step(state, batch):
        if args.mode == "on_the_fly":
            batch = {**batch, **reference_step(reference_params, batch)}
        return trainer.step(state, batch)

    for batch in batches[:2]:  # compile and warm up
        state, metrics = jax.block_until_ready(one_step(state, batch))
    reset_peak_rss()
    times = []
    for batch in batches[2:]:
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(one_step(state, batch))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "mode": args.mode,
        "step_seconds": seconds,
        "min_step_seconds": min(times),
        "tokens_per_second": 2 * args.batch * args.length / seconds,
        "reference_pass_seconds_per_batch": reference_seconds,
        "training_peak_rss_mib": peak_rss_mib(),
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(x.size for x in jax.tree.leaves(state.model_params())),
        "trained_parameters": sum(x.size for x in jax.tree.leaves(state.params)),
    }


def reset_peak_rss() -> None:
    """Reset the kernel's resident-memory high-water mark (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """VmHWM: the resident-memory high-water mark since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args)))
        return
    modes = MODES if args.lora else MODES[:2]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    print(f"load average before: {os.getloadavg()}")
    for _ in range(args.repeats):
        for mode in modes:  # interleaved
            command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--mode", mode]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"load average after: {os.getloadavg()}")
    first = runs[modes[0]][0]
    print(
        f"DPO step, {args.layers} layers x width {args.hidden}, vocab {args.vocab}, "
        f"{first['parameters'] / 1e6:.1f}M parameters, {args.batch} pairs x {args.length} "
        f"tokens, float32, {os.cpu_count()} CPU cores ({platform.machine()}); median over "
        f"{args.repeats} interleaved runs of each run's median of {args.steps} steps"
    )
    print(
        "\n| program | trained parameters | step (s, median) | tokens/s | runs (tokens/s) "
        "| peak RSS while training (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for mode in modes:
        rows = runs[mode]
        seconds = statistics.median(r["step_seconds"] for r in rows)
        rates = [round(r["tokens_per_second"]) for r in rows]
        rss = statistics.median(r["training_peak_rss_mib"] for r in rows)
        print(
            f"| {mode} | {rows[0]['trained_parameters'] / 1e6:.2f}M | {seconds:.3f} "
            f"| {2 * args.batch * args.length / seconds:.0f} | {rates} | {rss:.0f} |"
        )
    reference = statistics.median(r["reference_pass_seconds_per_batch"] for r in runs["precompute"])
    print(
        f"\nprecompute: one-time reference pass {reference:.3f} s per batch of {args.batch} pairs"
    )


if __name__ == "__main__":
    main()
