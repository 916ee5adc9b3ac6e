"""vLLM backend: a client of an OpenAI-compatible vLLM server (one server per precision).

Prompts go as token ids tokenized here exactly as the HF backend does (no special tokens added),
one request per prompt from a pool of threads, so the server batches the agent's concurrent
shards itself. Prefix reuse across an episode's steps is vLLM's automatic prefix caching, so
`sessions` needs no bookkeeping here.

Scores differ from the HF backend in one way: vLLM returns only the top-k log-probs of each
position (`Scored.topk`, k = `top_logprobs` <= the server's --max-logprobs; the scored token's own
log-prob is always added, and is exact in `Scored.logprobs`), not the full distribution
(`Scored.dist`). dmr.kl takes the least KL consistent with them (exact once k reaches the
vocabulary: a server started with --max-logprobs at the vocabulary size, top_logprobs the same).
"""
from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from dmr.llm import server as srv
from dmr.llm.base import Generation, Sampling, Scored, cut_at_stop
from dmr.llm.trie import Trie


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", re.match(r"[\d.]*", v).group())[:3])


def _token_id(token: str) -> int:
    # `return_tokens_as_token_ids` spells tokens "token_id:123", whatever bytes they decode to.
    if not token.startswith("token_id:"):
        raise RuntimeError(f"expected a 'token_id:N' token from the server, got {token!r}")
    return int(token[len("token_id:"):])


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, base_url: str | None = None, server: dict | None = None,
                 concurrency: int = 16, timeout: float = 300, top_logprobs: int = 20, api_key: str = "EMPTY",
                 tokenizer: str | None = None, retries: int = 3, constrained: str = "choice"):
        """`model` is the checkpoint (and, unless server={'served_name': ...}, the served name).
        Connects to `base_url` (e.g. http://127.0.0.1:8000/v1), or when it is None starts its own
        server from `server`: ServerSpec fields (port defaults to a free one, gpu_memory_utilization
        is required) plus start()'s `python` (default $DMR_VLLM_PYTHON), `timeout` and `log_dir`.

        `constrained` picks how `allowed` is enforced. "choice" (one request, vLLM's structured
        outputs) lets the model spell a choice with any tokenization, so a weak model may take a
        path the HF backend never offers. "trie" reproduces the HF backend exactly: the canonical
        tokenizations only, one request per token with `allowed_token_ids` (prefix caching keeps
        the repeated prompt cheap, but it costs a round trip per token)."""
        if constrained not in ("choice", "trie"):
            raise ValueError(f"constrained must be 'choice' or 'trie', got {constrained!r}")
        self.constrained = constrained
        import openai
        from transformers import AutoTokenizer

        self.server = None
        self.model = str(model)
        if base_url is None:
            if server is None:
                raise ValueError("VLLMBackend needs base_url (a running server) or server={...} to start one")
            self.server = self._start(self.model, dict(server))
            base_url = self.server.url
            self.model = self.server.name
        self.base_url = base_url.rstrip("/")
        self.top_logprobs = top_logprobs
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or str(model))
        except BaseException:
            if self.server is not None:
                self.server.stop()
            raise
        self.eos_id = self.tokenizer.eos_token_id
        # openai retries connection errors, 408/409/429 and 5xx with exponential backoff.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=retries)
        self._openai = openai
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vllm")
        self._choice_key: str | None = None  # "structured_outputs" or "guided_choice"
        self._choice_checked = False

    @staticmethod
    def _start(model: str, server: dict):
        start_kw = {k: server.pop(k) for k in ("python", "timeout", "log_dir") if k in server}
        start_kw.setdefault("python", os.environ.get("DMR_VLLM_PYTHON", sys.executable))
        if "gpu_memory_utilization" not in server:
            raise ValueError("server={...} needs gpu_memory_utilization: the fraction of the GPU this "
                             "precision's server takes (all precisions' servers share the GPU)")
        server.setdefault("port", srv.free_port(server.get("host", "127.0.0.1")))
        (s,) = srv.start([srv.ServerSpec(model=model, **server)], **start_kw)
        return s

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _post(self, **kwargs):
        """One completions request, with the server's failures turned into errors that say where."""
        openai = self._openai
        try:
            return self.client.completions.create(model=self.model, **kwargs)
        except openai.APIConnectionError as e:
            where = f"vLLM server at {self.base_url}"
            if self.server is not None and not self.server.alive():
                raise RuntimeError(f"{where} died (exit code {self.server.proc.returncode}). "
                                   f"Last lines of {self.server.log}:\n{self.server.tail()}") from e
            kind = "timed out" if isinstance(e, openai.APITimeoutError) else "is unreachable"
            raise RuntimeError(f"{where} {kind}: {e}") from e
        except openai.APIStatusError as e:
            raise RuntimeError(f"vLLM server at {self.base_url} answered HTTP {e.status_code}: "
                               f"{_server_message(e)}") from e

    def _detect_choice_key(self) -> str:
        """vLLM >= 0.10.2 takes `structured_outputs: {choice}`; older ones took `guided_choice`.
        Each silently ignores the other's field, so ask /version first; generate() then checks the
        first constrained answers and switches spelling if they ignored it."""
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        try:
            with urllib.request.urlopen(root + "/version", timeout=10) as r:
                version = json.loads(r.read())["version"]
        except Exception:
            return "structured_outputs"
        v = _version_tuple(version)
        return "guided_choice" if v and v < (0, 10, 2) else "structured_outputs"

    def _constraint(self, options: list[str]) -> dict:
        if self._choice_key is None:
            self._choice_key = self._detect_choice_key()
        if self._choice_key == "structured_outputs":
            return {"structured_outputs": {"choice": list(options)}}
        return {"guided_choice": list(options)}

    def _one(self, ids: list[int], sampling: Sampling, seed: int | None, options: list[str] | None) -> Generation:
        greedy = sampling.temperature <= 0
        extra = {"return_tokens_as_token_ids": True, "include_stop_str_in_output": True,
                 "skip_special_tokens": False}
        if options is not None:
            extra.update(self._constraint(options))
        r = self._post(prompt=ids, max_tokens=sampling.max_new_tokens, temperature=max(sampling.temperature, 0.0),
                       top_p=1.0 if greedy else sampling.top_p, seed=seed, stop=sampling.stop or None,
                       logprobs=1, extra_body=extra)
        c = r.choices[0]
        lp = c.logprobs
        token_ids = [_token_id(t) for t in lp.tokens] if lp and lp.tokens else list(getattr(c, "token_ids", None) or [])
        logprobs = [float(x) for x in lp.token_logprobs] if lp and lp.token_logprobs else []
        text = c.text
        stop_reason = getattr(c, "stop_reason", None)
        if c.finish_reason == "stop":
            if isinstance(stop_reason, str) and not text.endswith(stop_reason):
                text += stop_reason  # a server that ignored include_stop_str_in_output
            elif stop_reason is None and token_ids:
                # EOS: with include_stop_str_in_output and special tokens kept, vLLM spells it out;
                # the HF backend leaves it out of the text.
                end = self.tokenizer.decode(token_ids[-1:], skip_special_tokens=False)
                if end and text.endswith(end):
                    text = text[:-len(end)]
        text = cut_at_stop(text, sampling.stop)
        usage = r.usage
        return Generation(text=text, prompt_tokens=usage.prompt_tokens if usage else len(ids),
                          completion_tokens=usage.completion_tokens if usage else len(token_ids),
                          token_ids=token_ids, logprobs=logprobs)

    def _one_trie(self, ids: list[int], sampling: Sampling, seed: int | None, options: list[str] | None) -> Generation:
        """The HF backend's constrained loop, one token per request; a free row (no options) is one
        ordinary request."""
        if options is None:
            return self._one(ids, sampling, seed, None)
        trie = Trie([self.encode(o) for o in options])
        greedy = sampling.temperature <= 0
        toks, lps = [], []
        for step in range(sampling.max_new_tokens):
            r = self._post(prompt=ids + toks, max_tokens=1, temperature=max(sampling.temperature, 0.0),
                           top_p=1.0 if greedy else sampling.top_p, seed=None if seed is None else seed + step,
                           logprobs=1, extra_body={"return_tokens_as_token_ids": True, "skip_special_tokens": False,
                                                   "allowed_token_ids": trie.next_tokens(toks) or [self.eos_id]})
            lp = r.choices[0].logprobs
            toks.append(_token_id(lp.tokens[0]))
            lps.append(float(lp.token_logprobs[0]))
            if toks[-1] == self.eos_id:
                break
            if sampling.stop:
                tail = self.tokenizer.decode(toks[-8:], skip_special_tokens=False)
                if any(s in tail for s in sampling.stop):
                    break
        text = cut_at_stop(self.tokenizer.decode([t for t in toks if t != self.eos_id], skip_special_tokens=False),
                           sampling.stop)
        return Generation(text=text, prompt_tokens=len(ids), completion_tokens=len(toks), token_ids=toks, logprobs=lps)

    def generate(self, prompts: list[str], sampling: Sampling, allowed: list[list[str]] | None = None,
                 sessions: list[str] | None = None) -> list[Generation]:
        if not prompts:
            return []
        ids = [self.encode(p) for p in prompts]
        # One seed per row: the same seed on every request would correlate the shards' samples.
        seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
        opts = allowed if allowed is not None else [None] * len(prompts)
        if allowed is not None and self.constrained == "trie":
            return list(self._pool.map(self._one_trie, ids, [sampling] * len(prompts), seeds, opts))
        out = list(self._pool.map(self._one, ids, [sampling] * len(prompts), seeds, opts))
        if allowed is not None and any(allowed) and not self._choice_checked:
            # The first constrained batch checks the detected field: vLLM ignores fields it does not
            # know, so an answer outside the choices means the other spelling; retry once with it.
            if not _within(out, allowed):
                self._choice_key = "guided_choice" if self._choice_key == "structured_outputs" else "structured_outputs"
                out = list(self._pool.map(self._one, ids, [sampling] * len(prompts), seeds, opts))
                if not _within(out, allowed):
                    raise RuntimeError(f"vLLM server at {self.base_url} ignores both structured_outputs.choice "
                                       "and guided_choice: its answers fall outside the allowed choices")
            self._choice_checked = True
        return out

    def _score_one(self, prompt: str, continuation: str) -> Scored:
        p, c = self.encode(prompt), self.encode(continuation)
        if not p:
            raise ValueError("score needs a non-empty prompt: the first token has no log-prob")
        r = self._post(prompt=p + c, max_tokens=1, temperature=0.0,
                       extra_body={"prompt_logprobs": self.top_logprobs})
        choice = r.choices[0]
        plp = getattr(choice, "prompt_logprobs", None)
        if plp is None:
            extra = getattr(choice, "model_extra", None) or {}
            plp = extra.get("prompt_logprobs")
        if plp is None or len(plp) != len(p) + len(c):
            raise RuntimeError(f"vLLM server at {self.base_url} sent no prompt_logprobs for "
                               f"{len(p) + len(c)} tokens (got {None if plp is None else len(plp)})")
        chosen, topk = [], []
        for j, tok in enumerate(c, start=len(p)):
            # Each position: top-k token ids plus the actual token, as {"id": {"logprob", "rank", ...}}.
            d = {int(k): float(v["logprob"] if isinstance(v, dict) else v) for k, v in plp[j].items()}
            chosen.append(d[tok])
            ranked = sorted(d.items(), key=lambda kv: -kv[1])
            topk.append(([k for k, _ in ranked], [v for _, v in ranked]))
        return Scored(token_ids=c, logprobs=chosen, topk=topk)

    def score(self, prompts: list[str], continuations: list[str], full: bool = True,
              sessions: list[str] | None = None) -> list[Scored]:
        """Teacher-forced log-probs of each continuation, with the top-k (not the full) distribution
        of each continuation position in `topk`; see the module docstring. `sessions` needs nothing
        here: the server's prefix cache finds shared prefixes by itself."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        return list(self._pool.map(self._score_one, prompts, continuations))

    def end_session(self, key: str) -> None:
        pass  # vLLM's prefix cache evicts by itself

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        if self.server is not None:
            self.server.stop()
            self.server = None


def _within(out: list[Generation], allowed: list[list[str]]) -> bool:
    # A prefix counts: a stop string inside a choice, or max_tokens, may end it early.
    return all(any(o.startswith(g.text) for o in opts) for g, opts in zip(out, allowed) if opts)


def _server_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(e, "message", None) or e)
