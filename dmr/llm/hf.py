"""HF transformers backend: exact full-vocabulary scores, runs every checkpoint on CPU or GPU.

On a CPU it computes in fp32 whatever the checkpoint dtype, because bf16 matmuls are 5-10x slower
there; on a GPU it uses bf16. Compressed-tensors (llmcompressor) checkpoints load decompressed.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dmr.llm.base import Generation, Sampling, Scored, cut_at_stop

_ATTENTION = "dmr_gqa"


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
        mask = mask[:, :, None].expand(B, mask.shape[1], rep, q, L).reshape(B, mask.shape[1], rep * q, L)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(B, H, q, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(_ATTENTION, _gqa_attention)
AttentionMaskInterface.register(_ATTENTION, sdpa_mask)


class _Slab(DynamicLayer):
    """One layer's KV in a buffer allocated once per call: appending a token writes in place, where
    transformers' DynamicLayer concatenates (copies) the whole cache for every generated token."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._k, self._v, self._n = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self._n + n > self._k.shape[-2]:
            grow = (*self._k.shape[:-2], max(n, self._k.shape[-2]), self._k.shape[-1])
            self._k = torch.cat([self._k, self._k.new_zeros(grow)], dim=-2)
            self._v = torch.cat([self._v, self._v.new_zeros(grow)], dim=-2)
        self._k[..., self._n:self._n + n, :] = key_states
        self._v[..., self._n:self._n + n, :] = value_states
        self._n += n
        self.keys, self.values = self._k[..., :self._n, :], self._v[..., :self._n, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n


class _Trie:
    """Token-id prefix tree of the allowed completions of one prompt."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})

    def next_tokens(self, prefix: list[int]) -> list[int]:
        node = self.root
        for t in prefix:
            node = node.get(t)
            if node is None:
                return []
        return list(node)


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
        self._sessions: OrderedDict = OrderedDict()  # session -> (token ids, per-layer KV)
        self._prompts: OrderedDict = OrderedDict()   # session -> (last prompt text, its token ids)
        self._options: dict[str, list[int]] = {}
        self.max_sessions = max_sessions
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_prompt(self, text: str, session: str | None) -> list[int]:
        """Token ids of a prompt; an append-only prompt reuses its session's previous ids and
        encodes only the new text (re-encoding whole ReAct trajectories was 13% of a batched
        rollout). Only where the cut is clean: the text around it encodes the same whole as in two
        pieces (BPE merges and pre-token splits are local, so a window decides)."""
        hit = self._prompts.get(session) if session is not None else None
        ids = None
        if hit is not None and text.startswith(hit[0]):
            at, w = len(hit[0]), 64
            left, right = text[max(0, at - w):at], text[at:at + w]
            if self.encode(left + right) == self.encode(left) + self.encode(right):
                ids = hit[1] + self.encode(text[at:])
        if ids is None:
            ids = self.encode(text)
        if session is not None:
            self._keep(self._prompts, session, (text, ids))
        return ids

    def _keep(self, cache: OrderedDict, session: str, entry) -> None:
        """Store a session's entry, most recent last, and drop the least recent past max_sessions."""
        cache[session] = entry
        cache.move_to_end(session)
        while len(cache) > self.max_sessions:
            cache.popitem(last=False)

    def _encode_option(self, text: str) -> list[int]:
        # Admissible actions repeat from step to step; encoding them dominated constrained calls.
        ids = self._options.get(text)
        if ids is None:
            if len(self._options) > 100_000:
                self._options.clear()
            ids = self._options[text] = self.encode(text)
        return ids

    def _cached(self, ids: list[int], session: str | None, min_new: int):
        """The session's cache entry when `ids` extends it by at least `min_new` tokens, else None."""
        hit = self._sessions.get(session) if session is not None else None
        if hit is not None and len(hit[0]) <= len(ids) - min_new and ids[:len(hit[0])] == hit[0]:
            return hit
        return None

    @torch.inference_mode()
    def _catch_up(self, seqs: list[list[int]], sessions: list[str] | None, min_new: list[int], slack: int = 32):
        """Advance, one row at a time, the sessions whose uncached part is much longer than the
        batch's typical one (a cold episode, or a precision that sat out several steps). Batched,
        every row would be padded to that longest gap; alone, each costs only its own tokens."""
        if not sessions or len(seqs) < 2:
            return
        gaps = []
        for ids, key, m in zip(seqs, sessions, min_new):
            hit = self._cached(ids, key, m)
            gaps.append(len(ids) - (len(hit[0]) if hit else 0))
        typical = sorted(gaps)[len(gaps) // 2]
        for i, gap in enumerate(gaps):
            if gap > typical + slack:
                upto = len(seqs[i]) - max(min_new[i], typical)
                cache, mask, ids, _ = self._prefill([seqs[i][:upto]], [sessions[i]], [1])
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
                self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
                self._remember([sessions[i]], [seqs[i][:upto]], mask, cache)

    def _prefill(self, seqs: list[list[int]], sessions: list[str] | None, min_new: list[int], extra: int = 0):
        """A batch over `seqs` that starts from each session's cached KV where the sequence extends
        it by at least `min_new[i]` tokens. Returns the cache, the attention mask over cache + new
        chunk, and the left-padded new chunks with their mask: pads may sit between a row's cache
        and its new tokens; the mask hides them and positions count only real tokens. The cache
        has room for `extra` more tokens per row (the tokens a generate call will add)."""

        B = len(seqs)
        past, new = [], []
        for i, ids in enumerate(seqs):
            hit = self._cached(ids, sessions[i], min_new[i]) if sessions else None
            if hit is not None:
                past.append(hit[1])
                new.append(ids[len(hit[0]):])
            else:
                past.append(None)
                new.append(ids)
        cfg = self.model.config
        heads = cfg.num_key_value_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        past_len = max((kv[0][0].shape[-2] for kv in past if kv is not None), default=0)
        width = max(map(len, new))
        mask = torch.zeros((B, past_len), dtype=torch.long, device=self.device)
        for i, kv in enumerate(past):
            if kv is not None:
                mask[i, past_len - kv[0][0].shape[-2]:] = 1
        cache = DynamicCache(config=cfg)
        layers = []
        for layer in range(cfg.num_hidden_layers):
            k = torch.zeros((B, heads, past_len + width + extra, dim), dtype=self.model.dtype, device=self.device)
            v = torch.zeros_like(k)
            for i, kv in enumerate(past):
                if kv is not None:
                    n = kv[layer][0].shape[-2]
                    k[i, :, past_len - n:past_len] = kv[layer][0][0]
                    v[i, :, past_len - n:past_len] = kv[layer][1][0]
            layers.append(_Slab(k, v, past_len))
        cache.layers = layers
        ids = torch.full((B, width), self.pad_id, dtype=torch.long, device=self.device)
        chunk_mask = torch.zeros((B, width), dtype=torch.long, device=self.device)
        for i, n in enumerate(new):
            ids[i, width - len(n):] = torch.tensor(n, device=self.device)
            chunk_mask[i, width - len(n):] = 1
        return cache, torch.cat([mask, chunk_mask], dim=1), ids, chunk_mask

    @torch.inference_mode()
    def generate(self, prompts: list[str], sampling: Sampling, allowed: list[list[str]] | None = None,
                 sessions: list[str] | None = None) -> list[Generation]:
        """Batched decoding with our own loop rather than HF `generate`, for two reasons: the
        constraint trie and stop strings are per row, and each `sessions[i]` keeps its KV cache
        between calls, so an append-only (ReAct) prompt only prefills its new tokens."""
        if not prompts:
            return []
        prompt_ids = [self._encode_prompt(p, sessions[i] if sessions else None) for i, p in enumerate(prompts)]
        B = len(prompts)
        self._catch_up(prompt_ids, sessions, [1] * B)
        cache, mask, ids, chunk_mask = self._prefill(prompt_ids, sessions, min_new=[1] * B,
                                                      extra=sampling.max_new_tokens)
        tries = ([None if options is None else _Trie([self._encode_option(c) for c in options]) for options in allowed]
                 if allowed is not None else None)
        gen = torch.Generator(device=self.device)
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        out_tokens, out_lps = [[] for _ in range(B)], [[] for _ in range(B)]
        done = [False] * B
        step_ids, step_mask = ids, chunk_mask
        for _ in range(sampling.max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                                past_key_values=cache, use_cache=True).logits[:, -1].float()
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
            for i in range(B):
                if done[i]:
                    continue
                t = int(nxt[i])
                out_tokens[i].append(t)
                out_lps[i].append(float(logp[i, t]))
                if t == self.eos_id:
                    done[i] = True
                elif sampling.stop:
                    tail = self.tokenizer.decode(out_tokens[i][-8:], skip_special_tokens=False)
                    done[i] = any(s in tail for s in sampling.stop)
            if all(done):
                break
            # Finished rows keep stepping on a masked pad so the batch stays rectangular.
            alive = torch.tensor([0 if d else 1 for d in done], dtype=torch.long, device=self.device)
            step_ids = torch.where(alive.bool(), nxt, torch.full_like(nxt, self.pad_id))[:, None]
            mask = torch.cat([mask, alive[:, None]], dim=1)
        if sessions:
            # All but the last generated token were fed to the model.
            self._remember(sessions, [p + o[:-1] for p, o in zip(prompt_ids, out_tokens)], mask, cache)
        results = []
        for i, p in enumerate(prompt_ids):
            toks = out_tokens[i]
            text = cut_at_stop(self.tokenizer.decode([t for t in toks if t != self.eos_id], skip_special_tokens=False),
                               sampling.stop)
            results.append(Generation(text=text, prompt_tokens=len(p), completion_tokens=len(toks),
                                      token_ids=toks, logprobs=out_lps[i]))
        return results

    def _remember(self, sessions, fed, mask, cache):
        """Keep each row's KV of the tokens `fed[i]` that went through the model."""
        n_layers = self.model.config.num_hidden_layers
        for i, key in enumerate(sessions):
            toks = fed[i]
            # Cache positions fed so far: the mask minus the slot of the last sampled token, if any.
            valid = mask[i, :cache.layers[0].keys.shape[-2]].bool()
            kv = [(cache.layers[l].keys[i:i + 1, ..., valid, :], cache.layers[l].values[i:i + 1, ..., valid, :])
                  for l in range(n_layers)]
            if kv[0][0].shape[-2] != len(toks):
                self._sessions.pop(key, None)  # should not happen; never serve a misaligned cache
                continue
            self._keep(self._sessions, key, (toks, kv))

    def end_session(self, key: str) -> None:
        self._sessions.pop(key, None)
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
        cache, mask, ids, _ = self._prefill(seqs, sessions, min_new=min_new)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=sessions is not None).logits.float()
        width = ids.shape[1]
        results = []
        for i, (p, c) in enumerate(pairs):
            start = width - len(c) - 1
            lp = logits[i, start:width - 1].log_softmax(-1)
            chosen = lp.gather(-1, torch.tensor(c, device=lp.device)[:, None])[:, 0]
            results.append(Scored(token_ids=c, logprobs=chosen.tolist(), dist=lp.cpu() if full else None))
        if sessions:
            self._remember(sessions, seqs, mask, cache)
        return results

    def close(self) -> None:
        self.model = None
