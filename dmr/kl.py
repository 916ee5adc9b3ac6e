"""Step-wise KL between the low- and the high-precision action distributions (paper Sec. 4.2).

Protocol: the high-precision (bf16) model rolls out the training pool and only its actions are
executed (a `full` rollout, dmr.agent). This module replays every step of those episodes: the
continuation bf16 sampled at the step is scored teacher-forced under both models, and the step's KL
is the mean of KL(p_high || p_low) over the tokens of its action block (`kl_sum` and `kl_max` are
kept too).

The action block (App. C.1's "per-step action-block KL"; `--kl-block action`, the default) is the
output without its reasoning: under the instruct protocol (WebShop) a step answers
`<think>...</think><action>...</action>`, and the up to 512 reasoning tokens would otherwise dominate
the per-token mean. The prompt style says where the reasoning is (`PromptStyle.reasoning`); the
tokens outside it are scored. An output without reasoning (a ReAct action line, or an instruct
answer with no `<think>` block, as the embedded agents emit) is its own action block, scored whole,
exactly as `--kl-block output`. An output that is all reasoning (cut off before `</think>`) has no
action block and is scored whole too. Each row keeps the option (`kl_block`), the scored tokens
(`tokens`) and the output's (`output_tokens`).

Exact vs top-k. The HF backend returns full-vocabulary distributions, so the KL is exact. The vLLM
backend returns, per position, each model's top-k log-probs and the exact log-prob of the token
bf16 produced there (`prompt_logprobs`), so the KL at a position is known exactly on the tokens
both models returned (always including bf16's own token: under greedy decoding its most likely
one) and bounded on the rest. `token_kl` takes the least KL
consistent with what was returned: exact terms on the common tokens; a bf16 top-k token missing
from the low model's top-k has a low probability of at most the low model's k-th one, and the
remaining mass of both models is one bucket (log-sum inequality). It never exceeds the exact KL,
is exact once k reaches the vocabulary (`max_logprobs`), and its gap comes only from bf16's mass
whose low-precision probability was not returned, which each row keeps as `kl_unknown_mass` (mean
over the block's positions; 0 for exact scores) beside `kl_topk_missing` (bf16 top-k tokens
missing from the low model's top-k).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import deque
from pathlib import Path

import torch
from tqdm import tqdm

from dmr import cli, llm, prompts
from dmr.llm import Scored
from dmr.prompts import Episode
from dmr.rundir import read_jsonl, rewrite


def token_kl(high: Scored, low: Scored) -> tuple[list[float], list[float], int]:
    """KL(p_high || p_low) at each continuation position, bf16's mass at each position whose low
    probability is unknown (0 for exact distributions), and how many bf16 top-k tokens were
    missing from the low model's top-k (see the module docstring)."""
    if high.token_ids != low.token_ids:
        raise ValueError("high and low were scored on different continuation tokens")
    if high.dist is not None and low.dist is not None:
        h, l = torch.as_tensor(high.dist).float(), torch.as_tensor(low.dist).float()
        if h.shape != l.shape:
            raise ValueError(f"distribution shapes differ: {tuple(h.shape)} vs {tuple(l.shape)} (same tokenizer?)")
        kl = (h.exp() * (h - l)).sum(-1).clamp(min=0.0)
        return kl.tolist(), [0.0] * len(kl), 0
    if high.topk is None or low.topk is None:
        raise ValueError("scores carry neither full distributions nor top-k log-probs")
    kls, unknown, missing = [], [], 0
    for t, ((h_ids, h_lp), (l_ids, l_lp)) in enumerate(zip(high.topk, low.topk, strict=True)):
        kl, rest, miss = topk_kl(dict(zip(h_ids, h_lp)), dict(zip(l_ids, l_lp)), high.token_ids[t],
                                 high.logprobs[t], low.logprobs[t])
        kls.append(kl)
        unknown.append(rest)
        missing += miss
    return kls, unknown, missing


def topk_kl(high: dict[int, float], low: dict[int, float], token: int, high_lp: float,
            low_lp: float) -> tuple[float, float, int]:
    """The least KL(p_high || p_low) at one position consistent with each model's top-k log-probs
    (`high`, `low`: token id -> log-prob) and both exact log-probs of the scored `token`.

    Tokens in both maps (and `token`) are exact terms. A token in bf16's top-k only has a low
    probability q <= the low model's smallest top-k probability f; the rest of the vocabulary is one
    bucket. Minimising sum_M p log(p/q) + P log(P/Q) under sum_M q + Q = (low's unknown mass) and
    q <= f gives q = min(f, p/lam) and Q = P/lam: the tokens with the largest p are clamped at f
    one by one until the bucket's ratio lam no longer pushes the next one above f. Returns the KL,
    bf16's mass with unknown low probability, and the count of bf16 top-k tokens missing from the
    low top-k."""
    high, low = {**high, token: high_lp}, {**low, token: low_lp}
    floor = math.exp(min(lp for t, lp in low.items() if t != token)) if len(low) > 1 else 1.0
    kl, p_known, q_known, outside = 0.0, 0.0, 0.0, []
    for t, lp in high.items():
        p = math.exp(lp)
        if t in low:
            kl += p * (lp - low[t])
            p_known += p
            q_known += math.exp(low[t])
        else:
            outside.append(p)
    p_rest = max(0.0, 1.0 - p_known)  # bf16 mass whose low probability is unknown
    q_free = max(0.0, 1.0 - q_known)  # low mass left for those tokens and the bucket
    outside.sort(reverse=True)
    bucket_p = p_rest - sum(outside)
    if bucket_p < 0:  # rounding of the returned log-probs
        bucket_p = 0.0
    clamped = 0
    for p in outside:  # water-filling: clamp the largest p at the floor while the ratio demands it
        p_left, q_left = bucket_p + sum(outside[clamped:]), q_free - clamped * floor
        if q_left <= 0 or p * q_left <= floor * p_left:
            break
        clamped += 1
    for p in outside[:clamped]:
        kl += p * math.log(p / floor)
    p_left, q_left = bucket_p + sum(outside[clamped:]), q_free - clamped * floor
    if p_left > 1e-12:
        kl += p_left * math.log(p_left / max(q_left, 1e-12))
    return max(0.0, kl), p_rest, len(outside)


def action_entropy(scored: Scored) -> float | None:
    """Mean entropy of the model's next-token distribution over an action block (teacher-forced);
    None from top-k scores."""
    if scored.dist is None or not len(scored.token_ids):
        return None
    lp = torch.as_tensor(scored.dist).float()
    return float(-(lp.exp() * lp).sum(-1).mean())


def uncertainty(high: Scored, low: Scored) -> dict:
    """Cheap signals beside the KL, for the diagnostics (dmr.diagnose): the low model's own
    uncertainty over the action block (entropy, mean and max over positions; the top-1 margin at
    the first position), bf16's entropy, and whether the two precisions' greedy tokens disagree at
    any position (teacher-forced on bf16's action). Full distributions only (the HF backend);
    None from top-k scores."""
    if high.dist is None or low.dist is None or not len(high.token_ids):
        return {"low_entropy": None, "low_entropy_max": None, "low_margin": None, "high_entropy": None,
                "greedy_mismatch": None}
    h, lo = torch.as_tensor(high.dist).float(), torch.as_tensor(low.dist).float()

    def entropy(lp):
        return -(lp.exp() * lp).sum(-1)

    ent = entropy(lo)
    top2 = lo[0].exp().topk(2).values
    return {"low_entropy": float(ent.mean()), "low_entropy_max": float(ent.max()),
            "low_margin": float(top2[0] - top2[1]), "high_entropy": float(entropy(h).mean()),
            "greedy_mismatch": bool((h.argmax(-1) != lo.argmax(-1)).any())}


BLOCKS = ("action", "output")


def action_positions(tokenizer, style, text: str, token_ids: list[int]) -> list[int] | None:
    """The positions of `text`'s tokens (`token_ids`, its encoding) that lie in its action block:
    those with a character outside the style's reasoning spans. None where the whole output is the
    block (no reasoning), and also where nothing is left (an output that is all reasoning)."""
    spans = style.reasoning(text)
    if not spans:
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(token_ids):
        raise ValueError("the scored continuation's tokens differ from the tokenizer's encoding of its text: "
                         "cannot locate the action block (a fast tokenizer with offsets is needed)")

    def reasoning(start, end):
        if end <= start:  # an empty offset (a trimmed whitespace token): where it starts
            return any(a <= start < b for a, b in spans)
        return any(a <= start and end <= b for a, b in spans)

    keep = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if not reasoning(a, b)]
    return keep or None


def restrict(scored: Scored, positions: list[int]) -> Scored:
    """`scored` at the given continuation positions only."""
    dist = None if scored.dist is None else torch.as_tensor(scored.dist)[torch.tensor(positions, dtype=torch.long)]
    return Scored(token_ids=[scored.token_ids[i] for i in positions], logprobs=[scored.logprobs[i] for i in positions],
                  dist=dist, topk=None if scored.topk is None else [scored.topk[i] for i in positions])


def scored_block(high: Scored, low: Scored, text: str, tokenizer, style, block: str = "action") -> tuple[Scored, Scored]:
    """Both scores of the continuation `text` restricted to the part the step KL measures: its action
    block (`block` "action") or all of it ("output"); see the module docstring. Unchanged where the
    output has no reasoning."""
    if block not in BLOCKS:
        raise ValueError(f"unknown KL block {block!r}; expected one of {BLOCKS}")
    positions = action_positions(tokenizer, style, text, high.token_ids) if block == "action" else None
    if positions is None:
        return high, low
    return restrict(high, positions), restrict(low, positions)


def step_kl(high: Scored, low: Scored) -> dict:
    kls, unknown, missing = token_kl(high, low)
    n = max(1, len(kls))
    return {"kl": sum(kls) / n, "kl_sum": sum(kls), "kl_max": max(kls, default=0.0), "tokens": len(kls),
            "kl_unknown_mass": sum(unknown) / n, "kl_topk_missing": missing}


def episodes_of(run: Path) -> list[tuple[dict, list[dict]]]:
    """(episode row, its step rows in order) of a finished rollout directory."""
    import polars as pl

    eps = pl.read_parquet(run / "episodes.parquet").to_dicts()
    steps = pl.read_parquet(run / "steps.parquet").sort("task", "step").to_dicts()
    by_task: dict[str, list[dict]] = {}
    for s in steps:
        by_task.setdefault(s["task"], []).append(s)
    return [(e, by_task.get(e["task"], [])) for e in eps]


def executed(step: dict) -> str:
    """The action text the environment received at a step (a malformed output went as-is)."""
    return step["action"] if step["action"] is not None else step["output"].strip()


def replay(episodes, style, high, low, quant: str, out_f, batch: int = 16, progress: bool = True,
           block: str = "action") -> None:
    """Score every step of `episodes` under `high` and `low`; one JSON row per step to `out_f`, its KL
    over the step's action block or (`block` "output") its whole output.

    Episodes run concurrently, `batch` at a time, so each call scores one step of many episodes and
    both backends keep a prefix cache per episode."""
    pending = deque(episodes)
    active: list[list] = []  # [episode row, steps, next step index, Episode]
    bar = tqdm(total=len(pending), desc=f"kl {quant}", disable=not progress)
    while pending or active:
        while pending and len(active) < batch:
            ep, steps = pending.popleft()
            if not steps:
                bar.update(1)
                continue
            active.append([ep, steps, 0, Episode(ep["goal"], steps[0]["observation"], [], steps[0].get("admissible") or [])])
        if not active:
            break
        texts, conts, keys = [], [], []
        for ep, steps, t, view in active:
            texts.append(style.render(high.tokenizer, view))
            conts.append(steps[t]["output"])
            keys.append(ep["task"])
        scored_h = high.score(texts, conts, sessions=keys)
        scored_l = low.score(texts, conts, sessions=keys)
        still = []
        for slot, h, l, cont in zip(active, scored_h, scored_l, conts):
            ep, steps, t, view = slot
            s = steps[t]
            n_output = len(h.token_ids)
            h, l = scored_block(h, l, cont, high.tokenizer, style, block)
            out_f.write(json.dumps({
                "task": ep["task"], "step": t, "quant": quant, "step_type": s.get("step_type", "action"),
                **step_kl(h, l), **uncertainty(h, l), "kl_block": block, "output_tokens": n_output,
                "goal": ep["goal"], "prev_action": s["prev_action"],
                "observation": s["observation"],
                "action": executed(s), "won": ep["won"], "steps": ep["steps"]}) + "\n")
            if t + 1 < len(steps):
                nxt = steps[t + 1]
                view.history.append((executed(s), nxt["observation"]))
                view.admissible = nxt.get("admissible") or []
                slot[2] = t + 1
                still.append(slot)
            else:
                out_f.flush()
                for b in (high, low):
                    b.end_session(ep["task"])
                bar.update(1)
        active = still
    bar.close()


def main(argv=None):
    import polars as pl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[cli.backend(), cli.kl_block()])
    p.add_argument("--rollout", required=True, type=Path, help="finished high-precision rollout directory (dmr.agent)")
    p.add_argument("--high", required=True, help="high-precision checkpoint (the one that rolled out)")
    p.add_argument("--low", required=True, help="low-precision checkpoint")
    p.add_argument("--quant", required=True, help="name of the low precision, stored with every row")
    p.add_argument("--batch", type=int, default=16, help="episodes replayed concurrently")
    p.add_argument("--out", required=True, type=Path, help="output steps.parquet (kl.jsonl beside it resumes)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    spec_path = a.rollout / "spec.json"
    if not spec_path.exists() or not (a.rollout / "steps.parquet").exists():
        raise SystemExit(f"{a.rollout}: not a finished rollout (needs spec.json and steps.parquet)")
    spec = json.loads(spec_path.read_text())
    if spec.get("policy") != "full":
        raise SystemExit(f"{a.rollout}: KL supervision needs a high-precision (policy full) rollout, got {spec.get('policy')!r}")
    style = prompts.get(**spec["agent"]["prompt"])
    episodes = episodes_of(a.rollout)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = a.out.with_suffix(".jsonl")
    # Resume: keep the steps of fully replayed episodes scored on the same block, redo the rest.
    rows = [r for r in read_jsonl(jsonl) if r.get("kl_block") == a.kl_block]
    n_steps = {e["task"]: len(s) for e, s in episodes}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["task"]] = counts.get(r["task"], 0) + 1
    done = {t for t, c in counts.items() if c == n_steps.get(t)}
    rewrite(jsonl, [r for r in rows if r["task"] in done])
    kwargs = json.loads(a.backend_kwargs)
    high, low = llm.load(a.backend, a.high, **kwargs), llm.load(a.backend, a.low, **kwargs)
    with jsonl.open("a") as f:
        replay([(e, s) for e, s in episodes if e["task"] not in done], style, high, low, a.quant, f, a.batch,
               not a.quiet, a.kl_block)
    df = pl.DataFrame(read_jsonl(jsonl), infer_schema_length=None).sort("task", "step")
    df.write_parquet(a.out)
    q = df["kl"].quantile
    print(f"{len(df)} steps of {df['task'].n_unique()} episodes; KL median {q(0.5):.2e}, p90 {q(0.9):.2e}, "
          f"p99 {q(0.99):.2e}, max {df['kl'].max():.2e} -> {a.out}")
    if "kl_unknown_mass" in df.columns and (df["kl_unknown_mass"].max() or 0) > 0:
        # top-k scores: how much of bf16's mass the least consistent KL had to bound
        print(f"bf16 mass with unknown low-precision probability: mean {df['kl_unknown_mass'].mean():.2e}, "
              f"max {df['kl_unknown_mass'].max():.2e} (the KL is a lower bound there; raise top_logprobs)")


if __name__ == "__main__":
    main()
