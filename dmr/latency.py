"""Latency calibration (paper App. A) and the episode cost model (Eq. 9).

Per-token coefficients c_p (App. A.1): over the single-precision baseline runs of a precision, the
total elapsed LLM call time divided by the total completion tokens. Prefill is thereby amortised
into the per-token cost. Each step row carries the elapsed time of the batched call its session
waited for (`llm_time`), so the sum over rows is the sum over sessions, as with the paper's
per-request timing under 16-shard concurrency.

Per-call router coefficient c_router (App. A.2): a randomly initialised router (so timing does not
depend on which steps a trained policy selects) replays recorded episodes with the same number of
concurrent episodes as the agent. Each session waits for the whole batched decision, so every
router-decided step is charged the elapsed time of its batch; forced (non-eligible) steps are
encoded, since later steps need them, but are not counted. Replaying recorded step texts measures
the same `Router.decide` the agent calls, without decoding with an LLM again.

Projected W3 coefficient (App. A.3): a 3-bit checkpoint without a native 3-bit kernel runs no faster
than W4, so its coefficient is projected as c_W4 / 1.15.

Where the quantized models run dequantized (this CPU path), measured coefficients show no speedup;
`source: config` takes the coefficients from the config instead (e.g. the paper's Table 3). Either
way coefficients.json records which, and every table built from it says so.

Cost model (Eq. 9): T = n * c_router + c_hi * N_hi + c_lo * N_lo, and with more than two
precisions T = n * c_router + sum_p c_p * N_p over every precision p (`precisions_of` names them
from a routed scheme: `a+b` routes bf16, a and b). n counts the router-decided
steps of the episode, as App. A.2 counts them for c_router: a step forced to the high precision by
an exogenous rule (WebShop's search steps under a KL-ST router, App. C.1) is not a router call, and
a single-precision run (Full, Quant) has none. One function, `router_calls`, gives n to Table 1's
modelled time (dmr.evaluate) and to the GRPO reward (dmr.grpo). A step the router decided is one
with a route score (dmr.routing: `last_scores` is None where the router did not decide).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import polars as pl

from dmr.policy_name import scheme_lows
from dmr.routing import replay_contexts

W3_FACTOR = 1.15


def token_coefficient(steps: list[pl.DataFrame]) -> dict:
    """Pooled per-token coefficient (s/token) of the step tables of one precision's runs."""
    df = pl.concat([s.select("llm_time", "completion_tokens") for s in steps])
    tokens, elapsed = int(df["completion_tokens"].sum()), float(df["llm_time"].sum())
    if tokens == 0:
        raise ValueError("no completion tokens in the baseline runs: cannot compute a per-token coefficient")
    return {"coef": elapsed / tokens, "time": elapsed, "tokens": tokens, "calls": df.height}


def w3_projection(quants: list[str], w4: dict[str, float], factor: float = W3_FACTOR) -> dict[str, tuple[str, float]]:
    """For each W3 scheme: (the W4 scheme it is projected from, c_W4 / factor). The W4 scheme of
    the same method is preferred, else the first W4 scheme of the cell."""
    out = {}
    for q in quants:
        if not re.search(r"_w3a", q):
            continue
        same = q.replace("_w3a", "_w4a")
        src = same if same in w4 else next(iter(w4), None)
        if src is None:
            raise ValueError(f"{q}: a projected W3 coefficient needs a W4 scheme in the cell")
        out[q] = (src, w4[src] / factor)
    return out


def episode_cost(n: int, n_hi: int, n_lo: int, c_router: float, c_hi: float, c_lo: float) -> float:
    """Eq. 9: modelled execution time of one trajectory."""
    return eq9(n, {"hi": n_hi, "lo": n_lo}, c_router, {"hi": c_hi, "lo": c_lo})


def eq9(n: int, tokens: dict[str, int], c_router: float, c: dict[str, float]) -> float:
    """Eq. 9 over any number of precisions: n router calls plus each precision's completion tokens at
    its coefficient, summed in `tokens`' order."""
    t = n * c_router
    for q, k in tokens.items():
        t += c[q] * k
    return t


def router_decided(step: dict) -> bool:
    """Whether the router decided a step (a router call of Eq. 9): the step has a route score. Forced
    steps and the steps of single-precision runs have none."""
    return step.get("route_score") is not None


def router_calls(steps) -> dict[str, int]:
    """Eq. 9's n per episode (task key): the router-decided steps among `steps` (step rows: dicts
    with `task` and `route_score`, or a steps table), forced ones excluded (App. A.2)."""
    rows = steps.select("task", "route_score").iter_rows(named=True) if isinstance(steps, pl.DataFrame) else steps
    n: dict[str, int] = {}
    for s in rows:
        n[s["task"]] = n.get(s["task"], 0) + router_decided(s)
    return n


def precisions_of(coef: dict, quant: str) -> list[str]:
    """The precisions a routed scheme names, high first: `QUANT` is bf16 and QUANT, `A+B` bf16, A
    and B (a three-precision cell), and the high precision alone is itself."""
    lows = [q for q in scheme_lows(quant) if q != coef["high"]]
    return [coef["high"], *lows]


def per_token(coef: dict, precisions: list[str]) -> dict[str, float]:
    """Each precision's per-token coefficient (s/token) from coefficients.json."""
    missing = [q for q in precisions if q not in coef["per_token"]]
    if missing:
        raise ValueError(f"no latency coefficient for {missing}; have {sorted(coef['per_token'])}")
    return {q: coef["per_token"][q] for q in precisions}


def episode_tokens(steps, precisions: list[str]) -> dict[str, dict[str, int]]:
    """Per episode (task key), the completion tokens written at each of `precisions`, in their order,
    from step rows (dicts with `task`, `precision`, `completion_tokens`, or a steps table); a step at
    another precision is an error, not free."""
    rows = steps.iter_rows(named=True) if isinstance(steps, pl.DataFrame) else steps
    tokens: dict[str, dict[str, int]] = {}
    for s in rows:
        if s["precision"] not in precisions:
            raise ValueError(f"episode {s['task']} has a step at {s['precision']!r}; costs are for {list(precisions)}")
        per = tokens.setdefault(s["task"], dict.fromkeys(precisions, 0))
        per[s["precision"]] += s["completion_tokens"]
    return tokens


def trajectory_costs(steps, c_router: float, c: dict[str, float]) -> dict[str, float]:
    """Eq. 9 per episode (task key) from its step rows (`episode_tokens`, plus `route_score` for the
    n router calls, `router_calls`), each precision's tokens at its coefficient `c`."""
    calls = router_calls(steps)
    return {t: eq9(calls.get(t, 0), per, c_router, c) for t, per in episode_tokens(steps, list(c)).items()}


def episodes_cost(episodes: pl.DataFrame, steps: pl.DataFrame, coef: dict, quant: str) -> pl.Series:
    """Eq. 9 for every row of an episodes table, with n and each precision's tokens from its steps
    table (`trajectory_costs`); `quant` names the routed precisions (`precisions_of`)."""
    cost = trajectory_costs(steps, coef["router"], per_token(coef, precisions_of(coef, quant)))
    return pl.Series([cost.get(t, 0.0) for t in episodes["task"]], dtype=pl.Float64)


def pair(coef: dict, quant: str) -> dict:
    """(high, low, router) coefficients in seconds for one routed scheme from coefficients.json."""
    if quant not in coef["per_token"]:
        raise ValueError(f"no latency coefficient for {quant!r}; have {sorted(coef['per_token'])}")
    return {"high": coef["per_token"][coef["high"]], "low": coef["per_token"][quant], "router": coef["router"]}


def config_coefficients(given: dict, quants: list[str], high: str = "bf16") -> tuple[dict, dict]:
    """Coefficients from the config, in ms: `bf16`, per scheme, `low` for any scheme not listed,
    `router`. Returns (per_token s/token, router s/call)."""
    missing = [k for k in (high, "router") if k not in given]
    if missing:
        raise ValueError(f"latency.coefficients needs {missing} (ms/token, ms/call)")
    per = {high: given[high] / 1e3}
    for q in quants:
        if q not in given and "low" not in given:
            raise ValueError(f"latency.coefficients has no value for {q!r} and no `low` default")
        per[q] = given.get(q, given.get("low")) / 1e3
    return per, given["router"] / 1e3


def router_coefficient(router, episodes_ctx, shards: int, limit: int | None = None, progress: bool = True) -> dict:
    """Per-call router cost (s): replay episodes `shards` at a time, like the agent, and charge each
    router-decided step the elapsed time of its batched decision."""
    from tqdm import tqdm

    queue = list(episodes_ctx[:limit] if limit else episodes_ctx)
    active, total, decided, calls = [], 0.0, 0, 0
    bar = tqdm(total=len(queue), desc="router replay", disable=not progress)
    while queue or active:
        while len(active) < shards and queue:
            active.append([queue.pop(0), 0])
        contexts = [ep[i] for ep, i in active]
        t0 = time.perf_counter()
        router.decide(contexts)
        elapsed = time.perf_counter() - t0
        calls += 1
        n = sum(x is not None for x in router.last_scores)  # router_decided: forced steps have no score
        total, decided = total + elapsed * n, decided + n
        for a in active:
            a[1] += 1
        for ep, i in [a for a in active if a[1] == len(a[0])]:
            router.end_session(ep[0].episode)
            bar.update(1)
        active = [a for a in active if a[1] < len(a[0])]
    bar.close()
    if decided == 0:
        raise ValueError("no router-decided steps in the replayed episodes")
    return {"coef": total / decided, "decided": decided, "batches": calls}


def table(coef: dict) -> pl.DataFrame:
    """Table 3: one row per scheme, coefficients in ms."""
    rows = []
    for q in coef["quants"]:
        c = pair(coef, q)
        rows.append({"cell": coef["cell"], "quant": q, "c_high_ms": 1e3 * c["high"], "c_low_ms": 1e3 * c["low"],
                     "c_router_ms": 1e3 * c["router"], "low_vs_high": c["low"] / c["high"],
                     "high_measured_ms": 1e3 * coef["measured"][coef["high"]]["coef"],
                     "low_measured_ms": 1e3 * coef["measured"][q]["coef"] if q in coef["measured"] else None,
                     "projected_from": coef["projected"].get(q), "t_ref_s": coef["t_ref"],
                     "source": coef["source"]})
    return pl.DataFrame(rows)


def markdown(df: pl.DataFrame, coef: dict) -> str:
    lines = [f"# Latency coefficients (Table 3): {coef['cell']}", "",
             "| Quant | c_high (ms/tok) | c_low (ms/tok) | c_router (ms/call) | low/high | measured c_high | measured c_low "
             "| T_ref (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.iter_rows(named=True):
        low = f"{r['c_low_ms']:.2f}" + (f" (proj. from {r['projected_from']})" if r["projected_from"] else "")
        meas = "–" if r["low_measured_ms"] is None else f"{r['low_measured_ms']:.2f}"
        lines.append(f"| {r['quant']} | {r['c_high_ms']:.2f} | {low} | {r['c_router_ms']:.2f} | {r['low_vs_high']:.2f} "
                     f"| {r['high_measured_ms']:.2f} | {meas} | {r['t_ref_s']:.2f} |")
    lines += ["", describe(coef)]
    return "\n".join(lines) + "\n"


def describe(coef: dict) -> str:
    """One line naming the coefficients a table used."""
    if coef["source"] == "config":
        how = "coefficients given in the config (latency.coefficients), not measured here"
    else:
        how = (f"coefficients measured here: elapsed call time / completion tokens pooled over the single-precision "
               f"baseline runs ({coef['runs']}); router per call from a randomly initialised router replaying "
               f"{coef['router_replay']['decided']} recorded steps")
    proj = "; ".join(f"{q} = {s} / {W3_FACTOR}" for q, s in coef["projected"].items())
    return f"Latency: {how}" + (f"; projected W3: {proj}" if proj else "") + \
        f"; T_ref = {coef['t_ref']:.2f} s (mean modelled bf16 episode)."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", required=True, help="cell name, e.g. household/tiny")
    p.add_argument("--high", nargs="+", required=True, type=Path, help="bf16 `full` run directories (test seeds)")
    p.add_argument("--low", nargs="+", action="append", required=True, metavar=("QUANT", "RUN"),
                   help="a scheme and its `quant` run directories (repeatable)")
    p.add_argument("--source", choices=("measured", "config"), default="measured")
    p.add_argument("--coefficients", type=json.loads, default=None,
                   help="JSON, ms: {\"bf16\": .., \"router\": .., QUANT or \"low\": ..} (with --source config)")
    p.add_argument("--no-w3-projection", action="store_true", help="the W3 checkpoints run a native 3-bit kernel")
    p.add_argument("--arch", type=json.loads, default={}, help="JSON RouterNet kwargs of the timed random router")
    p.add_argument("--shards", type=int, default=16, help="concurrent episodes of the router replay")
    p.add_argument("--replay", type=int, default=None, help="replay at most this many episodes")
    p.add_argument("--router-steps", nargs="+", default=["action"],
                   help="step types the router decides (the benchmark's router_steps); others are forced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="coefficients.json")
    p.add_argument("--table", required=True, type=Path, help="Table 3 parquet (a .md is written beside it)")
    a = p.parse_args(argv)
    quants = [q for q, *_ in a.low]
    if any(not runs for _, *runs in a.low):
        raise SystemExit("--low QUANT RUN...: give at least one run directory per scheme")
    read = lambda d: pl.read_parquet(Path(d) / "steps.parquet")  # noqa: E731
    measured = {"bf16": token_coefficient([read(d) for d in a.high])}
    for q, *runs in a.low:
        measured[q] = token_coefficient([read(d) for d in runs])
    coef = {"cell": a.cell, "source": a.source, "high": "bf16", "quants": quants,
            "measured": measured, "runs": len(a.high) + sum(len(r) for _, *r in a.low), "projected": {}}
    if a.source == "config":
        if not a.coefficients:
            raise SystemExit("--source config needs --coefficients (latency.coefficients in the config)")
        coef["per_token"], coef["router"] = config_coefficients(a.coefficients, quants)
    else:
        # torch only when a router is timed: evaluate, rank and grpo import this module for its cost model.
        import torch

        from dmr.router import Router, RouterNet, StepEncoder

        per = {k: v["coef"] for k, v in measured.items()}
        if not a.no_w3_projection:
            w4 = {q: per[q] for q in quants if "_w4a" in q}
            for q, (src, value) in w3_projection(quants, w4).items():
                per[q] = value
                coef["projected"][q] = src
        torch.manual_seed(a.seed)
        # The arithmetic the routers' text encoder runs in (route.router.encoder_quant), as they deploy.
        encoder = StepEncoder(quant=a.arch.get("encoder_quant", "none"))
        ctx = replay_contexts(read(a.high[0]), pl.read_parquet(a.high[0] / "episodes.parquet"))
        eligible = tuple(a.router_steps)
        seen = {c.step_type for ep in ctx for c in ep}
        if not seen & set(eligible):
            # An agent that never reaches a router step (a shop agent that never gets past search):
            # time the router on every step rather than on none, and say so.
            print(f"no {list(eligible)} steps in the replayed episodes (types {sorted(seen)}): "
                  "the router is timed on every step")
            eligible = tuple(sorted(seen))
            coef["router_steps_fallback"] = list(eligible)
        # Timed with the text encoder whatever route.router.encoder says: a proposal router's cost is
        # the low model's decode (already in c_low for the steps it keeps low) plus one forward.
        arch = {k: v for k, v in a.arch.items() if k not in ("encoder", "encoder_quant")}
        router = Router(RouterNet(n_classes=2, in_dim=encoder.dim, **arch), encoder, ["bf16", quants[0]],
                        eligible=eligible)
        replay = router_coefficient(router, ctx, a.shards, a.replay)
        coef.update(per_token=per, router=replay["coef"], router_replay=replay)
    # T_ref: the modelled time of a bf16 episode, so that lambda weighs cost relative to Full.
    full = pl.concat([pl.read_parquet(Path(d) / "episodes.parquet") for d in a.high])
    coef["t_ref"] = float((full["tokens"] * coef["per_token"]["bf16"]).mean())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(coef, indent=1))
    df = table(coef)
    a.table.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.table)
    a.table.with_suffix(".md").write_text(markdown(df, coef))
    print(a.table.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
