"""GRPO refinement (Sec. 4.3): advantages, the clipped objective, returns, and a real update."""
from __future__ import annotations

import math

import pytest
import torch

from dmr import grpo
from dmr.router import RouterNet, pad_windows


def test_advantages_are_zero_mean_unit_scale_per_group():
    rewards = [1.0, 0.0, 0.5, 0.9, -0.2, -0.1, 0.3]
    groups = ["a", "a", "a", "b", "b", "b", "c"]
    adv = grpo.group_advantages(rewards, groups)
    for g in "ab":
        v = adv[[i for i, x in enumerate(groups) if x == g]]
        assert float(v.mean()) == pytest.approx(0.0, abs=1e-6)
        assert float(v.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert float(adv[6]) == 0.0  # a group of one has nothing to compare with
    # Equal returns (all failed, same cost) carry no signal.
    assert grpo.group_advantages([0.3, 0.3], ["x", "x"]).tolist() == [0.0, 0.0]
    # a: mean 0.5, population std sqrt(1/6)
    assert float(adv[0]) == pytest.approx(0.5 / math.sqrt(1 / 6), rel=1e-4)


def test_mean_centred_advantages_keep_an_all_fail_groups_cost_differences_small():
    # Four failed episodes whose modelled costs differ by a few thousandths (lambda 0.1): std
    # scaling blows them up to about +-1, as large as a success would weigh; Dr. GRPO keeps them tiny.
    lam = 0.1
    rewards = [0.0 - lam * c for c in (1.000, 1.003, 1.001, 1.006)] + [1.0 - 0.1, 0.0 - 0.1, 0.0 - 0.1, 0.0 - 0.1]
    groups = ["fail"] * 4 + ["mixed"] * 4
    std = grpo.group_advantages(rewards, groups)
    mean = grpo.group_advantages(rewards, groups, scale="mean")
    assert float(std[:4].abs().max()) > 1.0
    assert float(mean[:4].abs().max()) < 0.001
    assert mean[:4].tolist() == pytest.approx([lam * x for x in (0.0025, -0.0005, 0.0015, -0.0035)], abs=1e-6)
    # In a group where one episode wins, that win dominates either way.
    assert float(mean[4]) == pytest.approx(0.75) and float(std[4]) == pytest.approx(math.sqrt(3), rel=1e-4)
    with pytest.raises(ValueError, match="advantage scale"):
        grpo.group_advantages(rewards, groups, scale="max")


def test_clipped_surrogate_matches_hand_computation():
    logp_old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    logp = torch.log(torch.tensor([0.8, 0.8, 0.3, 0.55]))  # ratios 1.6, 1.6, 0.6, 1.1
    adv = torch.tensor([2.0, -2.0, -1.0, 1.0])
    s = grpo.clipped_surrogate(logp, logp_old, adv, clip=0.2)
    # min(1.6*2, 1.2*2) = 2.4; min(1.6*-2, 1.2*-2) = -3.2; min(0.6*-1, 0.8*-1) = -0.8; 1.1 inside the clip
    assert s.tolist() == pytest.approx([2.4, -3.2, -0.8, 1.1], rel=1e-5)


def test_objective_weights_trajectories_equally_and_adds_kl():
    torch.manual_seed(0)
    net = RouterNet(n_classes=2, in_dim=8, d_model=16, layers=1, heads=2, ff=16, window=4, dropout=0.0).eval()
    ref = RouterNet(n_classes=2, in_dim=8, d_model=16, layers=1, heads=2, ff=16, window=4, dropout=0.0).eval()
    x, valid = pad_windows([torch.randn(n, 8) for n in (1, 2, 3)], 4)
    actions = torch.tensor([0, 1, 0])
    with torch.no_grad():
        logits = net(x, valid)
        logp = torch.log_softmax(logits, -1)[torch.arange(3), actions]
    # Trajectory u has two decisions, v one: weights 1/4, 1/4, 1/2.
    w = grpo.trajectory_weights(["u", "u", "v"])
    assert w.tolist() == pytest.approx([0.25, 0.25, 0.5])
    adv = torch.tensor([1.0, 1.0, -0.5])
    loss, stats = grpo.objective(net, ref, x, valid, actions, logp, adv, w, clip=0.2, kl_coef=0.0)
    # At the sampling policy the ratio is 1: J = 0.25 + 0.25 - 0.25.
    assert float(loss) == pytest.approx(-0.25, rel=1e-5) and stats["clip_frac"] == 0.0
    loss_kl, stats = grpo.objective(net, ref, x, valid, actions, logp, adv, w, clip=0.2, kl_coef=0.5)
    with torch.no_grad():
        p, q = torch.softmax(logits, -1), torch.softmax(ref(x, valid), -1)
        kl = (p * (p / q).log()).sum(-1)
    assert stats["kl"] == pytest.approx(float((w * kl).sum()), rel=1e-4)
    assert float(loss_kl) == pytest.approx(-0.25 + 0.5 * float((w * kl).sum()), rel=1e-4)


def test_returns_use_the_cost_model_and_group_of_members():
    eps = [{"task": "h/train/3#0", "won": True, "steps": 2}, {"task": "h/train/3#1", "won": False, "steps": 1}]
    steps = [{"task": "h/train/3#0", "precision": "bf16", "completion_tokens": 10, "route_score": 0.9},
             {"task": "h/train/3#0", "precision": "q", "completion_tokens": 20, "route_score": 0.1},
             {"task": "h/train/3#1", "precision": "bf16", "completion_tokens": 5, "route_score": None}]  # forced
    r = grpo.trajectory_returns(eps, steps, {"bf16": 0.02, "q": 0.01}, 0.005, lam=0.5, t_ref=1.0)
    assert r["group"].to_list() == ["h/train/3", "h/train/3"]
    # T0 = 2 * 0.005 + 10 * 0.02 + 20 * 0.01 = 0.41; T1 = 0 + 5 * 0.02 = 0.1 (forced step: no router call)
    assert r["cost"].to_list() == pytest.approx([0.41, 0.1])
    assert r["reward"].to_list() == pytest.approx([1 - 0.205, -0.05])


def test_returns_over_three_precisions_charge_each_its_coefficient():
    """Eq. 8/9 with bf16, W4 and W2: each precision's tokens at its own coefficient; low_tokens is
    every step below bf16. A step at a precision without a coefficient is an error, not free."""
    eps = [{"task": "h/train/1#0", "won": True, "steps": 3}]
    steps = [{"task": "h/train/1#0", "precision": "bf16", "completion_tokens": 10, "route_score": 0.8},
             {"task": "h/train/1#0", "precision": "w4", "completion_tokens": 20, "route_score": 0.3},
             {"task": "h/train/1#0", "precision": "w2", "completion_tokens": 40, "route_score": 0.1}]
    costs = {"bf16": 0.02, "w4": 0.01, "w2": 0.005}
    r = grpo.trajectory_returns(eps, steps, costs, 0.001, lam=1.0, t_ref=2.0)
    # T = 3 * 0.001 + 10 * 0.02 + 20 * 0.01 + 40 * 0.005 = 0.603
    assert r["cost"][0] == pytest.approx(0.603)
    assert r["reward"][0] == pytest.approx(1 - 0.603 / 2.0)
    assert (r["high_tokens"][0], r["low_tokens"][0], r["decided"][0]) == (10, 60, 3)
    with pytest.raises(ValueError, match="'w2'"):
        grpo.trajectory_returns(eps, steps, {"bf16": 0.02, "w4": 0.01}, 0.001, lam=1.0, t_ref=2.0)


def test_three_way_sampling_draws_each_precision_at_the_routers_probability():
    """GRPO over three precisions: each eligible step's precision is drawn from the router's softmax
    over all three, seeded per (episode, step), and the decision keeps that class and its log-prob."""
    from dmr.routing import StepContext

    class Fixed3:  # a router whose softmax is known: the draw is what is under test
        eligible, precisions = ("action",), ["bf16", "w4", "w2"]
        p = [0.2, 0.3, 0.5]

        def _embeddings(self, contexts):
            return [torch.zeros(1, 4) for _ in contexts]

        def _probs(self, embs):
            return [list(self.p) for _ in embs]

        def proposals(self, contexts, choice):
            return {}

    policy = grpo.SamplingRouter(Fixed3(), seed=5)
    ctx = [StepContext(f"t#{m}", s, "goal", [], "obs", []) for m in range(100) for s in range(20)]
    choice = policy.decide(ctx)
    share = {q: choice.count(q) / len(choice) for q in Fixed3.precisions}
    assert share == pytest.approx(dict(zip(Fixed3.precisions, Fixed3.p)), abs=0.03)
    for c, q in zip(ctx[:50], choice[:50]):
        _, a, logp = policy.decisions[(c.episode, c.step)]
        assert Fixed3.precisions[a] == q and logp == pytest.approx(math.log(Fixed3.p[a]))
    again = grpo.SamplingRouter(Fixed3(), seed=5).decide(list(reversed(ctx)))
    assert list(reversed(again)) == choice  # batching and order do not change a draw


def test_member_tasks_share_task_and_seed_but_not_the_key():
    from dmr.envs.base import Task

    t = Task("household", "train", 7, 42, "clean")
    a, b = (grpo.Member(**{k: getattr(t, k) for k in ("benchmark", "split", "index", "seed", "task_type")}, member=m)
            for m in (0, 1))
    assert a.seed == b.seed == 42 and a.index == 7 and a.key != b.key
    assert grpo.group_of(a.key) == grpo.group_of(b.key) == t.key


def test_a_real_update_moves_a_real_router_toward_the_advantage():
    """One GRPO update on a real (tiny) router over real MiniLM step embeddings: its weights change and
    p(high) rises on the states where high precision had positive advantage."""
    from dmr.router import Router, StepEncoder
    from dmr.routing import StepContext

    torch.manual_seed(0)
    enc = StepEncoder()
    net = RouterNet(n_classes=2, in_dim=enc.dim, d_model=32, layers=1, heads=2, ff=32, window=8, dropout=0.0)
    router = Router(net, enc, ["bf16", "q"])
    policy = grpo.SamplingRouter(router, seed=3)
    ctx = [StepContext(f"t#{m}", 0, "put a mug in the sink", [], "You are in a kitchen.", []) for m in range(4)]
    choice = policy.decide(ctx)
    assert set(choice) <= {"bf16", "q"} and len(policy.decisions) == 4
    assert all(s is not None for s in policy.last_scores)
    # Episodes that went high succeeded, the others failed.
    adv_of = {f"t#{m}": (1.0 if choice[m] == "bf16" else -1.0) for m in range(4)}
    decisions = [(e, act, lp, key) for (key, _), (e, act, lp) in policy.decisions.items()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, valid = pad_windows([decisions[0][0]], 8)
    with torch.no_grad():
        p0 = float(net.probs(x, valid)[0, 0])
    if len(set(choice)) == 1:  # identical states: make both outcomes present for a signal
        decisions[1] = (decisions[1][0], 1 - decisions[1][1], math.log(1 - math.exp(decisions[1][2])), decisions[1][3])
        adv_of[decisions[1][3]] = 1.0 if decisions[1][1] == 0 else -1.0
    ref = RouterNet(**net.kwargs).eval()
    ref.load_state_dict(before)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    stats = grpo.update(net, ref, decisions, adv_of, clip=0.2, kl_coef=0.01, opt=opt, epochs=3)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        p1 = float(net.probs(x, valid)[0, 0])
    assert p1 > p0, (p0, p1)
    assert stats["kl"] > 0


def test_average_rank_pool_and_attribution():
    import polars as pl

    from dmr import rank

    rows = [("bf16", "Full", None, 60.0, 10.0), ("q", "Quant", None, 40.0, 6.0),
            ("q", "DMR", 0.2, 45.0, 7.0), ("q", "DMR", 0.4, 50.0, 8.0), ("q", "DMR", 0.7, 55.0, 9.5),
            ("q", "GRPO", 0.2, 50.0, 6.5), ("q", "GRPO", 0.4, 52.0, 8.5), ("q", "GRPO", 0.7, 58.0, 9.0),
            ("q", "Random", 0.4, 70.0, 1.0)]  # not in the pool
    t = pl.DataFrame(rows, schema=["quant", "method", "budget", "success", "cost"], orient="row").with_columns(
        cell=pl.lit("b/m"))
    ranked, summary = rank.analyse(t)
    assert ranked.height == 8 and "Random" not in ranked["method"].to_list()
    g = ranked.filter((pl.col("method") == "GRPO") & (pl.col("budget") == 0.2)).row(0, named=True)
    # success 50 ties with DMR@0.4 at ranks 5-6 -> 5.5; time 6.5 is second -> 2; average 3.75
    assert (g["success_rank"], g["time_rank"], g["avg_rank"]) == (5.5, 2.0, 3.75)
    s = summary.row(0, named=True)
    assert s["best_method"] == "GRPO" and s["best_budget"] == 0.2 and s["winner"] == "GRPO"
    assert s["time_axis"] == "cost"


def test_iteration_tasks_wrap_around_the_training_split():
    from dmr import envs
    from dmr.grpo import iteration_tasks

    env = envs.make("household", max_steps=5)
    tasks = iteration_tasks(env, 4, 10, pool=12)  # 10, 11, then 0, 1
    assert [t.index for t in tasks] == [t.index for t in env.tasks("train", 2, 10) + env.tasks("train", 2, 0)]
    assert [t.index for t in iteration_tasks(env, 3, 25, pool=12)] == [t.index for t in env.tasks("train", 3, 1)]


def test_iteration_tasks_of_a_fixed_split_skip_the_kl_pool():
    """A fixed split (ALFWorld: 3553 train games) with a KL pool of its first 1000 tasks: GRPO's
    tasks start after the pool and wrap at the split's size, never back into the pool early."""
    from dmr.grpo import iteration_tasks

    class Fixed:
        def split_size(self, split):
            return 30

        def tasks(self, split, n, offset=0):
            return list(range(offset, offset + n))

    assert iteration_tasks(Fixed(), 4, 10, pool=10) == [10, 11, 12, 13]
    assert iteration_tasks(Fixed(), 4, 28, pool=10) == [28, 29, 0, 1]


def test_grpo_router_decides_the_step_types_it_is_given(tmp_path):
    """App. C.1: KL-ST routes WebShop's click steps only; GRPO, given search and click, samples a
    precision for both, and its saved router keeps those types for evaluation."""
    from dmr.router import StepEncoder, load_router, save_router
    from dmr.routing import StepContext

    enc = StepEncoder()
    net = RouterNet(n_classes=2, in_dim=enc.dim, d_model=32, layers=1, heads=2, ff=32, window=8, dropout=0.0)
    save_router(net, tmp_path / "klst", ["bf16", "q"], {}, ("click",))
    ctx = [StepContext(f"t#{m}", 0, "find me red sneakers", [], "WebShop [SEP] Search", [], step_type=t)
           for m, t in enumerate(["search", "click", "click", "search"])]
    for eligible, decided in ((None, {1, 2}), (("search", "click"), {0, 1, 2, 3})):
        router = load_router(tmp_path / "klst", encoder=enc, eligible=eligible)
        policy = grpo.SamplingRouter(router, seed=0)
        choice = policy.decide(ctx)
        assert {int(k.split("#")[1]) for k, _ in policy.decisions} == decided
        assert all(choice[i] == "bf16" for i in range(4) if i not in decided)  # forced steps stay high
    save_router(router.net, tmp_path / "grpo", router.precisions, {}, router.eligible)
    assert load_router(tmp_path / "grpo", encoder=enc).eligible == ("search", "click")
