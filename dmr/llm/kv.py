"""Per-episode KV prefix caches of one model (dmr.llm.hf): an append-only prompt reuses the KV of
its session's previous call, so only its new tokens run through the model.

`KVSessions` holds two kinds of entries, both keyed by session: the group (the KV slab of the
last call, kept in place for the next call with the same sessions) and the store (per-session
copies, at most `max_sessions`, the least recent evicted). Its interface to the backend:
`cached_len` (how much of a sequence is cached), `prefill` (a batch's cache, mask and new chunk),
`remember` (keep what a call fed through the model) and `end` (drop a session).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class LRU(OrderedDict):
    """session -> entry, most recent last; past `size` entries the least recent is dropped."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, session: str, entry) -> None:
        self[session] = entry
        self.move_to_end(session)
        while len(self) > self.size:
            self.popitem(last=False)


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


class KVSessions:
    """The KV caches of one model's sessions: the kept group and the store (see the module)."""

    def __init__(self, config, dtype: torch.dtype, device: torch.device, pad_id: int, max_sessions: int = 64):
        self.config, self.dtype, self.device, self.pad_id = config, dtype, device, pad_id
        self._store = LRU(max_sessions)  # session -> (token ids, per-layer KV)
        self._group: _Group | None = None

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
        hit = self._store.get(session)
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
        held, kv = (self._group.row_kv(self._group.row(session)) if where == "group" else self._store[session])
        return held[:n], [(k[..., :n, :], v[..., :n, :]) for k, v in kv]

    def cached_len(self, ids: list[int], session: str | None, min_new: int) -> int:
        """Tokens of `ids` the session has cached, leaving at least `min_new` to run."""
        use = self._usable(ids, session, min_new)
        return use[0] if use else 0

    def _kv_shape(self):
        cfg = self.config
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
        cache = DynamicCache(config=self.config)
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
            self._store.put(g.sessions[i], g.row_kv(i))

    def prefill(self, seqs: list[list[int]], sessions: list[str] | None, min_new: list[int], extra: int = 0,
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
        for layer in range(self.config.num_hidden_layers):
            k = torch.zeros((B, heads, cap, dim), dtype=self.dtype, device=self.device)
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

    def remember(self, sessions, fed, mask, cache, keep: bool = False):
        """Keep each row's KV of the tokens `fed[i]` that went through the model: in place as the
        group (`keep`, after a `prefill` with `keep`), else copied out per session."""
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
                self._store.pop(key, None)  # the row is newer
            return
        for i, key in enumerate(sessions):
            if counts[i] != len(fed[i]):
                self._store.pop(key, None)
                continue
            valid = mask[i].bool()
            kv = [(c.keys[i:i + 1, ..., valid, :], c.values[i:i + 1, ..., valid, :]) for c in cache.layers]
            self._store.put(key, (fed[i], kv))

    def end(self, key: str) -> None:
        """Drop whatever is cached for session `key`."""
        self._store.pop(key, None)
        g = self._group
        if g is not None and key in g.sessions:
            i = g.sessions.index(key)
            g.sessions[i], g.ids[i] = None, []
