"""The pairwise LLM judge against a real HTTP server on 127.0.0.1: both protocols' prompts
and results (by hand), retries (slow, HTTP 500, 429 with Retry-After, malformed answers),
one-line errors, judgments kept across a failed run, and the evaluate stage and command
line wired to it."""

from __future__ import annotations

import http.server
import json
import os
import threading

import numpy as np
import pytest

from sacpo_jax.config import ConfigError, JudgeConfig, load_config
from sacpo_jax.eval_metrics import elo_ratings, grouped_elo_ratings
from sacpo_jax.judge import JudgeClient, JudgeError, parse_scores, parse_verdict
from sacpo_jax.judging import JUDGMENTS_FILE, judge_models, read_judgments

# ----------------------------------------------------------------------------- the server


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            index = len(server.requests)
            server.requests.append((self.path, dict(self.headers), body))
        status, headers, payload, delay = server.respond(index, body)
        if delay:
            threading.Event().wait(delay)
        try:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up waiting
            pass

    def log_message(self, *args):
        pass


def completion(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": content}}]}).encode()


def responses_of(body: dict) -> tuple[str, str]:
    """The two responses in a call's user message (either protocol's layout)."""
    user = body["messages"][1]["content"]
    if "[Assistant 1's answer]\n" in user:
        first = user.split("[Assistant 1's answer]\n")[1].split("\n[End of Assistant 1")[0]
        second = user.split("[Assistant 2's answer]\n")[1].split("\n[End of Assistant 2")[0]
    else:
        first = user.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        second = user.split("[Response B]\n")[1]
    return first, second


QUALITY = {"good": 8, "fair": 5, "poor": 2}


def quality(response: str) -> int:
    return next((v for k, v in QUALITY.items() if k in response), 0)


def scoring_judge(index, body):
    """The 'sacpo' protocol's judge: each answer scored by the quality word in it."""
    first, second = responses_of(body)
    return 200, {}, completion(f"{quality(first)} {quality(second)}\nbecause"), 0.0


@pytest.fixture
def server():
    """A threaded chat-completions server on 127.0.0.1; it shuts itself down after 120 s
    if the test has not done so."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.lock, httpd.respond = [], threading.Lock(), scoring_judge
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    backstop = threading.Timer(120.0, httpd.shutdown)
    backstop.daemon = True
    backstop.start()
    yield httpd
    backstop.cancel()
    httpd.shutdown()
    httpd.server_close()


def settings(server, **overrides) -> JudgeConfig:
    return JudgeConfig(base_url=server.url + "/v1", model="judge-model", **overrides)


def rows(*responses: str) -> list[dict]:
    return [{"prompt": f"question {i}", "response": r} for i, r in enumerate(responses)]


# ----------------------------------------------------------------------------- protocols


def test_sacpo_protocol_scores_both_orders_three_times(server, tmp_path):
    # question 0: A beats the baseline, B loses; question 1: all three equal (ties)
    samples = {
        "base": rows("a fair answer", "a fair answer"),
        "A": rows("a good answer", "a fair answer"),
        "B": rows("a poor answer", "a fair answer"),
    }
    results = judge_models(samples, settings(server), str(tmp_path), baseline="base")
    # 2 criteria x 4 ordered pairs (A, B each against base, both orders) x 2 questions x 3
    assert len(server.requests) == 48
    bodies = [body for _, _, body in server.requests]
    assert {b["temperature"] for b in bodies} == {0.7} and {b["max_tokens"] for b in bodies} == {8}
    systems = {b["messages"][0]["content"] for b in bodies}
    assert any("from 1 to 10" in s and "helpfulness" in s for s in systems)
    assert any("from 0 to 10" in s and "harmful" in s for s in systems)
    assert all("position" not in s or "order" in s for s in systems)
    firsts = {responses_of(b)[0] for b in bodies}
    assert {"a good answer", "a poor answer", "a fair answer"} <= firsts  # both orders
    for criterion in ("helpfulness", "harmlessness"):
        # by hand, per repeat: A wins q0 in both orders, ties q1 in both: (1+1+.5+.5)/4
        assert results["A"][f"judge_{criterion}_win_rate"] == 0.75
        assert results["B"][f"judge_{criterion}_win_rate"] == 0.25
        assert results["base"][f"judge_{criterion}_win_rate"] == 0.5
        assert results["A"][f"judge_{criterion}_win_rate_std"] == 0.0
        assert results["base"][f"judge_{criterion}_elo"] == pytest.approx(1000.0)
        assert (
            results["A"][f"judge_{criterion}_elo"] > 1000 > results["B"][f"judge_{criterion}_elo"]
        )


def test_verdict_protocol_needs_both_orders_to_agree(server, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "secret")
    verdict = {"value": None}

    def judge(index, body):
        first, second = responses_of(body)
        return 200, {}, completion("Reasoning... " + verdict["value"](first, second)), 0.0

    server.respond = judge
    samples = {"base": rows("a poor answer"), "A": rows("a good answer")}
    config = settings(server, protocol="verdict", api_key_env="STUB_KEY", criteria=["helpfulness"])

    def win_rate(rule, name) -> float:
        verdict["value"] = rule
        directory = tmp_path / name
        return judge_models(samples, config, str(directory), baseline="base")["A"][
            "judge_helpfulness_win_rate"
        ]

    assert win_rate(lambda a, b: "[[A]]" if "good" in a else "[[B]]", "consistent") == 1.0
    assert win_rate(lambda a, b: "[[B]]" if "good" in a else "[[A]]", "reversed") == 0.0
    assert win_rate(lambda a, b: "[[A]]", "position_biased") == 0.5
    assert win_rate(lambda a, b: "[[C]]", "tie") == 0.5
    assert win_rate(lambda a, b: "no verdict tag", "no_tag") == 0.5
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    first, second = (responses_of(request[2])[0] for request in server.requests[:2])
    assert {first, second} == {"a good answer", "a poor answer"}  # both orders


def test_parsers():
    assert parse_scores("7 3\nAssistant 1 is better") == (7.0, 3.0)
    assert parse_scores("\n 8.5, 2 ") == (8.5, 2.0)
    assert parse_scores("Assistant 1: 7") is None and parse_scores("") is None
    assert parse_verdict("A is like [[B]] but final: [[A]]") == "A"
    assert parse_verdict("[[c]]") is None


def test_unreadable_scores_count_as_a_tie(server, tmp_path):
    server.respond = lambda index, body: (200, {}, completion("I cannot decide."), 0.0)
    samples = {"base": rows("a poor answer"), "A": rows("a good answer")}
    config = settings(server, criteria=["helpfulness"], repeats=1)
    results = judge_models(samples, config, str(tmp_path), baseline="base")
    assert results["A"]["judge_helpfulness_win_rate"] == 0.5
    kept = read_judgments(str(tmp_path / JUDGMENTS_FILE))
    assert [record["answer"] for record in kept.values()] == [None, None]


# ----------------------------------------------------------------------------- Elo


def test_grouped_elo_by_hand():
    # one trial, one pass, one group of two wins of a over b, anchored at b
    ratings = grouped_elo_ratings(
        [[("a", "b", 1.0), ("a", "b", 1.0)]], ["a", "b"], trials=1, epochs=1, anchor="b"
    )
    a, b = 1200.0 + 16.0, 1200.0 - 16.0
    change = 32.0 * (1.0 - 1.0 / (1.0 + 10.0 ** ((b - a) / 400.0)))
    a, b = a + change, b - change
    assert ratings["a"] == pytest.approx((a * 1000.0 / b, 0.0))
    assert ratings["b"] == pytest.approx((1000.0, 0.0))


def test_single_match_groups_replay_like_elo_ratings():
    outcomes = [("a", "b", 1.0), ("b", "c", 0.5), ("c", "a", 0.0), ("a", "c", 1.0)]
    plain = elo_ratings(outcomes, ["a", "b", "c"], trials=7, epochs=3, seed=4)
    grouped = grouped_elo_ratings(
        [[o] for o in outcomes], ["a", "b", "c"], trials=7, epochs=3, seed=4
    )
    assert {k: v[0] for k, v in grouped.items()} == pytest.approx(plain)


# ----------------------------------------------------------------------------- HTTP


def test_client_retries_slow_failing_and_malformed_answers(server):
    script = [
        (200, {}, completion("late"), 2.0),  # slower than the timeout
        (500, {}, b"{}", 0.0),
        (429, {"Retry-After": "1"}, b"{}", 0.0),
        (200, {}, b"<html>not json", 0.0),
        (200, {}, json.dumps({"choices": []}).encode(), 0.0),
        (200, {}, completion("7 3"), 0.0),
    ]
    server.respond = lambda index, body: script[index]
    waits = []
    client = JudgeClient(server.url, "m", timeout=0.5, backoff=0.01, sleep=waits.append)
    assert (
        client.complete([{"role": "user", "content": "q"}], temperature=0.7, max_tokens=8) == "7 3"
    )
    assert len(server.requests) == 6
    assert waits == [0.01, 0.02, 1.0, 0.08, 0.16]  # doubling backoff; Retry-After obeyed


def test_client_gives_up_with_one_line(server):
    server.respond = lambda index, body: (500, {}, b"{}", 0.0)
    client = JudgeClient(server.url, "m", max_retries=2, backoff=0.001)
    with pytest.raises(JudgeError) as error:
        client.complete([], temperature=0.0, max_tokens=8)
    message = str(error.value)
    assert "\n" not in message and "HTTP 500" in message and "3 attempts" in message
    assert len(server.requests) == 3
    server.respond = lambda index, body: (401, {}, b"{}", 0.0)
    with pytest.raises(JudgeError, match="HTTP 401"):
        client.complete([], temperature=0.0, max_tokens=8)
    assert len(server.requests) == 4  # a client error is not retried


def test_unreachable_judge_is_one_line():
    client = JudgeClient("http://127.0.0.1:9", "m", timeout=1.0, max_retries=1, backoff=0.001)
    with pytest.raises(JudgeError, match="unreachable") as error:
        client.complete([], temperature=0.0, max_tokens=8)
    assert "\n" not in str(error.value)


def test_a_rerun_continues_where_a_failed_run_stopped(server, tmp_path):
    samples = {
        "base": rows("a fair answer", "a poor answer", "a good answer"),
        "A": rows("a good answer", "a fair answer", "a fair answer"),
    }
    config = settings(server, workers=1, max_retries=1, criteria=["helpfulness"])
    reference = judge_models(samples, config, str(tmp_path / "whole"), baseline="base")
    total = len(server.requests)  # 2 orders x 3 questions x 3 repeats
    assert total == 18

    def failing_after_seven(index, body):
        if index - total >= 7:
            return 500, {}, b"{}", 0.0
        return scoring_judge(index, body)

    server.respond = failing_after_seven
    directory = tmp_path / "interrupted"
    with pytest.raises(JudgeError, match="HTTP 500"):
        judge_models(samples, config, str(directory), baseline="base")
    assert len(read_judgments(str(directory / JUDGMENTS_FILE))) == 7
    with open(directory / JUDGMENTS_FILE, "a") as f:
        f.write('{"key": "torn')  # a line cut short by a kill
    server.respond = scoring_judge
    before = len(server.requests)
    resumed = judge_models(samples, config, str(directory), baseline="base")
    assert len(server.requests) - before == 18 - 7
    assert resumed == reference
    again = len(server.requests)
    judge_models(samples, config, str(directory), baseline="base")
    assert len(server.requests) == again  # nothing left to ask
    changed = {**samples, "A": rows("a poor answer", "a fair answer", "a fair answer")}
    judge_models(changed, config, str(directory), baseline="base")
    assert len(server.requests) - again == 2 * 3  # only question 0 changed: both orders x 3


# ----------------------------------------------------------------------------- wiring


def test_judge_config_errors_are_one_line(tmp_path):
    config = {
        "model": {"random": {}},
        "tokenizer": {"path": "bundled:oracle"},
        "stages": [
            {
                "name": "eval",
                "kind": "evaluate",
                "models": ["initial"],
                "prompts": {"source": {"type": "bundled", "name": "eval_prompts"}},
                "judge": {"base_url": "http://127.0.0.1:1", "model": "m"},
            }
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="a judge compares two or more models"):
        load_config(str(path))
    config["stages"][0]["judge"]["protocol"] = "elo"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="judge.protocol") as error:
        load_config(str(path))
    assert "\n" not in str(error.value)


def test_judge_bookkeeping_does_not_change_the_stage_identity():
    from sacpo_jax.config import EvaluateStage
    from sacpo_jax.identity import stage_settings

    def settings_with(**judge) -> dict:
        stage = {
            "name": "eval",
            "kind": "evaluate",
            "models": ["a", "b"],
            "prompts": {"source": {"type": "bundled", "name": "eval_prompts"}},
            "judge": {"base_url": "http://127.0.0.1:1", "model": "m", **judge},
        }
        return stage_settings(EvaluateStage.model_validate(stage))

    assert settings_with(timeout=5, max_retries=1, workers=8) == settings_with()
    assert settings_with(model="other") != settings_with()
    assert settings_with(temperature=0.2) != settings_with()


def tiny_model_dir(directory, seed: int) -> str:
    from sacpo_jax import parallel
    from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
    from sacpo_jax.models import hf
    from sacpo_jax.models.init import init_model
    from sacpo_jax.models.llama import tiny_config

    vocab = len(oracle_tokenizer())
    model = init_model(tiny_config(vocab_size=vocab), parallel.make_mesh(), seed=seed, init_std=0.3)
    hf.save_checkpoint(model, str(directory))
    return str(directory)


def length_judge(index, body):
    """Scores each answer by its number of words (at most 10)."""
    return 200, {}, completion(" ".join(str(words(r)) for r in responses_of(body))), 0.0


def words(text: str) -> int:
    return min(len(text.split()), 10)


def expected_win_rate(samples_path, model: str, baseline: str) -> float:
    """The sacpo protocol's win rate under `length_judge`, from the kept responses."""
    with open(samples_path) as f:
        rows_ = [json.loads(line) for line in f]
    mine = [words(r["response"]) for r in rows_ if r["model"] == model]
    theirs = [words(r["response"]) for r in rows_ if r["model"] == baseline]
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, theirs)]))


@pytest.mark.slow  # generation with two small models (~30 s on a busy 2-core machine)
def test_evaluate_command_line_judges_and_resumes(server, tmp_path, capsys):
    from sacpo_jax import evaluate

    server.respond = length_judge
    first, second = tiny_model_dir(tmp_path / "a", 0), tiny_model_dir(tmp_path / "b", 1)
    output = tmp_path / "out"
    argv = [
        "--model", f"a={first}", "--model", f"b={second}", "--prompts", "bundled",
        "--limit", "4", "--tokenizer", "bundled:oracle", "--template", "Q: {prompt} A:",
        "--max-new-tokens", "6", "--baseline", "a", "--output", str(output),
        "--judge-url", server.url, "--judge-model", "m", "--judge-criteria", "helpfulness",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    assert len(server.requests) == 2 * 4 * 3
    results = json.loads((output / "results.json").read_text())
    want = expected_win_rate(output / "samples.jsonl", "b", "a")
    assert results["b"]["judge_helpfulness_win_rate"] == pytest.approx(want)
    assert "judge_helpfulness_elo" in (output / "results.md").read_text()
    assert evaluate.main(argv) == 0
    assert len(server.requests) == 2 * 4 * 3  # the rerun reuses every kept call
    assert evaluate.main(argv[:-2] + ["--judge-criteria", "kindness"]) == 2
    assert "--judge-criteria" in capsys.readouterr().err
    assert evaluate.main([*argv, "--template", "no prompt field"]) == 2
    assert "--template: template must contain '{prompt}'" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_stage_keeps_judgments_in_its_directory(server, tmp_path):
    from sacpo_jax.run import run

    server.respond = length_judge
    other = tiny_model_dir(tmp_path / "other", 1)
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"random": {"init_std": 0.3}},
        "tokenizer": {"path": "bundled:oracle"},
        "progress_bar": False,
        "tensorboard": False,
        "stages": [
            {
                "name": "eval",
                "kind": "evaluate",
                "models": ["initial", other],
                "prompts": {"source": {"type": "bundled", "name": "eval_prompts"}, "limit": 3},
                "settings": {"max_new_tokens": 6, "template": None, "elo_trials": 5},
                "judge": {"base_url": server.url, "model": "m", "repeats": 2},
                "baseline": "initial",
            }
        ],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    run(load_config(str(path)))
    stage = tmp_path / "run" / "stages" / "eval"
    kept = read_judgments(str(stage / "judgments" / JUDGMENTS_FILE))
    assert len(kept) == len(server.requests) == 2 * 2 * 3 * 2  # criteria, orders, prompts, r
    results = json.loads((stage / "results.json").read_text())
    want = expected_win_rate(stage / "samples.jsonl", other, "initial")
    for criterion in ("helpfulness", "harmlessness"):
        assert results[other][f"judge_{criterion}_win_rate"] == pytest.approx(want)
    assert os.path.isfile(stage / "FINISHED.json")
