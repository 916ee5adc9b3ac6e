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
from dmr.agent import AgentConfig, run
from dmr.agent import main as agent_main
from dmr.llm import Sampling, load
from dmr.policies import make_router
from dmr.prompts import Episode, get
from dmr.prompts.instruct import format_answer, parse_action
from dmr.routing import StepContext
from dmr.rundir import finalize


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


def test_instruct_prompt_window_and_answer_roundtrip():
    hist = [(f"go to cabinet {i}", f"You arrive at cabinet {i}.") for i in range(1, 6)]
    style = get("instruct", window=2)
    msg = style.content(Episode("Your task is to: x.", "You are in the middle of a room.", hist, ["look", "inventory"]))
    assert "cabinet 3" not in msg and "> go to cabinet 4" in msg and msg.count("You arrive at cabinet 5.") == 1
    assert "middle of a room" not in msg and msg.endswith("Admissible actions: look | inventory")
    assert parse_action(format_answer("look", think="hmm")) == "look"
    assert style.parse(style.answer("go to cabinet 2")) == "go to cabinet 2"
    # the inverse a proxy reads: the window's steps (the initial observation no longer shown), or step 0
    assert style.episode(msg) == Episode("Your task is to: x.", "", hist[-2:], ["look", "inventory"])
    start = Episode("Your task is to: x.", "You are in the middle of a room.", [], ["look"])
    assert style.episode(style.content(start)) == start


@pytest.mark.parametrize("text,expected", [
    (" go to cabinet 1\n", "go to cabinet 1"),
    (" take  apple 1 from countertop 2\nYou pick up", "take apple 1 from countertop 2"),
    ("\n", None),
    ("", None),
])
def test_react_parse(text, expected):
    assert get("react").parse(text) == expected


def test_react_prompt_is_append_only_and_tokenizes_in_pieces(tiny_world):
    from transformers import AutoTokenizer

    eps, tok_dir, _ = tiny_world
    tok = AutoTokenizer.from_pretrained(tok_dir)
    style = get("react")
    from dmr.expert import read_episodes, sequences

    ep = read_episodes(eps)[0]
    (seq,) = sequences(ep, style, tok)
    whole = "".join(t for t, _ in seq)
    # pieces and whole text tokenize identically, so training matches run-time prompts
    assert tok.encode(whole, add_special_tokens=False) == [i for t, _ in seq for i in tok.encode(t, add_special_tokens=False)]
    # every run-time prompt is a prefix of the episode sequence (append-only)
    e = Episode(ep["goal"], ep["first"])
    for s in ep["steps"]:
        assert whole.startswith(style.render(tok, e))
        e.history.append((s["action"], s["next_obs"]))


def test_routers():
    ctx = [StepContext(f"e{i}", s, "", [], "", []) for i in range(20) for s in range(5)]
    assert set(make_router("full", ["bf16", "w4"]).decide(ctx)) == {"bf16"}
    assert set(make_router("quant", ["bf16", "w4"]).decide(ctx)) == {"w4"}
    r = make_router("random:0.5", ["bf16", "w4"], seed=1)
    picks = r.decide(ctx)
    assert picks == r.decide(ctx) and 20 < picks.count("bf16") < 80
    # decisions do not depend on how steps are batched together
    assert r.decide(ctx[:7]) == picks[:7]
    assert set(make_router("quant", ["w3"]).decide(ctx)) == {"w3"}
    with pytest.raises(ValueError, match="needs a low-precision"):
        make_router("random:0.2", ["bf16"])
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_router("sometimes", ["bf16", "w4"])


@pytest.mark.parametrize("style", ["react", "instruct"])
def test_hf_backend_generate_and_score(tiny_world, style):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=2)
    env = envs.make("household")
    obs = env.reset(env.tasks("test", 1)[0])
    st = get(style)
    prompt = st.render(b.tokenizer, Episode(obs.goal, obs.text, [], obs.admissible))
    allowed = [st.answer(a) for a in obs.admissible]
    free = b.generate([prompt], Sampling(max_new_tokens=12, stop=st.stop))[0]
    assert 1 <= free.completion_tokens <= 12
    constrained = b.generate([prompt, prompt], Sampling(max_new_tokens=40, stop=st.stop), [allowed, allowed[:1]])
    # constrained decoding always yields an admissible action, whatever the weights
    assert st.parse(constrained[0].text) in obs.admissible
    assert st.parse(constrained[1].text) == obs.admissible[0]
    g = constrained[0]
    assert g.completion_tokens == len(g.logprobs) == len(g.token_ids)
    assert all(lp <= 0 for lp in g.logprobs)
    # teacher-forced scoring of the generated continuation reproduces its log-probs
    scored = b.score([prompt], [g.text])[0]
    assert scored.dist.shape[0] == len(scored.token_ids)
    n = len(scored.logprobs)
    assert scored.logprobs == pytest.approx(g.logprobs[:n], abs=1e-3)


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
    cfg = AgentConfig(prompt={"style": "instruct", "window": 2}, max_new_tokens=8, shards=3, constrained=False)
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
    cfg = AgentConfig(max_new_tokens=40, shards=4, constrained=True)
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
           "--model", f"bf16={model}", "--max-new-tokens", "40", "--constrained",
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
    agent_main(cmd[3:])  # the resume, in process: only the killed run needs a process of its own
    tasks = envs.make("household").tasks("test", 10)
    eps, _ = _episode_checks(out, tasks)
    kept = [e["task"] for e in eps][:len(first)]
    assert kept == first, "finished episodes survive the resume untouched"
    assert (out / "episodes.parquet").exists()


def test_prefix_cache_matches_uncached_generation(tiny_world):
    """Append-only prompts reuse each session's KV cache; results equal a cold computation."""
    _, _, model = tiny_world
    b = load("hf", str(model), threads=2)
    env = envs.make("household")
    style = get("react")
    eps = []
    for t in env.tasks("test", 3):
        o = env.reset(t)
        eps.append(Episode(o.goal, o.text, [], o.admissible))
    sampling = Sampling(max_new_tokens=20, stop=style.stop)
    for step in range(4):
        prompts = [style.render(b.tokenizer, e) for e in eps]
        allowed = [[style.answer(a) for a in e.admissible] for e in eps]
        # sessions of different lengths batched together, one of them cold
        warm = b.generate(prompts, sampling, allowed, sessions=["a", "b", f"c{step}"])
        cold = b.generate(prompts, sampling, allowed)
        assert [g.text for g in warm] == [g.text for g in cold]
        for w, c in zip(warm, cold):
            assert w.logprobs == pytest.approx(c.logprobs, abs=1e-4)
        for e, g in zip(eps, warm):
            e.history.append((style.parse(g.text), f"You arrive at nowhere {step}."))
            e.admissible = e.admissible[1:] + e.admissible[:1]
    ids = b.encode(style.render(b.tokenizer, eps[0]))
    held = b.kv._usable(ids, "a", 1)
    assert held is not None and held[0] > 100
    b.end_session("a")
    assert b.kv._usable(ids, "a", 1) is None


def test_prompt_ids_of_a_session_equal_a_full_encoding_at_every_cut(tiny_world):
    """A session's next prompt is encoded as its previous ids plus the new text only where the cut
    is clean; at any cut, clean or inside a word, the ids equal a full encoding."""
    _, _, model = tiny_world
    b = load("hf", str(model), threads=2)
    env, style = envs.make("household"), get("react")
    o = env.reset(env.tasks("test", 1)[0])
    ep = Episode(o.goal, o.text, [], o.admissible)
    for a in o.admissible[:4]:
        ep.history.append((a, env.step(a).text))
    text = style.render(b.tokenizer, ep)
    full = b.encode(text)
    calls = []
    encode_batch = b.encode_batch
    b.encode_batch = lambda texts: calls.extend(map(len, texts)) or encode_batch(texts)
    reused = 0
    for k, cut in enumerate(range(len(text) // 2, len(text), 7)):
        b._encode_prompts([text[:cut]], [f"s{k}"])
        calls.clear()
        assert b._encode_prompts([text], [f"s{k}"]) == [full], (cut, text[cut - 10:cut + 10])
        reused += max(calls) < len(text)
    # Step boundaries of the ReAct prompt (after "\n>") are clean cuts: every step reuses.
    for k, (a, obs) in enumerate(ep.history):
        prefix = style.render(b.tokenizer, Episode(ep.goal, ep.first, ep.history[:k]))
        b._encode_prompts([prefix], ["steps"])
        calls.clear()
        step = style.render(b.tokenizer, Episode(ep.goal, ep.first, ep.history[:k + 1]))
        assert b._encode_prompts([step], ["steps"]) == [b.encode(step)]
        assert max(calls) < len(text)
    # A batch mixes rows that reuse and rows encoded whole, each equal to its full encoding.
    rows = [text[:len(text) // 2 + 3], text, text[:len(text) // 3]]
    b._encode_prompts(rows[:1], ["m0"])
    assert b._encode_prompts(rows, ["m0", "m1", None]) == [b.encode(r) for r in rows]
    assert reused > 0
    b.end_session("steps")
    assert "steps" not in b._prompts


def test_constrained_decoding_leaves_free_text_steps_free(tiny_world):
    """WebShop's search page admits `search[<your query>]` (free text): constrained decoding leaves
    that step free and holds the click steps of the same batch to their admissible actions."""
    from dmr.prompts import constraint

    _, _, model = tiny_world
    b = load("hf", str(model), threads=2)
    style = get("instruct", window=1)
    assert constraint(style, ["search[<your query>]"]) is None
    clicks = ["click[back to search]", "click[< prev]", "click[next >]", "click[B0P0HW5EBD]"]
    assert constraint(style, clicks) == [style.answer(a) for a in clicks]
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=0)
    outside = 0
    for _ in range(3):
        free, held = b.generate(["go to", "go to"], sampling, [None, constraint(style, clicks)])
        outside += not any(style.answer(a).startswith(free.text) for a in clicks)
        assert any(held.text == style.answer(a).removesuffix(b.tokenizer.eos_token) or
                   style.answer(a).startswith(held.text) for a in clicks), held.text
        assert free.completion_tokens >= 1
    assert outside > 0  # the household model, left free, writes household text


def test_rerun_with_another_spec_never_resumes_stale_episodes(tiny_world, tmp_path):
    """A run directory left by another model or decoding setup is moved aside, not resumed."""
    _, _, model = tiny_world
    out = tmp_path / "run"
    base = ["--env", "household", "--env-kwargs", '{"max_steps": 3}', "--n", "2",
            "--model", f"bf16={model}", "--constrained", "--shards", "2", "--out", str(out), "--quiet"]
    agent_main(base + ["--max-new-tokens", "40"])
    first = (out / "episodes.jsonl").read_text()
    agent_main(base + ["--max-new-tokens", "40"])  # same spec: nothing reruns
    assert (out / "episodes.jsonl").read_text() == first
    agent_main(base + ["--max-new-tokens", "39"])  # another spec: a fresh run
    (stale,) = out.glob("stale-*")
    assert (stale / "episodes.jsonl").read_text() == first
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "spec.json").read_text())["agent"]["max_new_tokens"] == 39


def test_kept_batch_matches_cold_generation_under_any_call_pattern(tiny_world, tmp_path):
    """The KV of the last call's rows stays in place for the next call. Whatever the calls do
    (same rows, a row switching to a new episode, rows routed away and back, reordered, a long
    cold gap, more tokens than the headroom, one session at a time as the routing proxy calls),
    every generation equals a cold one. A randomly initialised 2-layer model: its log-probs move
    with any wrong context token or position (a 1-layer KV column depends on its token only)."""
    import random

    import torch
    from transformers import AutoTokenizer

    from dmr.tiny_agent import build_model

    _, tok_dir, _ = tiny_world
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    build_model(len(tok), {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    b = load("hf", str(tmp_path), threads=2)
    env, style = envs.make("household"), get("react")
    tasks = env.tasks("test", 12)
    eps = {}

    def start(key, task):
        o = env.reset(task)
        eps[key] = Episode(o.goal, o.text, [], o.admissible)

    order = [f"e{k}" for k in range(4)]
    for k, key in enumerate(order):
        start(key, tasks[k])
    rng, fresh = random.Random(0), 4
    sampling = Sampling(max_new_tokens=6, stop=style.stop)
    kept = {"steady": 0, "switch": 0}

    def check(keys):
        before = b.kv._group
        warm = b.generate([style.render(b.tokenizer, eps[k]) for k in keys], sampling, sessions=keys)
        cold = b.generate([style.render(b.tokenizer, eps[k]) for k in keys], sampling)
        assert [g.text for g in warm] == [g.text for g in cold], keys
        for w, c in zip(warm, cold):
            assert w.logprobs == pytest.approx(c.logprobs, abs=1e-4), keys
        for k, g in zip(keys, warm):
            # long observations now and then, past the kept batch's headroom
            obs = "You arrive at nowhere." + (" On it, you see a mug 1." * 30 if rng.random() < 0.15 else "")
            eps[k].history.append((style.parse(g.text) or "look", obs))
        return b.kv._group is before

    for step in range(30):
        pattern = step % 6
        if pattern == 3:
            check(rng.sample(order, 2))                 # routed: a subset, in any order
        elif pattern == 4:
            check(order[::-1])                          # reordered
        elif pattern == 5:                              # an episode ends; a new one takes its row
            gone = order[step % len(order)]
            b.end_session(gone)
            del eps[gone]
            order[order.index(gone)] = key = f"e{fresh}"
            start(key, tasks[fresh % len(tasks)])
            fresh += 1
            check(order)                                # after the reorder: a rebuild
            kept["switch"] += check(order)              # same order: in place
            gone = order[0]                             # and a switch right in the kept batch
            b.end_session(gone)
            del eps[gone]
            order[0] = key = f"e{fresh}"
            start(key, tasks[fresh % len(tasks)])
            fresh += 1
            kept["switch"] += check(order)
        else:
            kept["steady"] += check(order)
    # One session at a time, alternating between episodes, as the routing proxy calls.
    for step in range(6):
        check([order[step % 2]])
    assert kept["steady"] >= 8 and kept["switch"] >= 4, kept
