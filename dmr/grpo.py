"""GRPO refinement of the router (paper Sec. 4.3).

Starting from the KL-ST router, each iteration draws `tasks` training tasks and runs a group of G
episodes per task with the router *sampling* the precision of every router-eligible step from its
softmax (forced steps stay high). Episodes of a group share the task; under greedy decoding
(ALFWorld's protocol) they differ only by routing, under sampled decoding (WebShop's) also by the
sampling noise of each batched call. Each trajectory gets the return (Eq. 8)

    R = success - lambda * T / T_ref,    T = n * c_router + c_hi * N_hi + c_lo * N_lo  (Eq. 9, dmr.latency)

with T_ref the modelled time of a bf16 episode. Advantages are group-relative, A = (R - mean_g) /
(std_g + eps) (`--advantage mean`: R - mean_g, Dr. GRPO), and the router takes clipped
policy-gradient steps on

    J = mean_i 1/|o_i| sum_t min(r_t A_i, clip(r_t, 1 - eps, 1 + eps) A_i) - beta * KL(pi || pi_KL-ST),

r_t = pi(a_t | s_t) / pi_old(a_t | s_t), with the exact KL over the precisions to the frozen KL-ST
router. Checkpoints have the KL-ST router's format, so the `dmr` policy, dmr.calibrate and the
evaluation reuse them (policy names `grpo-kK`, `grpo-tT`).

Step types: by default the GRPO router decides the KL-ST router's eligible step types;
`--router-steps` sets them, as App. C.1 does on WebShop (KL-ST routes click steps only, since a
search step's KL label is not meaningful there, while GRPO, which learns from returns and needs no
label, routes search and click steps). The saved router records its own eligible types, so its
evaluation routes the same ones.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from dmr import cli, envs, llm, plots
from dmr.agent import AgentConfig, parse_models, run
from dmr.envs.base import Task
from dmr.latency import describe, episode_tokens, eq9, per_token, router_calls
from dmr.llm import Sampling
from dmr.policy_name import scheme_lows
from dmr import prompts
from dmr.router import load_net, load_router, pad_windows
from dmr.rundir import STEPS, read_jsonl


# --- the objective -------------------------------------------------------------------------------

ADVANTAGES = ("std", "mean")


def group_advantages(rewards, groups, eps: float = 1e-6, scale: str = "std") -> torch.Tensor:
    """Group-relative advantages; a group with one member gets 0.

    scale "std" (the paper's GRPO): (R - mean of its group) / (std of its group + eps). "mean"
    (Dr. GRPO): R - mean of its group, unscaled. With std scaling a group whose episodes all fail
    (or all succeed) differs only by cost, and dividing by that small std turns cost differences of
    a few thousandths into advantages of about +-1: the latency term then pushes the router to low
    precision at full strength. Mean-centred, such a group's advantages stay as small as its cost
    differences, and success differences dominate."""
    if scale not in ADVANTAGES:
        raise ValueError(f"advantage scale must be one of {ADVANTAGES}, got {scale!r}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    out = torch.zeros_like(r)
    for g in dict.fromkeys(groups):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        v = r[idx]
        if scale == "mean":
            out[idx] = v - v.mean()
            continue
        std = v.std(unbiased=False) if len(v) > 1 else torch.tensor(0.0, dtype=r.dtype)
        out[idx] = (v - v.mean()) / (std + eps)
    return out.float()


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-decision PPO-clip surrogate min(r A, clip(r, 1-eps, 1+eps) A) (to be maximised)."""
    ratio = torch.exp(logp - logp_old)
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) per row over the precisions."""
    lp, lq = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def trajectory_weights(traj: list) -> torch.Tensor:
    """1 / (|o_i| * trajectories) per decision: the mean over trajectories of per-trajectory means."""
    counts = {t: traj.count(t) for t in set(traj)}
    return torch.tensor([1.0 / (counts[t] * len(counts)) for t in traj])


def objective(net, ref, x, valid, actions, logp_old, adv, weights, clip: float, kl_coef: float):
    """(-J to minimise, stats) for one batch of decisions."""
    logits = net(x, valid)
    logp = F.log_softmax(logits, -1).gather(1, actions[:, None])[:, 0]
    surr = clipped_surrogate(logp, logp_old, adv, clip)
    loss = -(weights * surr).sum()
    kl = torch.zeros(())
    if kl_coef > 0 and ref is not None:
        with torch.no_grad():
            ref_logits = ref(x, valid)
        kl = (weights * exact_kl(logits, ref_logits)).sum()
        loss = loss + kl_coef * kl
    ratio = torch.exp(logp - logp_old).detach()
    clipped = ((ratio - 1).abs() > clip).float()
    return loss, {"kl": kl.item(), "clip_frac": float((weights * clipped).sum())}


# --- sampling trajectories -----------------------------------------------------------------------

@dataclass(frozen=True)
class Member(Task):
    """One episode of a task's group: the same task and seed, its own episode key."""

    member: int = 0

    @property
    def key(self) -> str:
        return f"{super().key}#{self.member}"


def group_of(key: str) -> str:
    return key.rpartition("#")[0] or key


class SamplingRouter:
    """The learned router as a stochastic policy: each eligible step's precision is drawn from the
    router's softmax, seeded per (seed, iteration, episode, step) so batching does not change it.
    Keeps each decision's window of step embeddings, action and log-probability for the update."""

    def __init__(self, router, seed: int):
        self.router, self.seed = router, seed
        self.eligible, self.precisions = router.eligible, router.precisions
        self.decisions: dict = {}
        self.last_scores = None
        self.generations: dict = {}

    def end_session(self, key):
        self.router.end_session(key)

    @torch.inference_mode()
    def decide(self, contexts):
        embs = self.router._embeddings(contexts)
        routed = [i for i, c in enumerate(contexts) if c.step_type in self.eligible]
        choice, scores = [self.precisions[0]] * len(contexts), [None] * len(contexts)
        if routed:
            probs = self.router._probs([embs[i] for i in routed])
            for i, p in zip(routed, probs):
                c = contexts[i]
                u = random.Random(f"{self.seed}/{c.episode}/{c.step}").random()
                a = next((k for k, cum in enumerate(torch.tensor(p).cumsum(0).tolist()) if u < cum), len(p) - 1)
                choice[i], scores[i] = self.precisions[a], p[0]
                self.decisions[(c.episode, c.step)] = (embs[i].clone(), a, float(torch.tensor(p[a]).log()))
        self.last_scores = scores
        self.generations = self.router.proposals(contexts, choice)  # a proposal router's low steps
        return choice


def trajectory_returns(episodes: list[dict], steps: list[dict], costs: dict[str, float], c_router: float,
                       lam: float, t_ref: float) -> pl.DataFrame:
    """Per episode: success, modelled time T (Eq. 9 over every precision, dmr.latency.eq9:
    n = router-decided steps as Table 1 counts them; `costs` each precision's per-token coefficient,
    high first) and the return R (Eq. 8)."""
    high = next(iter(costs))
    tokens, calls = episode_tokens(steps, list(costs)), router_calls(steps)
    rows = []
    for e in episodes:
        per, n = tokens.get(e["task"], dict.fromkeys(costs, 0)), calls.get(e["task"], 0)
        t = eq9(n, per, c_router, costs)
        rows.append({"task": e["task"], "group": group_of(e["task"]), "won": bool(e["won"]), "cost": t,
                     "decided": n, "high_tokens": per[high], "low_tokens": sum(per.values()) - per[high],
                     "steps": e["steps"], "reward": float(e["won"]) - lam * t / t_ref})
    return pl.DataFrame(rows)


def batches(decisions: list, size: int):
    order = sorted(range(len(decisions)), key=lambda i: len(decisions[i][0]))  # similar lengths pad less
    for k in range(0, len(order), size):
        idx = order[k:k + size]
        x, valid = pad_windows([decisions[i][0] for i in idx], max(len(decisions[i][0]) for i in idx))
        yield idx, x, valid


def update(net, ref, decisions: list, adv_of: dict, clip: float, kl_coef: float, opt, epochs: int,
           batch_size: int = 256) -> dict:
    """`epochs` full-batch clipped policy-gradient steps on one iteration's decisions.
    decisions: (window [T, D], action, logp_old, episode key)."""
    traj = [d[3] for d in decisions]
    w = trajectory_weights(traj)
    actions = torch.tensor([d[1] for d in decisions])
    logp_old = torch.tensor([d[2] for d in decisions])
    adv = torch.tensor([adv_of[t] for t in traj])
    net.eval()  # no dropout: the ratio compares the same function before and after the step
    stats = {}
    for _ in range(epochs):
        opt.zero_grad()
        total, kl, cf = 0.0, 0.0, 0.0
        for idx, x, valid in batches(decisions, batch_size):
            i = torch.tensor(idx)
            loss, s = objective(net, ref, x, valid, actions[i], logp_old[i], adv[i], w[i], clip, kl_coef)
            loss.backward()
            total, kl, cf = total + loss.item(), kl + s["kl"], cf + s["clip_frac"]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        stats = {"loss": total, "kl": kl, "clip_frac": cf}
    return stats


def curve_figure(curve: pl.DataFrame, title: str, path: Path) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 2.8))
    for ax, (col, label) in zip(axes, [("reward", "mean return R"), ("success", "success (%)"),
                                       ("high_frac", "high-precision share of decisions")]):
        ax.plot(curve["iteration"], curve[col], marker="o", color="#d62728")
        ax.set_xlabel("GRPO iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def iteration_tasks(env, n: int, start: int, pool: int | None) -> list:
    """n training tasks from `start`, wrapping around a training split of `pool` tasks: iterations
    after the KL pool may ask for more tasks than the split has left. A fixed benchmark split
    (ALFWorld's games) wraps at its own size, not at `pool`: the config's training-task count is
    what the agent and the KL pool use, and wrapping there would replay the KL pool's games."""
    if hasattr(env, "split_size"):
        pool = env.split_size("train")
    if not pool:
        return env.tasks("train", n, start)
    out = []
    while len(out) < n:
        at = start % pool
        k = min(n - len(out), pool - at)
        out += env.tasks("train", k, at)
        start += k
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[cli.env(), cli.backend(), cli.decoding(AgentConfig())])
    p.add_argument("--router", required=True, type=Path, help="KL-ST router directory (the start and the KL reference)")
    p.add_argument("--latency", required=True, type=Path, help="coefficients.json written by dmr.latency")
    p.add_argument("--quant", required=True,
                   help="the low-precision scheme routed; A+B routes bf16, A and B (cheapest last)")
    p.add_argument("--offset", type=int, default=0, help="first training task (after the KL pool's)")
    p.add_argument("--pool", type=int, default=None, help="tasks in the training split: later tasks wrap around")
    p.add_argument("--model", action="append", required=True, metavar="PRECISION=PATH", help="high first")
    p.add_argument("--lam", type=float, required=True, help="lambda of Eq. 8")
    p.add_argument("--tasks", type=int, required=True, help="tasks per iteration")
    p.add_argument("--group-size", type=int, required=True, help="G trajectories per task")
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--kl-coef", type=float, default=0.0, help="beta of the KL term to the KL-ST router")
    p.add_argument("--epochs", type=int, default=2, help="policy-gradient steps per iteration")
    p.add_argument("--advantage", choices=ADVANTAGES, default="std",
                   help="std: (R - mean) / std per group, the paper's GRPO; mean: R - mean only (Dr. GRPO)")
    p.add_argument("--router-steps", nargs="+", default=None, metavar="TYPE",
                   help="step types the GRPO router decides (default: the KL-ST router's); others stay high")
    p.add_argument("--out", required=True, type=Path,
                   help="GRPO directory: router/, checkpoints/, curve.parquet, trajectories.parquet")
    p.add_argument("--figure", required=True, type=Path, help="training-curve figure (.png and .pdf)")
    p.add_argument("--quiet", action="store_true")
    train(**vars(p.parse_args(argv)))


def train(*, router: Path, latency: Path, quant: str, env: str, env_kwargs: str, offset: int, pool: int | None,
          model: list[str], backend: str, backend_kwargs: str, prompt: dict, max_new_tokens: int, temperature: float,
          top_p: float, constrained: bool, shards: int, lam: float, tasks: int, group_size: int, iterations: int,
          lr: float, clip: float, kl_coef: float, epochs: int, advantage: str, seed: int, router_steps: list[str] | None,
          out: Path, figure: Path, quiet: bool) -> None:
    """GRPO from the KL-ST router `router` (see the module and main's flags, of the same names:
    `env_kwargs` and `backend_kwargs` are JSON, `model` the PRECISION=PATH items)."""
    # The arguments as given, in the flags' order: each checkpoint's router.json records them.
    grpo_cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    if group_size < 2:
        raise SystemExit("--group-size must be at least 2: advantages are relative to the group")
    quants = scheme_lows(quant)
    coef = json.loads(latency.read_text())
    models = parse_models(model)
    if list(models) != ["bf16", *quants]:
        raise SystemExit(f"--model: give bf16=PATH then {'=PATH, '.join(quants)}=PATH, got {list(models)}")
    try:
        costs = per_token(coef, list(models))
    except ValueError as e:
        raise SystemExit(f"{latency}: {e}") from None
    torch.manual_seed(seed)
    kwargs = json.loads(env_kwargs)
    environment = envs.make(env, **kwargs)
    backends = {name: llm.load(backend, path, **json.loads(backend_kwargs)) for name, path in models.items()}
    cfg = AgentConfig(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      constrained=constrained, shards=shards, seed=seed)
    style = prompts.get(**cfg.prompt)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed, stop=style.stop)
    learner = load_router(router, eligible=tuple(router_steps) if router_steps else None, backends=backends,
                          style=style, sampling=sampling, constrained=cfg.constrained)
    if learner.precisions != list(models):
        raise SystemExit(f"{router} routes {learner.precisions}, the run has {list(models)}")
    ref, _ = load_net(router)
    ref.requires_grad_(False)
    net = learner.net
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    t_ref = coef["t_ref"]
    rows, seen, returns = [], [], []
    work = out / "rollouts"
    for it in range(iterations):
        batch = iteration_tasks(environment, tasks, offset + it * tasks, pool)
        members = [Member(**{k: getattr(t, k) for k in ("benchmark", "split", "index", "seed", "task_type")}, member=g)
                   for t in batch for g in range(group_size)]
        policy = SamplingRouter(learner, seed=seed * 1_000_003 + it)
        iter_dir = work / f"iter{it}"
        shutil.rmtree(iter_dir, ignore_errors=True)  # the router has moved on since a killed iteration
        learner.cache.clear()
        episodes = run(lambda: envs.make(env, **kwargs), members, backends, policy, cfg, iter_dir, not quiet)
        steps = read_jsonl(iter_dir / STEPS)
        ret = trajectory_returns(episodes, steps, costs, coef["router"], lam, t_ref)
        adv = group_advantages(ret["reward"].to_list(), ret["group"].to_list(), scale=advantage)
        returns.append(ret.with_columns(iteration=pl.lit(it), advantage=adv.numpy()))
        adv_of = dict(zip(ret["task"].to_list(), adv.tolist()))
        decisions = [(e, act, lp, key) for (key, _), (e, act, lp) in policy.decisions.items()]
        stats = update(net, ref, decisions, adv_of, clip, kl_coef, opt, epochs) if decisions else {}
        seen += [(key, step, e) for (key, step), (e, _, _) in policy.decisions.items()]
        row = {"iteration": it, "episodes": ret.height, "reward": ret["reward"].mean(),
               "success": 100 * ret["won"].mean(), "cost": ret["cost"].mean(), "cost_rel": ret["cost"].mean() / t_ref,
               "high_frac": sum(d[1] == 0 for d in decisions) / max(1, len(decisions)),
               **({f"frac_{q}": sum(d[1] == j for d in decisions) / max(1, len(decisions)) for j, q in enumerate(models)}
                  if len(models) > 2 else {}),
               "decisions": len(decisions),
               "adv_abs": float(adv.abs().mean()), **stats}
        rows.append(row)
        learner.save(out / "checkpoints" / f"iter{it}", {"grpo": grpo_cfg | {"iteration": it}})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    learner.save(out / "router", {"grpo": grpo_cfg, "start": str(router), "latency": describe(coef)})
    # Scores of the final router on the states GRPO visited: dmr.calibrate contrasts them with the
    # calibration pool, as it does with the KL-ST training pool for a KL-ST router.
    with torch.inference_mode():
        scores = []
        for k in range(0, len(seen), 256):
            chunk = seen[k:k + 256]
            scores += net.probs(*pad_windows([e for _, _, e in chunk], net.window))[:, 0].tolist()
    pl.DataFrame({"task": [s[0] for s in seen], "step": [s[1] for s in seen], "score": scores,
                  "split": ["grpo"] * len(seen)}, schema_overrides={"score": pl.Float64}
                 ).write_parquet(out / "router" / "train_scores.parquet")
    curve = pl.DataFrame(rows).with_columns(lam=pl.lit(lam), quant=pl.lit(quant))
    curve.write_parquet(out / "curve.parquet")
    pl.concat(returns).write_parquet(out / "trajectories.parquet")
    curve_figure(curve, f"GRPO on {quant}, lambda={lam:g}, G={group_size} (latency coefficients: {coef['source']})",
                 figure)
    print(curve)
    shutil.rmtree(work, ignore_errors=True)  # trajectories.parquet keeps what the update used


if __name__ == "__main__":
    main()
