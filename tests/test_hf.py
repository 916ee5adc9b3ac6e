"""The HF backend (dmr.llm.hf, its KV-session caches in dmr.llm.kv) on the tiny real agent:
generation, scoring, constrained decoding and cached generations equal to cold ones."""
from __future__ import annotations

from pathlib import Path

import pytest

from dmr import envs
from dmr.llm import Sampling, load
from dmr.prompts import Episode, get

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("style", ["react", "instruct"])
def test_hf_backend_generate_and_score(tiny_world, style):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=1)
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


def test_prefix_cache_matches_uncached_generation(tiny_world):
    """Append-only prompts reuse each session's KV cache; results equal a cold computation."""
    _, _, model = tiny_world
    b = load("hf", str(model), threads=1)
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
    b = load("hf", str(model), threads=1)
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
    b = load("hf", str(model), threads=1)
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
    b = load("hf", str(tmp_path), threads=1)
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


def test_backends_generate_concurrently_as_alone():
    """The routing proxy (dmr.serve) runs its in-process backends in request threads at once: each
    answers as it does alone. (A module-level cache of the GQA-folded attention mask once let one
    thread's prefill take another's mask: a shape error, or at equal shapes a wrong answer.)"""
    import threading

    # The shipped agent: its 4 layers of grouped-query attention fold the mask in every forward.
    backends = [load("hf", str(ROOT / "agents/tiny")) for _ in range(4)]
    env, style = envs.make("household", max_steps=8), get("react")
    prompts = []
    for t in env.tasks("test", 8):
        first = env.reset(t)
        prompts.append(style.render(backends[0].tokenizer, Episode(first.goal, first.text, [], first.admissible)))
    # Batches of different lengths and sizes (padded: the mask is folded), so the threads' masks differ in shape.
    batches = [prompts[:2], prompts[1:4], [prompts[4] * 3, prompts[3]], prompts[2:7], [prompts[5] + prompts[0], prompts[1]],
               [prompts[7] * 2, prompts[6]]]
    sampling = Sampling(2, 0.0, 1.0, seed=0)  # mostly prefills, where the mask is folded
    alone = [[[g.text for g in b.generate(batch, sampling)] for batch in batches] for b in backends]
    wrong, errors = [], []

    def work(i):
        try:
            for r in range(12):
                for k in range(len(batches)):
                    j = (k + 3 * i + r) % len(batches)
                    if [g.text for g in backends[i].generate(batches[j], sampling)] != alone[i][j]:
                        wrong.append((i, j))
        except Exception as e:  # reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, (errors[:3], wrong[:3])
