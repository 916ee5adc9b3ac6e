"""The agent loop with the real HF backend on a tiny real agent: parsing, invalid steps,
batching, routing hook and resume after a killed run."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter

import polars as pl
import pytest

from dmr import envs
from dmr.agent import AgentConfig, finalize, run
from dmr.llm import Sampling, load
from dmr.prompts import build_messages, format_answer, parse_action
from dmr.routing import StepContext, make_router


@pytest.mark.parametrize("text,expected", [
    ("<action>go to cabinet 1</action>", "go to cabinet 1"),
    ("<think>the apple may be in the fridge</think><action>go to fridge 1</action>", "go to fridge 1"),
    ("<action>  take   apple 1 from\ncountertop 2 </action>", "take apple 1 from countertop 2"),
    ("<action>look</action> rambling <action>inventory</action>", "inventory"),
    ("go to cabinet 1", None),                 # no tags
    ("<action>go to cabinet 1", None),         # unterminated
    ("<action></action>", None),               # empty
    ("<action>   </action>", None),
    ("", None),
    ("\x00\xff<action", None),
])
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_prompt_window_and_answer_roundtrip():
    hist = [(f"go to cabinet {i}", f"You arrive at cabinet {i}.") for i in range(1, 6)]
    msg = build_messages("Your task is to: x.", hist, hist[-1][1], ["look", "inventory"], window=2)[0]["content"]
    assert "cabinet 3" not in msg and "> go to cabinet 4" in msg and msg.count("You arrive at cabinet 5.") == 1
    assert msg.endswith("Admissible actions: look | inventory")
    assert parse_action(format_answer("look", think="hmm")) == "look"


def test_routers():
    ctx = [StepContext(f"e{i}", s, "", [], "", []) for i in range(20) for s in range(5)]
    assert set(make_router("full", ["bf16", "w4"]).decide(ctx)) == {"bf16"}
    assert set(make_router("quant", ["bf16", "w4"]).decide(ctx)) == {"w4"}
    r = make_router("random:0.5", ["bf16", "w4"], seed=1)
    picks = r.decide(ctx)
    assert picks == r.decide(ctx) and 20 < picks.count("bf16") < 80
    # decisions do not depend on how steps are batched together
    assert r.decide(ctx[:7]) == picks[:7]
    with pytest.raises(ValueError, match="needs a low-precision"):
        make_router("quant", ["bf16"])
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_router("sometimes", ["bf16", "w4"])


def test_hf_backend_generate_and_score(tiny_world):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=2)
    env = envs.make("household")
    obs = env.reset(env.tasks("test", 1)[0])
    prompt = b.tokenizer.apply_chat_template(build_messages(obs.goal, [], obs.text, obs.admissible, 2),
                                             tokenize=False, add_generation_prompt=True)
    allowed = [format_answer(a) for a in obs.admissible]
    free = b.generate([prompt], Sampling(max_new_tokens=12))[0]
    constrained = b.generate([prompt], Sampling(max_new_tokens=40), [allowed])[0]
    # constrained decoding always yields an admissible action, whatever the weights
    assert parse_action(constrained.text) in obs.admissible
    assert constrained.completion_tokens == len(constrained.logprobs) == len(constrained.token_ids)
    assert all(lp <= 0 for lp in constrained.logprobs)
    # teacher-forced scoring of the generated continuation reproduces its log-probs
    scored = b.score([prompt], [constrained.text])[0]
    assert scored.dist.shape[0] == len(scored.token_ids)
    n = len(scored.logprobs)
    assert scored.logprobs == pytest.approx(constrained.logprobs[:n], abs=1e-3)
    assert free.completion_tokens >= 1


def _episode_checks(out, tasks):
    eps = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert sorted(e["task"] for e in eps) == sorted(t.key for t in tasks)  # each exactly once
    per = Counter(s["task"] for s in steps)
    for e in eps:
        idx = sorted(s["step"] for s in steps if s["task"] == e["task"])
        assert idx == list(range(e["steps"])), e["task"]  # no lost or repeated step
        assert per[e["task"]] == e["steps"]
    return eps, steps


def test_run_batched_records_and_invalid_steps(tiny_world, tmp_path):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=2)
    env_kwargs = {"max_steps": 6}
    tasks = envs.make("household", **env_kwargs).tasks("test", 5)
    # Unconstrained decoding from a barely trained model: mostly malformed or inadmissible outputs,
    # which must become invalid steps, never a crash.
    cfg = AgentConfig(window=2, max_new_tokens=8, shards=3, constrained=False)
    run(lambda: envs.make("household", **env_kwargs), tasks, {"bf16": b}, make_router("full", ["bf16"]),
        cfg, tmp_path, progress=False)
    eps, steps = _episode_checks(tmp_path, tasks)
    assert all(s["precision"] == "bf16" for s in steps)
    bad = [s for s in steps if not s["valid"]]
    assert bad, "a barely trained model should produce some invalid steps"
    for s in steps:
        if s["malformed"]:
            assert not s["valid"] and s["action"] is None
        if s["valid"]:
            assert s["action"] is not None
        assert s["completion_tokens"] >= 1 and s["prompt_tokens"] > 0 and s["step_time"] > 0
    finalize(tmp_path, {"test": True})
    assert pl.read_parquet(tmp_path / "episodes.parquet").height == 5


def test_random_router_mixes_backends(tiny_world, tmp_path):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=2)
    tasks = envs.make("household", max_steps=5).tasks("test", 4)
    cfg = AgentConfig(window=2, max_new_tokens=40, shards=4, constrained=True)
    # Two "precisions" backed by one model: the loop must route each step to its backend.
    run(lambda: envs.make("household", max_steps=5), tasks, {"bf16": b, "low": b},
        make_router("random:0.5", ["bf16", "low"], seed=3), cfg, tmp_path, progress=False)
    eps, steps = _episode_checks(tmp_path, tasks)
    assert {s["precision"] for s in steps} == {"bf16", "low"}
    assert all(s["valid"] for s in steps), "constrained decoding only emits admissible actions"
    assert sum(e["high_calls"] for e in eps) == sum(s["precision"] == "bf16" for s in steps)


def test_resume_after_kill_loses_and_repeats_nothing(tiny_world, tmp_path, python):
    _, _, model = tiny_world
    out = tmp_path / "run"
    cmd = [python, "-m", "dmr.agent", "--env", "household", "--env-kwargs", '{"max_steps": 8}', "--n", "10",
           "--model", f"bf16={model}", "--window", "2", "--max-new-tokens", "40", "--constrained",
           "--shards", "2", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = (out / "episodes.jsonl").read_text().count("\n") if (out / "episodes.jsonl").exists() else 0
        if done >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [json.loads(x)["task"] for x in (out / "episodes.jsonl").read_text().splitlines() if x.strip()]
    assert 3 <= len(first) < 10, "the kill should land mid-run"
    # a torn line, as a kill in the middle of a write leaves
    with (out / "steps.jsonl").open("a") as f:
        f.write('{"task": "household/test/9", "st')
    subprocess.run(cmd, check=True)
    tasks = envs.make("household").tasks("test", 10)
    eps, _ = _episode_checks(out, tasks)
    kept = [e["task"] for e in eps][:len(first)]
    assert kept == first, "finished episodes survive the resume untouched"
    assert (out / "episodes.parquet").exists()
