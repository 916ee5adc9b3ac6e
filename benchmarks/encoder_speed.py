"""The KL-ST router's step encoder (all-MiniLM-L6-v2) in cheaper arithmetic: speed and decisions.

For fp32 (the paper's, route.router.encoder_quant: none) and each variant, in one run on the same
step texts: the encode time at batch 1 and 16 (median over repeats, the variants interleaved so that
a busy machine slows them alike) as a ratio to fp32's; and how far the variant moves a trained text
router's decisions on a pool of household steps: the share of identical decisions at each budget K
and the Spearman correlation of the scores with fp32's.

The pool is expert household episodes with noise (dmr.expert), each step's text as the router sees
it (dmr.routing.step_text). Its labels are a stand-in for 1[KL > tau], which needs an LLM pair: a
step "needs high precision" when the expert's next action handles an object (not "go to", "open",
"look", ...). What matters is a router trained on fp32 embeddings whose scores depend on the texts;
the variant's embeddings are fed to that same router. K's threshold is calibrated as dmr.calibrate
does (the score above which a share K of the steps lies), either on fp32's scores and kept ("fp32
thr") or on the variant's own scores ("own thr", what a workflow run that calibrates with the
variant would do).

Variants: bf16 and int8 are the config options (dmr.router.ENCODER_QUANTS); int8-tensor is torch's
quantize_dynamic with its default per-tensor weights; torchao-int8 (torchao's int8 dynamic
activations and weights, torch's recommended successor of quantize_dynamic) runs only where torchao
is importable; it is not a dependency.

    python benchmarks/encoder_speed.py            # ~1 minute on 2 busy cores
    python benchmarks/encoder_speed.py --seed 1 --episodes 80   # another, larger pool
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dmr import klst
from dmr.router import ENCODER_QUANTS, RouterNet, StepEncoder

MOVES = ("go to", "open", "close", "look", "inventory", "examine")  # the stand-in label's "low" actions


def pool(episodes: int, seed: int):
    """(steps table as dmr.klst reads it, one row per step sorted by task and step) of noisy expert
    household episodes; kl is the stand-in label (1.0 where the expert's next action handles an object)."""
    import json

    import polars as pl

    from dmr import expert

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "episodes.jsonl"
        expert.main(["--env", "household", "--episodes", str(episodes), "--noise", "0.2", "--seed", str(seed),
                     "--out", str(out)])
        eps = [json.loads(x) for x in out.read_text().splitlines()]
    rows = []
    for e in eps:
        for i, s in enumerate(e["steps"]):
            rows.append({"task": e["task"], "step": i, "step_type": "action",
                         "kl": 0.0 if s["label"].startswith(MOVES) else 1.0, "goal": e["goal"],
                         "prev_action": e["steps"][i - 1]["action"] if i else "", "observation": s["obs"]})
    return pl.DataFrame(rows).sort("task", "step")


def variants() -> dict[str, StepEncoder]:
    """name -> encoder; fp32 first."""
    out = {"fp32" if q == "none" else q: StepEncoder(memo=0, quant=q) for q in ENCODER_QUANTS}
    tensor = StepEncoder(memo=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor.model = torch.ao.quantization.quantize_dynamic(tensor.model, {torch.nn.Linear}, dtype=torch.qint8)
    out["int8-tensor"] = tensor
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print("torchao not importable: no torchao-int8 row")
    else:
        ao = StepEncoder(memo=0)
        quantize_(ao.model, Int8DynamicActivationInt8WeightConfig())
        out["torchao-int8"] = ao
    return out


def timings(encoders: dict[str, StepEncoder], texts: list[str], batch: int, repeats: int) -> dict[str, float]:
    """name -> median seconds per encode call of `batch` texts (memo 0: every call encodes)."""
    times = {n: [] for n in encoders}
    chunks = [texts[k:k + batch] for k in range(0, len(texts) - batch + 1, batch)][:repeats]
    for chunk in chunks:
        for n, e in encoders.items():  # interleaved: load on the machine hits every variant alike
            t0 = time.perf_counter()
            e.encode(chunk, batch_size=batch)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=40, help="expert household episodes in the pool")
    p.add_argument("--repeats", type=int, default=40, help="timed encode calls per batch size and variant")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4, 0.7])
    p.add_argument("--epochs", type=int, default=15, help="router training epochs (on fp32 embeddings)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    df = pool(a.episodes, a.seed)
    encoders = variants()
    texts = klst.step_texts(df)
    uniq = list(dict.fromkeys(texts))
    random.Random(a.seed).shuffle(uniq)
    for e in encoders.values():  # warm-up: first calls allocate
        e.encode(uniq[:16], batch_size=16)
    speed = {b: timings(encoders, uniq, b, a.repeats) for b in (1, 16)}

    # One router, trained on fp32 embeddings (as the paper's), read through every variant's embeddings.
    wins, rows = klst.windows(df, 50, ["action"])
    y = [0 if v > 0.5 else 1 for v in df["kl"].to_numpy()[rows]]
    emb = {n: klst.features(e, "text", None, df, progress=False) for n, e in encoders.items()}
    torch.manual_seed(a.seed)
    net = RouterNet(in_dim=384, layers=2, d_model=128, heads=4, ff=256, window=50, dropout=0.1)
    tasks = df["task"].to_numpy()[rows]
    val = set(sorted(set(tasks))[::7])
    train_idx = [i for i, t in enumerate(tasks) if t not in val]
    val_idx = [i for i, t in enumerate(tasks) if t in val]
    fit = klst.train(net, emb["fp32"], wins, y, train_idx, val_idx, a.epochs, 64, 1e-3, a.seed, progress=False)
    scores = {n: klst.predict(net, x, wins)[:, 0].numpy() for n, x in emb.items()}
    ref = scores["fp32"]

    from scipy.stats import spearmanr

    def thr(s, k):
        return float(np.quantile(s, 1 - k))  # a share k of the steps scores at or above it

    print(f"pool: {a.episodes} expert household episodes, {len(rows)} steps ({len(uniq)} distinct texts), "
          f"{100 * (1 - np.mean(y)):.0f}% stand-in positives; router 2 layers, d_model 128, window 50, "
          f"val balanced accuracy {fit['val_bacc']:.3f}; torch threads {torch.get_num_threads()}")
    same = "".join(f"{'K=' + format(k, 'g'):>9}" for k in a.budgets)
    print(f"{'encoder':<14}{'b1 ms':>7}{'b1 x':>6}{'b16 ms':>8}{'b16 x':>6}{'cos min':>9}"
          f"{'spearman':>10}  identical, fp32 thr:{same}  own thr:{same}")
    fp = emb["fp32"]
    for n, s in scores.items():
        cos = torch.nn.functional.cosine_similarity(fp, emb[n]).min().item()
        fixed = [np.mean((s >= thr(ref, k)) == (ref >= thr(ref, k))) for k in a.budgets]
        own = [np.mean((s >= thr(s, k)) == (ref >= thr(ref, k))) for k in a.budgets]
        rho = spearmanr(ref, s).statistic
        print(f"{n:<14}{1e3 * speed[1][n]:>7.2f}{speed[1]['fp32'] / speed[1][n]:>6.2f}"
              f"{1e3 * speed[16][n]:>8.1f}{speed[16]['fp32'] / speed[16][n]:>6.2f}{cos:>9.4f}{rho:>10.4f}"
              f"{'':21}" + "".join(f"{100 * v:>8.1f}%" for v in fixed) + f"{'':9}"
              + "".join(f"{100 * v:>8.1f}%" for v in own))
    print(f"x: fp32 time / variant time (higher is faster); cos min: the least cosine to fp32's embedding over "
          f"the pool's texts; {time.time() - t_start:.0f} s in all")


if __name__ == "__main__":
    main()
