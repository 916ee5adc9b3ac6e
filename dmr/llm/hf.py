"""HF transformers backend: exact full-vocabulary scores, runs every checkpoint on CPU or GPU.

On a CPU it computes in fp32 whatever the checkpoint dtype, because bf16 matmuls are 5-10x slower
there; on a GPU it uses bf16. Compressed-tensors (llmcompressor) checkpoints load decompressed.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dmr.llm.base import Generation, Sampling, Scored, cut_at_stop
from dmr.llm.kv import LRU, KVSessions
from dmr.llm.trie import Trie

_ATTENTION = "dmr_gqa"


def _additive_mask(*args, dtype: torch.dtype | None = None, **kwargs):
    """transformers' SDPA mask as an additive mask in the model's dtype, built once per forward:
    given a boolean mask, torch's CPU SDPA converts it to float in every layer, a quarter of a
    batched prefill. Masked scores get the dtype's minimum, not -inf: a pad row that sees nothing
    then averages finite values instead of turning NaN and poisoning the KV it leaves behind."""
    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool:
        return mask
    dtype = dtype or torch.float32
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


# (mask, its GQA-folded copy): every layer of a forward shares the mask. Per thread: the routing proxy
# (dmr.serve) runs its two in-process backends in request threads at once, and a shared cache let one
# forward take the other's folded mask between setting and reading it.
_folded = threading.local()


def _gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA over grouped-query KV without materialising the repeated heads: the query heads that
    share a KV head are folded into its query rows. transformers' sdpa path repeats K and V for
    every forward whenever a padding mask is present (always, for a batch of episodes), which cost
    a third of a CPU rollout."""
    B, H, q, D = query.shape
    kv_heads, L = key.shape[1], key.shape[2]
    rep = H // kv_heads
    if rep == 1 or attention_mask is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    folded = query.reshape(B, kv_heads, rep * q, D)
    mask = attention_mask
    if q > 1:
        # Folding copies the mask; the reference kept to the original makes the identity test exact.
        cached = getattr(_folded, "pair", None)
        if cached is None or cached[0] is not mask:
            m = mask.shape[1]
            cached = _folded.pair = mask, mask[:, :, None].expand(B, m, rep, q, L).reshape(B, m, rep * q, L)
        mask = cached[1]
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(B, H, q, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(_ATTENTION, _gqa_attention)
AttentionMaskInterface.register(_ATTENTION, _additive_mask)


def _decompressed(path: str) -> dict:
    """Load llmcompressor (compressed-tensors) checkpoints decompressed: dense fake-quantized
    weights run every scheme on any device, and faster on a CPU than per-call unpacking."""
    import json

    cfg = Path(path) / "config.json"
    q = json.loads(cfg.read_text()).get("quantization_config", {}) if cfg.exists() else {}
    if q.get("quant_method") != "compressed-tensors":
        return {}
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


class HFBackend:
    name = "hf"

    def __init__(self, model: str | Path, device: str = "auto", threads: int | None = None,
                 dtype: str = "auto", max_sessions: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.device = torch.device(device)
        self.path = str(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, dtype),
                                                          attn_implementation=_ATTENTION, **_decompressed(self.path))
        self.model.to(self.device).eval()
        for m in self.model.modules():
            if hasattr(m, "quantization_scheme"):
                # The decompressed weights already sit on the quantization grid; compressed-tensors
                # would fake-quantize them again on every forward (idempotent, 15% of a rollout).
                m.quantization_enabled = False
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.kv = KVSessions(self.model.config, self.model.dtype, self.device, self.pad_id, max_sessions)
        self._prompts = LRU(max_sessions)  # session -> (last prompt text, its token ids)
        self._options: dict[str, list[int]] = {}
        self._pieces: dict[int, str] = {}
        from tokenizers import decoders

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts in one call of the Rust tokenizer (per-call overhead dominates
        the short texts of a batched step)."""
        if not texts:
            return []
        return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _encode_prompts(self, texts: list[str], sessions: list[str] | None) -> list[list[int]]:
        """Token ids of the prompts; an append-only prompt reuses its session's previous ids and
        encodes only the new text (re-encoding whole ReAct trajectories was 13% of a batched
        rollout). Only where the cut is clean: the text around it encodes the same whole as in two
        pieces (BPE merges and pre-token splits are local, so a window decides)."""
        keys = sessions or [None] * len(texts)
        cuts, batch = {}, []
        for i, (text, key) in enumerate(zip(texts, keys)):
            hit = self._prompts.get(key) if key is not None else None
            if hit is not None and text.startswith(hit[0]):
                at, w = len(hit[0]), 64
                left, right = text[max(0, at - w):at], text[at:at + w]
                cuts[i] = (hit[1], len(batch))
                batch += [left + right, left, right, text[at:]]
        enc = self.encode_batch(batch)
        out: list[list[int] | None] = [None] * len(texts)
        for i, (prev, j) in cuts.items():
            if enc[j] == enc[j + 1] + enc[j + 2]:
                out[i] = prev + enc[j + 3]
        whole = [i for i, ids in enumerate(out) if ids is None]
        for i, ids in zip(whole, self.encode_batch([texts[i] for i in whole])):
            out[i] = ids
        for text, key, ids in zip(texts, keys, out):
            if key is not None:
                self._prompts.put(key, (text, ids))
        return out

    def _encode_option(self, text: str) -> list[int]:
        # Admissible actions repeat from step to step; encoding them dominated constrained calls.
        ids = self._options.get(text)
        if ids is None:
            if len(self._options) > 100_000:
                self._options.clear()
            ids = self._options[text] = self.encode(text)
        return ids

    @torch.inference_mode()
    def _catch_up(self, seqs: list[list[int]], sessions: list[str] | None, min_new: list[int], slack: int = 32):
        """Advance, one row at a time, the sessions whose uncached part is much longer than the
        batch's typical one (a cold episode, or a precision that sat out several steps). Batched,
        every row would be padded to that longest gap; alone, each costs only its own tokens."""
        if not sessions or len(seqs) < 2:
            return
        gaps = [len(ids) - self.kv.cached_len(ids, key, m) for ids, key, m in zip(seqs, sessions, min_new)]
        typical = sorted(gaps)[len(gaps) // 2]
        for i, gap in enumerate(gaps):
            if gap > typical + slack:
                upto = len(seqs[i]) - max(min_new[i], typical)
                cache, mask, ids, _ = self.kv.prefill([seqs[i][:upto]], [sessions[i]], [1])
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
                self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
                self.kv.remember([sessions[i]], [seqs[i][:upto]], mask, cache)

    @torch.inference_mode()
    def generate(self, prompts: list[str], sampling: Sampling, allowed: list[list[str]] | None = None,
                 sessions: list[str] | None = None) -> list[Generation]:
        """Batched decoding with our own loop rather than HF `generate`, for two reasons: the
        constraint trie and stop strings are per row, and each `sessions[i]` keeps its KV cache
        between calls, so an append-only (ReAct) prompt only prefills its new tokens."""
        if not prompts:
            return []
        prompt_ids = self._encode_prompts(prompts, sessions)
        B = len(prompts)
        self._catch_up(prompt_ids, sessions, [1] * B)
        cache, mask, ids, chunk_mask = self.kv.prefill(prompt_ids, sessions, min_new=[1] * B,
                                                      extra=sampling.max_new_tokens, keep=True)
        tries = ([None if options is None else Trie([self._encode_option(c) for c in options]) for options in allowed]
                 if allowed is not None else None)
        gen = torch.Generator(device=self.device)
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        out_tokens, out_lps = [[] for _ in range(B)], [[] for _ in range(B)]
        done = [False] * B
        step_ids = ids
        for _ in range(sampling.max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1].float()
            logp = logits.log_softmax(-1)
            scores = logp.clone()
            if tries is not None:
                allowed_mask = torch.full_like(scores, float("-inf"))
                for i, trie in enumerate(tries):
                    if trie is None or done[i]:
                        # A free row; or a finished one, whose token is ignored but must stay
                        # samplable (an all -inf row is NaN after softmax).
                        allowed_mask[i] = 0.0
                    else:
                        # A completed option may only end: EOS (stop strings usually end it first).
                        allowed_mask[i, trie.next_tokens(out_tokens[i]) or [self.eos_id]] = 0.0
                scores = scores + allowed_mask
            if sampling.temperature <= 0:
                nxt = scores.argmax(-1)
            else:
                probs = (scores / sampling.temperature).softmax(-1)
                if sampling.top_p < 1.0:
                    sp, si = probs.sort(-1, descending=True)
                    keep = sp.cumsum(-1) - sp < sampling.top_p
                    probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            picked, picked_lp = nxt.tolist(), logp.gather(1, nxt[:, None])[:, 0].tolist()
            for i in range(B):
                if done[i]:
                    continue
                t = picked[i]
                out_tokens[i].append(t)
                out_lps[i].append(picked_lp[i])
                if t == self.eos_id:
                    done[i] = True
                elif sampling.stop:
                    tail = self._tail(out_tokens[i])
                    done[i] = any(s in tail for s in sampling.stop)
            if all(done):
                break
            # Finished rows keep stepping on a masked pad so the batch stays rectangular.
            alive = torch.tensor([0 if d else 1 for d in done], dtype=torch.long, device=self.device)
            step_ids = torch.where(alive.bool(), nxt, torch.full_like(nxt, self.pad_id))[:, None]
            mask = torch.cat([mask, alive[:, None]], dim=1)
        if sessions:
            # All but the last generated token were fed to the model.
            self.kv.remember(sessions, [p + o[:-1] for p, o in zip(prompt_ids, out_tokens)], mask, cache, keep=True)
        results = []
        for i, p in enumerate(prompt_ids):
            toks = out_tokens[i]
            text = cut_at_stop(self.tokenizer.decode([t for t in toks if t != self.eos_id], skip_special_tokens=False),
                               sampling.stop)
            results.append(Generation(text=text, prompt_tokens=len(p), completion_tokens=len(toks),
                                      token_ids=toks, logprobs=out_lps[i]))
        return results

    def _tail(self, tokens: list[int]) -> str:
        """Text of a completion's last 8 tokens, for stop strings: joined from per-token pieces
        (a tokenizer.decode per row and token was a tenth of a batched call), decoded whole where
        a piece is part of a multi-byte character, or where the tokenizer is not byte-level (a
        SentencePiece piece decoded alone loses its leading space)."""
        if not self._byte_level:
            return self.tokenizer.decode(tokens[-8:], skip_special_tokens=False)
        pieces = []
        for t in tokens[-8:]:
            piece = self._pieces.get(t)
            if piece is None:
                piece = self._pieces[t] = self.tokenizer.decode([t], skip_special_tokens=False)
            pieces.append(piece)
        text = "".join(pieces)
        return self.tokenizer.decode(tokens[-8:], skip_special_tokens=False) if "\ufffd" in text else text

    def end_session(self, key: str) -> None:
        self.kv.end(key)
        self._prompts.pop(key, None)

    @torch.inference_mode()
    def score(self, prompts: list[str], continuations: list[str], full: bool = True,
              sessions: list[str] | None = None) -> list[Scored]:
        """Teacher-forced log-probs of each continuation. With `sessions`, a prompt that extends its
        episode's cached prefix only runs its new tokens, and the scored text is cached in turn, so
        replaying an append-only episode step by step costs one pass over it."""
        if not prompts:
            return []
        pairs = [(self.encode(p), self.encode(c)) for p, c in zip(prompts, continuations, strict=True)]
        seqs = [p + c for p, c in pairs]
        # The logits predicting c[0] come from the last prompt token, so that one must be new too.
        min_new = [len(c) + 1 for _, c in pairs]
        self._catch_up(seqs, sessions, min_new)
        cache, mask, ids, _ = self.kv.prefill(seqs, sessions, min_new=min_new, keep=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        keep = max(min_new)  # only the positions that predict a continuation token
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=sessions is not None, logits_to_keep=keep).logits.float()
        width = keep
        results = []
        for i, (p, c) in enumerate(pairs):
            start = width - len(c) - 1
            lp = logits[i, start:width - 1].log_softmax(-1)
            chosen = lp.gather(-1, torch.tensor(c, device=lp.device)[:, None])[:, 0]
            results.append(Scored(token_ids=c, logprobs=chosen.tolist(), dist=lp.cpu() if full else None))
        if sessions:
            self.kv.remember(sessions, seqs, mask, cache, keep=True)
        return results

    def close(self) -> None:
        self.model = None
