"""Train the tiny Qwen3-architecture agent from scratch by behaviour cloning of expert steps.

It trains on exactly the prompt the agent sees at run time (dmr.prompts) with the loss on the
answer only. Batches group examples of similar length so little compute goes to padding, which
matters on a 2-core CPU where optimizer steps are the bottleneck. Saved in HF format with bf16
weights (hidden sizes multiples of 128, so group-128 quantization applies).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dmr import prompts
from dmr.expert import read_episodes, sequences

ARCH_DEFAULTS = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)


def build_model(vocab_size: int, arch: dict):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = {**ARCH_DEFAULTS, **arch}
    for key in ("hidden_size", "intermediate_size"):
        if cfg[key] % 128:
            raise ValueError(f"arch.{key}={cfg[key]} must be a multiple of 128 for group-128 quantization")
    config = Qwen3Config(vocab_size=vocab_size, tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=None, **cfg)
    return Qwen3ForCausalLM(config)


def encode_sequences(episodes, tokenizer, style, max_len: int, context_weight: float = 0.0,
                     noise_weight: float = 0.0):
    """(token ids, per-token loss weights) per behaviour-cloning sequence; pieces are encoded one by
    one, exactly as the prompt and the completion are at run time. Answer tokens weigh 1, the
    context (task, observations) `context_weight`, and an executed action that was injected noise
    `noise_weight`: above 0 the agent learns to emit the noise it was shown (a floor on its
    confidence at every step, and repeated actions, the loop the noise is there to break)."""
    weights = {True: 1.0, False: context_weight, None: noise_weight}  # answer, context, injected noise
    out = []
    for ep in episodes:
        for seq in sequences(ep, style, tokenizer):
            ids, sup = [], []
            for text, supervised in seq:
                piece = tokenizer.encode(text, add_special_tokens=False)
                ids += piece
                sup += [weights[supervised]] * len(piece)
            if len(ids) > max_len:
                raise ValueError(f"a sequence of {len(ids)} tokens exceeds max_position_embeddings={max_len}; "
                                 "shorten the prompt window or raise arch.max_position_embeddings")
            out.append((ids, sup))
    return out


def batches(data, batch_tokens: int, rng: random.Random):
    """Length-bucketed batches of at most `batch_tokens` padded tokens, in random order."""
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]) + rng.random())
    out, cur, width = [], [], 0
    for i in order:
        n = len(data[i][0])
        if cur and max(width, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, n)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(data, idx, pad_id: int):
    width = max(len(data[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    weights = torch.zeros((len(idx), width), dtype=torch.float32)
    for r, i in enumerate(idx):
        seq, sup = data[i]
        ids[r, :len(seq)] = torch.tensor(seq)
        weights[r, :len(seq)] = torch.tensor(sup, dtype=torch.float32)
    return ids, weights


def answer_loss(model, ids, weights):
    """Weighted mean cross-entropy of the next tokens. No attention mask: padding sits at the right,
    where causal attention keeps it from every real token (and SDPA's causal path is faster)."""
    logits = model(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           ids[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    return (ce * w).sum() / w.sum()


def save_model(model, tokenizer, out: Path):
    # bf16 on disk (llmcompressor and vLLM load it); the copy keeps the training model in fp32.
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def train(episodes, tokenizer, out: Path, *, style, arch: dict, steps: int, max_minutes: float,
          batch_tokens: int, lr: float, warmup: int, seed: int, threads: int | None, val_fraction: float = 0.05,
          context_weight: float = 0.0, noise_weight: float = 0.0,
          snapshot_at: tuple = (), snapshots: Path | None = None):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    episodes = list(episodes)
    rng.shuffle(episodes)
    n_val = max(1, int(len(episodes) * val_fraction))
    max_len = arch.get("max_position_embeddings", ARCH_DEFAULTS["max_position_embeddings"])
    train_data = encode_sequences(episodes[n_val:], tokenizer, style, max_len, context_weight, noise_weight)
    # Validation stays the answers-only loss, comparable across context weights.
    val_data = encode_sequences(episodes[:n_val], tokenizer, style, max_len)
    model = build_model(len(tokenizer), arch)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.time()

    def progress(s: int) -> float:
        # Steps alone drive the schedule and the snapshots, so a busy machine trains the same model.
        return min(1.0, s / steps)

    def lr_factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(s))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    pad = tokenizer.pad_token_id
    curve, step, queue = [], 0, []
    pending = sorted(snapshot_at)

    def snapshot(fraction: float):
        d = snapshots / f"p{fraction:.2f}"
        save_model(model, tokenizer, d)
        (d / "snapshot.json").write_text(json.dumps({"step": step, "progress": round(progress(step), 4)}))
    model.train()
    bar = tqdm(total=steps, desc="behaviour cloning")
    while step < steps and time.time() - start < max_minutes * 60:
        if not queue:
            queue = batches(train_data, batch_tokens, rng)
        loss = answer_loss(model, *collate(train_data, queue.pop(), pad))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % 25 == 0:
            curve.append({"step": step, "minutes": (time.time() - start) / 60, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        # Every fraction crossed gets its directory, so each configured candidate exists even when
        # one step crosses several.
        for f in [f for f in pending if progress(step) >= f]:
            pending.remove(f)
            snapshot(f)
    bar.close()
    capped = step < steps
    if capped:
        # The time cap is a safety net, not a stopping rule: say so loudly, and record it.
        print(f"WARNING: training cut by its {max_minutes}-minute safety cap at step {step} of {steps}; "
              "this model is not the recipe's (raise max_minutes or free the machine)", file=sys.stderr)
    for f in pending:  # not reached: a run cut short by its time cap snapshots its end
        snapshot(f)
    model.eval()
    with torch.no_grad():
        vb = batches(val_data, batch_tokens, random.Random(0))
        val = sum(answer_loss(model, *collate(val_data, b, pad)).item() * len(b) for b in vb) / len(val_data)
    save_model(model, tokenizer, out)
    metrics = {"params": n_params, "steps": step, "planned_steps": steps, "capped": capped, "minutes": (time.time() - start) / 60,
               "train_sequences": len(train_data), "val_sequences": len(val_data), "val_answer_loss": val,
               # Tokens at full weight: the answers (every token where context_weight is 1).
               "supervised_tokens": sum(sum(w == 1.0 for w in sup) for _, sup in train_data),
               "context_weight": context_weight, "noise_weight": noise_weight,
               "train_tokens": sum(len(ids) for ids, _ in train_data), "prompt": style.name, "curve": curve}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv=None):
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--episodes", required=True, type=Path, help="expert episodes JSONL (dmr.expert)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (dmr.tokenizer)")
    p.add_argument("--prompt", default='{"style": "react"}', help="JSON prompt style spec (dmr.prompts)")
    p.add_argument("--arch", default="{}", help="JSON overrides of the Qwen3 config, e.g. hidden_size")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--max-minutes", type=float, default=600.0,
                   help="safety cap on wall time; a run it cuts warns loudly and records capped: true")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-weight", type=float, default=0.0,
                   help="loss weight of the context tokens (task, observations) beside the answers' 1")
    p.add_argument("--noise-weight", type=float, default=0.0,
                   help="loss weight of an executed action that was injected noise (0: shown, never learned)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--snapshot-at", default="", help="comma-separated training progress fractions to snapshot at")
    p.add_argument("--snapshots", type=Path, default=None, help="directory of the snapshots")
    p.add_argument("--out", required=True, type=Path, help="output HF model directory")
    a = p.parse_args(argv)
    if a.snapshot_at and a.snapshots is None:
        p.error("--snapshot-at needs --snapshots (where the snapshots go)")
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    m = train(read_episodes(a.episodes), tok, a.out, style=prompts.get(**json.loads(a.prompt)), arch=json.loads(a.arch),
              steps=a.steps,
              max_minutes=a.max_minutes, batch_tokens=a.batch_tokens, lr=a.lr, warmup=a.warmup, seed=a.seed,
              threads=a.threads, context_weight=a.context_weight, noise_weight=a.noise_weight,
              snapshot_at=tuple(float(f) for f in a.snapshot_at.split(",") if f),
              snapshots=a.snapshots)
    print(json.dumps({k: v for k, v in m.items() if k != "curve"}))


if __name__ == "__main__":
    main()
