"""Step KL (dmr.kl), and KL-ST routers trained on it (dmr.klst: the proposal encoder, DAgger)."""
from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch

from dmr import agent, kl
from dmr.llm import Scored, load


def test_kl_of_identical_models_is_zero(tiny_world, tmp_path, rollout_pool):
    _, _, model = tiny_world
    pool = rollout_pool(model, tmp_path / "pool")
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(model), "--quant", "same",
             "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    df = pl.read_parquet(tmp_path / "kl.parquet")
    steps = pl.read_parquet(pool / "steps.parquet")
    assert df.height == steps.height and set(df["quant"]) == {"same"}
    assert df["kl"].max() < 1e-6 and (df["tokens"] > 0).all()
    assert {"step_type", "step", "prev_action", "observation", "goal"} <= set(df.columns)


def test_replay_kl_matches_uncached_scoring(tiny_world, noisy_model, tmp_path, rollout_pool):
    """The replay's per-episode prefix caches must not change the numbers."""
    _, _, model = tiny_world
    pool = rollout_pool(model, tmp_path / "pool", n=3)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "noisy",
             "--batch", "2", "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    df = pl.read_parquet(tmp_path / "kl.parquet").sort("task", "step")
    assert df["kl"].min() >= 0 and df["kl"].max() > 1e-4, "a perturbed model must diverge somewhere"
    from dmr import prompts
    from dmr.prompts import Episode

    hi, lo = load("hf", str(model)), load("hf", str(noisy_model))
    style = prompts.get("react")
    ep, steps = kl.episodes_of(pool)[0]
    view = Episode(ep["goal"], steps[0]["observation"])
    for t, s in enumerate(steps):
        text = style.render(hi.tokenizer, view)
        expect = kl.step_kl(hi.score([text], [s["output"]])[0], lo.score([text], [s["output"]])[0])["kl"]
        got = df.filter((pl.col("task") == ep["task"]) & (pl.col("step") == t))["kl"][0]
        assert got == pytest.approx(expect, rel=1e-3, abs=1e-6)
        if t + 1 < len(steps):
            view.history.append((kl.executed(s), steps[t + 1]["observation"]))


def _scored(logp: torch.Tensor, ids, k=None) -> Scored:
    if k is None:
        return Scored(token_ids=ids, logprobs=[float(logp[i, t]) for i, t in enumerate(ids)], dist=logp)
    top = logp.topk(k, -1)
    return Scored(token_ids=ids, logprobs=[float(logp[i, t]) for i, t in enumerate(ids)],
                  topk=[(top.indices[i].tolist(), top.values[i].tolist()) for i in range(len(ids))])


def test_topk_kl_bounds_exact_kl():
    """From top-k lists plus both exact log-probs of the scored token (what vLLM returns), the step
    KL is the least one consistent with them: never above the exact KL, exact at the vocabulary."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        h = (torch.randn(5, 50, generator=g) * 3).log_softmax(-1)
        l = (h + torch.randn(5, 50, generator=g) * (1 + trial % 4)).log_softmax(-1)
        ids = torch.multinomial(h.exp(), 1, generator=g).squeeze(1).tolist()  # tokens sampled from bf16
        exact, unknown, _ = kl.token_kl(_scored(h, ids), _scored(l, ids))
        assert unknown == [0.0] * 5
        full, unknown, missing = kl.token_kl(_scored(h, ids, 50), _scored(l, ids, 50))
        assert missing == 0 and full == pytest.approx(exact, rel=1e-4, abs=1e-6)
        assert unknown == pytest.approx([0.0] * 5, abs=1e-5)
        for kh, kl_ in [(1, 1), (3, 10), (10, 3), (10, 10), (20, 40)]:
            bound, unknown, _ = kl.token_kl(_scored(h, ids, kh), _scored(l, ids, kl_))
            assert all(b <= e + 1e-5 for b, e in zip(bound, exact))
            assert all(0 <= u <= 1 for u in unknown)
    assert kl.token_kl(_scored(h, ids), _scored(h, ids))[0] == pytest.approx([0.0] * 5, abs=1e-6)
    with pytest.raises(ValueError, match="different continuation"):
        kl.token_kl(_scored(h, ids), _scored(l, [1, 1, 1, 1, 1]))


def test_topk_kl_on_diverging_top_sets():
    """bf16 puts 0.35 on a token the low model gives 1e-6, outside its top-k: that token's term is
    bounded with the low model's k-th probability, not lost in a bucket; the scored token is exact."""
    V = 50
    p = torch.full((V,), 0.05 / (V - 2))
    p[0], p[1] = 0.6, 0.35
    q = torch.full((V,), (1 - 0.5 - 1e-6) / (V - 2))
    q[0], q[1] = 0.5, 1e-6
    h, l = p.log().unsqueeze(0), q.log().unsqueeze(0)
    exact = kl.token_kl(_scored(h, [0]), _scored(l, [0]))[0][0]
    bound, unknown, missing = kl.token_kl(_scored(h, [0], 5), _scored(l, [0], 5))
    assert missing >= 1 and 0.35 <= unknown[0] <= 0.4 + 1e-6  # token 1 and tail tokens not in both lists
    f = float(l[0].topk(5).values[-1].exp())  # the low model's 5th probability
    rest = 0.05 * math.log(0.05 / 0.5)  # the least the other tokens can add (a negative bucket term)
    assert bound[0] <= exact and bound[0] >= 0.6 * math.log(0.6 / 0.5) + 0.35 * math.log(0.35 / f) + rest - 1e-6
    bucket = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)  # the common token plus one bucket
    assert bound[0] > bucket + 1.0
    # the scored token outside both top-k lists is still an exact term
    exact2 = kl.token_kl(_scored(h, [1]), _scored(l, [1]))[0][0]
    bound2 = kl.token_kl(_scored(h, [1], 1), _scored(l, [1], 1))[0][0]
    assert bound2 <= exact2 and bound2 >= 0.35 * math.log(0.35 / 1e-6) + 0.6 * math.log(0.6 / 0.5) + rest - 1e-6


def test_proposal_router_trains_on_what_it_sees_at_deployment(tiny_world, noisy_model, tmp_path, household_run, rollout_pool):
    """route.router.encoder: proposal. KL-ST trains on the low model's proposals over the KL pool's
    bf16 rollout; deployed, the router computes the same embedding of the same step, a step kept low
    takes the low model's proposal (no second decode, the quant run's very action) and a router
    without the low model is refused by name."""
    from dmr import klst
    from dmr.llm import Sampling
    from dmr.policies import Fixed, make_router
    from dmr.router import PROPOSAL, ProposalEncoder
    from dmr.routing import StepContext

    _, _, model = tiny_world
    pool = rollout_pool(model, tmp_path / "pool", n=3)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "low",
             "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    df = pl.read_parquet(tmp_path / "kl.parquet").sort("task", "step")
    (tmp_path / "threshold.json").write_text(json.dumps({"tau": float(df["kl"].median())}))
    r = tmp_path / "router"
    klst.main(["--kl", str(tmp_path / "kl.parquet"), "--threshold", str(tmp_path / "threshold.json"),
               "--precisions", "bf16", "low", "--arch", '{"encoder": "proposal", "window": 1, "layers": 1}',
               "--rollout", str(pool), "--low", str(noisy_model), "--epochs", "2", "--out", str(r), "--quiet"])
    assert json.loads((r / "router.json").read_text())["encoder"] == PROPOSAL
    assert json.loads((r / "metrics.json").read_text())["encoder"] == PROPOSAL
    backends, style, play = household_run
    sampling = Sampling(12, stop=style.stop)
    # Training features = deployment features: the pool's step 1 of its first episode, re-embedded.
    enc = ProposalEncoder(backends["low"], style, Sampling(24, stop=style.stop), precision="low")
    ep, steps = kl.episodes_of(pool)[0]
    ctx = StepContext(ep["task"], 1, ep["goal"], [(kl.executed(steps[0]), steps[1]["observation"])],
                      steps[1]["observation"], [], first=steps[0]["observation"])
    feats = klst.proposal_features(ProposalEncoder(load("hf", str(noisy_model)), style, Sampling(24, stop=style.stop),
                                                   precision="low"), pool, df.filter(pl.col("task") == ep["task"]),
                                   progress=False)
    assert torch.allclose(enc.embed([ctx])[0], feats[1], atol=1e-4)
    assert set(enc.generations) == {(ep["task"], 1)}

    def routed(threshold, out):
        router = make_router("dmr", ["bf16", "low"], router=str(r), threshold=threshold, backends=backends,
                             style=style, sampling=sampling)
        rows = play(router, out)
        for s in rows:
            assert (s["precision"] == "bf16") == (s["route_score"] >= threshold)
            if s["precision"] == "low":
                assert s["llm_time"] == 0.0  # the proposal was the action
        return rows

    low = routed(2.0, tmp_path / "all-low")
    quant = play(Fixed("low"), tmp_path / "quant")
    key = lambda s: (s["task"], s["step"])  # noqa: E731
    assert [(key(s), s["action"]) for s in sorted(low, key=key)] == [(key(s), s["action"]) for s in sorted(quant, key=key)]
    assert {s["precision"] for s in routed(-1.0, tmp_path / "all-high")} == {"bf16"}
    with pytest.raises(ValueError, match="backends"):
        make_router("dmr", ["bf16", "low"], router=str(r), threshold=0.5)


def test_dagger_adds_the_routed_states_labelled_by_their_true_kl(tiny_world, noisy_model, tmp_path, rollout_pool):
    """dmr.klst --dagger: a routed probe run of other training tasks joins the training set, its
    steps labelled 1[true_kl > tau]; the KL pool's validation episodes stay those of a router
    trained without it; a run without measured KL, or one that replays the pool's tasks, is refused."""
    from dmr import klst

    _, _, model = tiny_world
    pool = rollout_pool(model, tmp_path / "pool", n=4)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "low",
             "--out", str(tmp_path / "kl.parquet"), "--quiet"])
    tau = float(pl.read_parquet(tmp_path / "kl.parquet")["kl"].median())
    (tmp_path / "threshold.json").write_text(json.dumps({"tau": tau}))

    def routed(out, offset, probe=True):
        agent.main(["--env", "household", "--env-kwargs", json.dumps({"max_steps": 6}), "--split", "train",
                    "--n", "3", "--offset", str(offset), "--model", f"bf16={model}", "--model", f"low={noisy_model}",
                    "--policy", "random", "--p", "0.3", "--max-new-tokens", "12", "--shards", "3", "--out", str(out),
                    "--quiet"] + (["--probe-kl"] if probe else []))
        return out

    def train(out, *dagger):
        klst.main(["--kl", str(tmp_path / "kl.parquet"), "--threshold", str(tmp_path / "threshold.json"),
                   "--precisions", "bf16", "low", "--arch", '{"layers": 1, "window": 4}', "--epochs", "2",
                   "--val-fraction", "0.25", "--out", str(out), "--quiet"] + (["--dagger", *map(str, dagger)] if dagger else []))
        return pl.read_parquet(out / "train_scores.parquet"), json.loads((out / "metrics.json").read_text())

    probe = routed(tmp_path / "probe", offset=4)
    base, _ = train(tmp_path / "base")
    scores, metrics = train(tmp_path / "dagger", probe)
    steps = pl.read_parquet(probe / "steps.parquet")
    added = scores.filter(pl.col("source") != "pool").sort("task", "step")
    assert metrics["dagger"] == {str(probe): steps.height} and added.height == steps.height
    truth = steps.sort("task", "step")
    assert added["kl"].to_list() == pytest.approx(truth["true_kl"].to_list())
    assert added["label"].to_list() == [int(v > tau) for v in truth["true_kl"]]
    mine = scores.filter(pl.col("source") == "pool").select("task", "step", "split")
    assert mine.sort("task", "step").equals(base.select("task", "step", "split").sort("task", "step"))
    with pytest.raises(SystemExit, match="true_kl"):
        train(tmp_path / "bad", routed(tmp_path / "plain", offset=7, probe=False))
    with pytest.raises(SystemExit, match="must not be the KL pool's"):
        train(tmp_path / "clash", routed(tmp_path / "again", offset=0))


THOUGHT = "<think>the cabinet is closed so I should open it before I take the mug</think>"
ANSWER = "<action>open cabinet 1</action>"


def _instruct_pool(tiny_world):
    """One WebShop-style episode of two steps whose outputs reason before they act."""
    ep = {"task": "shop/train/0", "goal": "put a mug in the cabinet", "won": False, "steps": 2}
    steps = [{"observation": "You are in the kitchen.", "admissible": ["open cabinet 1", "go to table 1"],
              "output": THOUGHT + ANSWER, "action": "open cabinet 1", "prev_action": "", "step_type": "click"},
             {"observation": "The cabinet is open.", "admissible": ["take mug 1"], "output": "<action>take mug 1</action>",
              "action": "take mug 1", "prev_action": "open cabinet 1", "step_type": "click"}]
    return ep, steps


def test_kl_scores_the_action_block_by_default_and_the_whole_output_as_an_option(tiny_world, noisy_model):
    """App. C.1: the step KL of an instruct answer is over its <action> block, not its reasoning: the
    same KL as scoring the action block alone after the reasoning as context. `--kl-block output`
    scores every token. An output without reasoning (the embedded agents') gets the same numbers
    either way, byte for byte."""
    import io

    from dmr import prompts
    from dmr.prompts import Episode

    _, _, model = tiny_world
    hi, lo = load("hf", str(model)), load("hf", str(noisy_model))
    style = prompts.get("instruct")
    ep, steps = _instruct_pool(tiny_world)
    rows = {}
    for block in kl.BLOCKS:
        f = io.StringIO()  # fresh backends: each replay's caches start as the other's did
        kl.replay([(ep, steps)], style, load("hf", str(model)), load("hf", str(noisy_model)), "noisy", f,
                  progress=False, block=block)
        rows[block] = [json.loads(line) for line in f.getvalue().splitlines()]
    act, out = rows["action"], rows["output"]
    prompt = style.render(hi.tokenizer, Episode(ep["goal"], steps[0]["observation"], [], steps[0]["admissible"]))
    # Step 0: the action block is the answer scored after the reasoning.
    alone = kl.step_kl(hi.score([prompt + THOUGHT], [ANSWER])[0], lo.score([prompt + THOUGHT], [ANSWER])[0])
    whole = kl.step_kl(hi.score([prompt], [THOUGHT + ANSWER])[0], lo.score([prompt], [THOUGHT + ANSWER])[0])
    assert act[0]["tokens"] == alone["tokens"] < act[0]["output_tokens"] == out[0]["tokens"] == whole["tokens"]
    assert act[0]["kl"] == pytest.approx(alone["kl"], rel=1e-4, abs=1e-7)
    assert out[0]["kl"] == pytest.approx(whole["kl"], rel=1e-4, abs=1e-7)
    assert abs(act[0]["kl"] - out[0]["kl"]) > 1e-6, "the reasoning tokens must change the whole-output mean"
    assert act[0]["kl_block"] == "action" and out[0]["kl_block"] == "output"
    # Step 1 has no reasoning: identical rows but for the option's name.
    same = lambda r: {k: v for k, v in r.items() if k != "kl_block"}  # noqa: E731
    assert same(act[1]) == same(out[1]) and act[1]["tokens"] == act[1]["output_tokens"]


def test_action_block_positions(tiny_world, noisy_model):
    """Which tokens the action block keeps; outputs without a (closed or open) reasoning block, and
    ReAct answers, are left whole: the very Scored objects, so their KL is the whole output's."""
    from dmr import prompts

    _, _, model = tiny_world
    hi, lo = load("hf", str(model)), load("hf", str(noisy_model))
    instruct, react = prompts.get("instruct"), prompts.get("react")
    tok = hi.tokenizer
    text = THOUGHT + ANSWER
    ids = tok.encode(text, add_special_tokens=False)
    keep = kl.action_positions(tok, instruct, text, ids)
    assert tok.decode([ids[i] for i in keep]) == ANSWER and keep == list(range(len(ids) - len(keep), len(ids)))
    for style, text in ((instruct, ANSWER), (instruct, "<think>cut off before it acts"), (react, " open cabinet 1")):
        h, l = hi.score(["x"], [text])[0], lo.score(["x"], [text])[0]
        got = kl.scored_block(h, l, text, tok, style, "action")
        assert got[0] is h and got[1] is l
    with pytest.raises(ValueError, match="unknown KL block"):
        kl.scored_block(h, l, text, tok, react, "reasoning")
    with pytest.raises(ValueError, match="differ from the tokenizer"):
        kl.action_positions(tok, instruct, THOUGHT + ANSWER, ids[:-1])
