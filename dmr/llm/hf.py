"""HF transformers backend: exact full-vocabulary scores, runs every checkpoint on CPU or GPU.

On a CPU it computes in fp32 whatever the checkpoint dtype, because bf16 matmuls are 5-10x slower
there; on a GPU it uses bf16. Compressed-tensors (llmcompressor) checkpoints load decompressed.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dmr.llm.base import Generation, Sampling, Scored, cut_at_stop
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


def _common(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (slice compares run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Group:
    """The KV slab of the last call with sessions, kept for the next one. While a rollout's shards
    call with the same sessions in the same order, every call appends its rows' new tokens in
    place; copying each row's cache into a fresh slab and back out was a fifth of a batched call.
    Rows end at column `used`; pads and finished rows' decode slots are holes the mask hides."""

    def __init__(self, sessions, ids, keys, values, mask, used):
        self.sessions, self.ids = list(sessions), [list(x) for x in ids]
        self.keys, self.values, self.mask, self.used = keys, values, mask, used

    def row(self, session):
        return self.sessions.index(session) if session in self.sessions else None

    def row_kv(self, i):
        """(ids, per-layer KV) of row i with the holes squeezed out (a copy)."""
        valid = self.mask[i, :self.used].bool()
        return self.ids[i], [(k[i:i + 1, :, :self.used][..., valid, :], v[i:i + 1, :, :self.used][..., valid, :])
                             for k, v in zip(self.keys, self.values)]


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
        self._pieces: dict[int, str] = {}
        from tokenizers import decoders

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
        self._group: _Group | None = None
        self.max_sessions = max_sessions
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

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
                self._keep(self._prompts, key, (text, ids))
        return out

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

    def _usable(self, ids: list[int], session: str | None, min_new: int):
        """(n, where) of the session's cache that shares the longest prefix with `ids`, at most
        len(ids) - min_new tokens: where is "group" (its row of the kept batch) or "store". A
        prefix of a cache serves too: a completion re-encoded in the next prompt may end in other
        tokens than were generated. None when nothing is shared."""
        if session is None:
            return None
        limit = ids[:max(0, len(ids) - min_new)]
        best = None
        i = self._group.row(session) if self._group is not None else None
        if i is not None:
            n = _common(self._group.ids[i], limit)
            best = (n, "group") if n else None
        hit = self._sessions.get(session)
        if hit is not None:
            n = _common(hit[0], limit)
            if n > (best[0] if best else 0):
                best = (n, "store")
        return best

    def _cached(self, ids: list[int], session: str | None, min_new: int):
        """The session's cached (ids, per-layer KV) that `ids` extends by at least `min_new`
        tokens, else None. A group row is copied out: for rebuilding the batch."""
        use = self._usable(ids, session, min_new)
        if use is None:
            return None
        n, where = use
        held, kv = (self._group.row_kv(self._group.row(session)) if where == "group" else self._sessions[session])
        return held[:n], [(k[..., :n, :], v[..., :n, :]) for k, v in kv]

    def _cached_len(self, ids: list[int], session: str | None, min_new: int) -> int:
        use = self._usable(ids, session, min_new)
        return use[0] if use else 0

    @torch.inference_mode()
    def _catch_up(self, seqs: list[list[int]], sessions: list[str] | None, min_new: list[int], slack: int = 32):
        """Advance, one row at a time, the sessions whose uncached part is much longer than the
        batch's typical one (a cold episode, or a precision that sat out several steps). Batched,
        every row would be padded to that longest gap; alone, each costs only its own tokens."""
        if not sessions or len(seqs) < 2:
            return
        gaps = [len(ids) - self._cached_len(ids, key, m) for ids, key, m in zip(seqs, sessions, min_new)]
        typical = sorted(gaps)[len(gaps) // 2]
        for i, gap in enumerate(gaps):
            if gap > typical + slack:
                upto = len(seqs[i]) - max(min_new[i], typical)
                cache, mask, ids, _ = self._prefill([seqs[i][:upto]], [sessions[i]], [1])
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
                self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
                self._remember([sessions[i]], [seqs[i][:upto]], mask, cache)

    def _kv_shape(self):
        cfg = self.model.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cfg.num_key_value_heads, dim

    def _chunk(self, new: list[list[int]]):
        """The new tokens of each row, left-padded to one width, and their mask."""
        B, width = len(new), max(map(len, new))
        ids = torch.full((B, width), self.pad_id, dtype=torch.long, device=self.device)
        chunk_mask = torch.zeros((B, width), dtype=torch.long, device=self.device)
        for i, n in enumerate(new):
            if n:
                ids[i, width - len(n):] = torch.tensor(n, device=self.device)
                chunk_mask[i, width - len(n):] = 1
        return ids, chunk_mask

    def _slab_cache(self, keys, values, used):
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_Slab(k, v, used) for k, v in zip(keys, values)]
        return cache

    def _in_place(self, seqs, sessions, min_new, extra):
        """The rows' new tokens when this call can extend the group in place (same sessions in the
        same order; a row may switch to a session the group does not hold, as a shard does when its
        episode ends), else None. Refilled rows are loaded into their row here."""
        g = self._group
        if g is None or len(g.sessions) != len(seqs):
            return None
        hits, trim, held = {}, {}, []
        for i, (ids, key) in enumerate(zip(seqs, sessions)):
            use = self._usable(ids, key, min_new[i])
            if g.sessions[i] == key and use and use[1] == "group":
                if use[0] < len(g.ids[i]):
                    trim[i] = use[0]
                held.append(use[0])
                continue  # extends (a prefix of) its own row
            if (g.sessions[i] != key and key in g.sessions) or (g.sessions[i] not in (None, key)
                                                                and g.sessions[i] in sessions):
                return None  # rows moved: rebuild
            # A row switching session refills from the stored entry, if the session has one.
            hits[i] = self._cached(ids, key, min_new[i]) if use else None
            held.append(len(hits[i][0]) if hits[i] else 0)
        # A refill longer than the rows so far (a session caught up alone) moves the end of all
        # rows to its length; the columns it skips are holes.
        used = max([g.used] + [len(h[0]) for h in hits.values() if h is not None])
        if used + max(len(ids) - n for ids, n in zip(seqs, held)) + extra > g.keys[0].shape[-2] \
                or used > 2 * max(held) + 256:
            return None  # no room, or mostly holes: rebuild compacts
        g.mask[:, g.used:used] = 0
        g.used = used
        for i, n in trim.items():
            cols = g.mask[i, :g.used].nonzero()[:, 0]
            g.mask[i, cols[n:]] = 0
            g.ids[i] = g.ids[i][:n]
        for i, hit in hits.items():
            if g.sessions[i] != sessions[i]:
                self._stash(g, i)
            g.mask[i, :g.used] = 0
            g.sessions[i], g.ids[i] = sessions[i], []
            if hit is not None:
                n = len(hit[0])
                for layer, (k, v) in enumerate(hit[1]):
                    g.keys[layer][i, :, g.used - n:g.used] = k[0]
                    g.values[layer][i, :, g.used - n:g.used] = v[0]
                g.mask[i, g.used - n:g.used] = 1
                g.ids[i] = list(hit[0])
        return [ids[len(g.ids[i]):] for i, ids in enumerate(seqs)]

    def _stash(self, g: _Group, i: int) -> None:
        """A live session leaving row i of the group keeps its KV in the store (routed elsewhere
        this step, it comes back later)."""
        if g.sessions[i] is not None:
            self._keep(self._sessions, g.sessions[i], g.row_kv(i))

    def _prefill(self, seqs: list[list[int]], sessions: list[str] | None, min_new: list[int], extra: int = 0,
                 keep: bool = False):
        """A batch over `seqs` that starts from each session's cached KV where the sequence extends
        it by at least `min_new[i]` tokens. Returns the cache, the attention mask over cache + new
        chunk, and the left-padded new chunks with their mask: pads may sit between a row's cache
        and its new tokens; the mask hides them and positions count only real tokens. The cache
        has room for `extra` more tokens per row (the tokens a generate call will add). With
        `keep`, the batch becomes the group that the next call extends in place."""
        if keep and sessions:
            new = self._in_place(seqs, sessions, min_new, extra)
            if new is not None:
                g = self._group
                ids, chunk_mask = self._chunk(new)
                return (self._slab_cache(g.keys, g.values, g.used), torch.cat([g.mask[:, :g.used], chunk_mask], 1),
                        ids, chunk_mask)
        B = len(seqs)
        past, new, held = [], [], []
        for i, ids in enumerate(seqs):
            hit = self._cached(ids, sessions[i], min_new[i]) if sessions else None
            past.append(hit[1] if hit is not None else None)
            held.append(list(hit[0]) if hit is not None else [])
            new.append(ids[len(held[-1]):])
        heads, dim = self._kv_shape()
        past_len = max((kv[0][0].shape[-2] for kv in past if kv is not None), default=0)
        ids, chunk_mask = self._chunk(new)
        # A kept group gets headroom for the next calls' tokens (about 30 a ReAct step).
        cap = past_len + ids.shape[1] + extra + (512 if keep and sessions else 0)
        mask = torch.zeros((B, cap), dtype=torch.long, device=self.device)
        for i, kv in enumerate(past):
            if kv is not None:
                mask[i, past_len - kv[0][0].shape[-2]:past_len] = 1
        keys, values = [], []
        for layer in range(self.model.config.num_hidden_layers):
            k = torch.zeros((B, heads, cap, dim), dtype=self.model.dtype, device=self.device)
            v = torch.zeros_like(k)
            for i, kv in enumerate(past):
                if kv is not None:
                    n = kv[layer][0].shape[-2]
                    k[i, :, past_len - n:past_len] = kv[layer][0][0]
                    v[i, :, past_len - n:past_len] = kv[layer][1][0]
            keys.append(k)
            values.append(v)
        if keep and sessions:
            old = self._group
            if old is not None:
                for i, key in enumerate(old.sessions):
                    if key not in sessions:
                        self._stash(old, i)
            self._group = _Group(sessions, held, keys, values, mask, past_len)
        return self._slab_cache(keys, values, past_len), torch.cat([mask[:, :past_len], chunk_mask], 1), ids, chunk_mask

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
        cache, mask, ids, chunk_mask = self._prefill(prompt_ids, sessions, min_new=[1] * B,
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
            self._remember(sessions, [p + o[:-1] for p, o in zip(prompt_ids, out_tokens)], mask, cache, keep=True)
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

    def _remember(self, sessions, fed, mask, cache, keep: bool = False):
        """Keep each row's KV of the tokens `fed[i]` that went through the model: in place as the
        group (`keep`, after a `_prefill` with `keep`), else copied out per session."""
        used = cache.layers[0].get_seq_length()
        # Cache positions fed so far: the mask minus the slot of the last sampled token, if any.
        mask = mask[:, :used]
        counts = mask.sum(1).tolist()
        if keep:
            g = self._group
            if cache.layers[0]._k is not g.keys[0]:  # the slab grew past its headroom
                g.keys, g.values = [c._k for c in cache.layers], [c._v for c in cache.layers]
                g.mask = torch.zeros((len(sessions), g.keys[0].shape[-2]), dtype=torch.long, device=self.device)
            g.mask[:, :used] = mask
            g.used = used
            for i, key in enumerate(sessions):
                # A misaligned row should not happen; never serve one.
                g.sessions[i], g.ids[i] = (key, fed[i]) if counts[i] == len(fed[i]) else (None, [])
                self._sessions.pop(key, None)  # the row is newer
            return
        for i, key in enumerate(sessions):
            if counts[i] != len(fed[i]):
                self._sessions.pop(key, None)
                continue
            valid = mask[i].bool()
            kv = [(c.keys[i:i + 1, ..., valid, :], c.values[i:i + 1, ..., valid, :]) for c in cache.layers]
            self._keep(self._sessions, key, (fed[i], kv))

    def end_session(self, key: str) -> None:
        self._sessions.pop(key, None)
        self._prompts.pop(key, None)
        g = self._group
        if g is not None and key in g.sessions:
            i = g.sessions.index(key)
            g.sessions[i], g.ids[i] = None, []

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
        cache, mask, ids, _ = self._prefill(seqs, sessions, min_new=min_new, keep=True)
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
            self._remember(sessions, seqs, mask, cache, keep=True)
        return results

    def close(self) -> None:
        self.model = None
