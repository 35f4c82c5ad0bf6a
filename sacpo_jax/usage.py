"""What each stage cost: wall time and tokens generated, and what each model cost in all.

Generation reports the tokens it emits (``add_generated_tokens``; a process-wide count,
``generated_tokens``); the run records, per stage, the wall time and the tokens
generated while it ran in ``stages/<stage>/usage.json`` (accumulated over reruns that
resume it). A model's cost is the sum over the stages it was made from
(``lineage_usage``), e.g. SACPO's realigned model = DPO(H) + DPO(S); the stages a
baseline was made from (the shared SFT model) are left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

USAGE_FILE = "usage.json"
_generated = [0]


def add_generated_tokens(count: int) -> None:
    """Count ``count`` tokens emitted by a sampler (EOS included, padding not)."""
    _generated[0] += int(count)


def generated_tokens() -> int:
    """Tokens generated in this process so far."""
    return _generated[0]


def read_usage(stage_dir: str | os.PathLike) -> dict[str, float]:
    """A stage's recorded usage ({"wall_seconds": 0, "tokens_generated": 0} if none)."""
    path = os.path.join(stage_dir, USAGE_FILE)
    if not os.path.isfile(path):
        return {"wall_seconds": 0.0, "tokens_generated": 0}
    with open(path) as f:
        return json.load(f)


def add_usage(stage_dir: str | os.PathLike, seconds: float, tokens: int) -> None:
    """Add a run's share of a stage's wall time and generated tokens to its record."""
    recorded = read_usage(stage_dir)
    recorded = {
        "wall_seconds": recorded["wall_seconds"] + seconds,
        "tokens_generated": int(recorded["tokens_generated"] + tokens),
    }
    os.makedirs(stage_dir, exist_ok=True)
    path = os.path.join(stage_dir, USAGE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(recorded, f, indent=2)
    os.replace(path + ".tmp", path)


def lineage(name: str, sources: Mapping[str, Sequence[str]]) -> set[str]:
    """``name`` and every stage it was made from, transitively (``sources``: stage name ->
    the names it reads; names that are no stage, e.g. directories, end the walk)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in sources:
            continue
        seen.add(current)
        todo += list(sources[current])
    return seen


def lineage_usage(
    models: Sequence[str],
    sources: Mapping[str, Sequence[str]],
    stages_dir: str | os.PathLike,
    baseline: str | None = None,
) -> dict[str, dict[str, float]]:
    """Per model, the summed usage of the stages in its lineage that are not in the
    baseline's (and the stages each sum covers)."""
    shared = lineage(baseline, sources) if baseline else set()
    out = {}
    for model in models:
        stages = sorted(lineage(model, sources) - shared)
        used = [read_usage(os.path.join(stages_dir, stage)) for stage in stages]
        out[model] = {
            "wall_seconds": sum(u["wall_seconds"] for u in used),
            "tokens_generated": int(sum(u["tokens_generated"] for u in used)),
            "stages": stages,
        }
    return out


def usage_table_markdown(usage: Mapping[str, Mapping]) -> str:
    """A markdown table: model, wall seconds, tokens generated, stages summed."""
    lines = ["| model | wall_seconds | tokens_generated | stages |", "|---|---|---|---|"]
    for model, row in usage.items():
        stages = ", ".join(row["stages"]) or "-"
        lines.append(
            f"| {model} | {row['wall_seconds']:.1f} | {row['tokens_generated']} | {stages} |"
        )
    return "\n".join(lines)
