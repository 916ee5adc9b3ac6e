"""Routing proxy: a trained DMR router behind one OpenAI-compatible endpoint.

The agent talks to this server as to any OpenAI-compatible LLM. For each request the proxy rebuilds
the episode's step context from the request itself, asks the router, and forwards the request to
the backend of the precision it chose (bf16 and one low precision, or more with a router of more
classes: one `--upstream NAME=URL` per precision); the chosen precision comes back in the
`X-DMR-Precision` header (with `X-DMR-Score`, the router's high-precision score, `X-DMR-Router-Ms`
the router call's time, `X-DMR-Batch` its number of contexts and `X-DMR-Wait-Ms` the time the
request waited for it) and in the body's `dmr` field. Concurrent requests arriving within
`--batch-window-ms` share one router call (dmr.batcher). With `"stream": true` the answer is
OpenAI's server-sent events (chunks, then `data: [DONE]`), the same headers sent before the first
chunk: an HTTP backend's stream is passed through, an in-process one sends its whole text as one
chunk.

What a request must look like:
- `/v1/completions`: the agent's ReAct prompt (dmr.prompts.react: task line, initial observation,
  then ` action` / observation lines, ending with `>`).
- `/v1/chat/completions`, either protocol of dmr.agent:
  - household (ALFWorld) chat: a multi-turn chat where the first user message holds the task line
    and the initial observation, each assistant message is an action and each later user message
    the observation it produced;
  - WebShop instruction chat (dmr.prompts.instruct): one user message rebuilt every step, the task,
    the initial observation or the last `--instruct-window` steps, then `Admissible actions: ...`.
    The proxy keeps each episode's trajectory to know the steps the window no longer shows; the
    step type (search or click, for a router that decides click steps only) is read from the
    admissible actions.
The episode is the `X-DMR-Episode` header when sent, else derived from the task and the initial
observation (from the task alone for instruction chats, whose later steps do not show the initial
observation; concurrent episodes of one task then need the header). Backends: a URL (an
OpenAI-compatible server such as vLLM; the request is forwarded with its `model` replaced) or a
local checkpoint run in-process by the HF backend.

    python -m dmr.serve --router results/household/tiny/rtn_w2a16/router --budget 0.4 \\
        --high http://localhost:8001 --low http://localhost:8002 --port 8000
"""
import argparse
import hashlib
import hmac
import json
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from pathlib import Path

from dmr import cli, llm
from dmr.batcher import Batcher
from dmr.calibrate import budget_threshold
from dmr.llm import Sampling
from dmr.llm.server import free_port
from dmr.prompts import Episode
from dmr.prompts.instruct import ADMISSIBLE, Instruct
from dmr.prompts.react import React
from dmr.router import PROPOSAL, load_router
from dmr.routing import StepContext


BATCH_WINDOW_MS = 5.0  # how long a routing decision waits for concurrent ones to share its router call


class BadRequest(ValueError):
    """The request cannot be routed; the message says why (answered with 400)."""


class LocalUpstream:
    """A checkpoint served in-process by the HF backend (CPU or GPU)."""

    def __init__(self, path: str, **kwargs):
        self.backend = llm.load("hf", path, **kwargs)
        self.name = path
        self.lock = threading.Lock()

    def _complete(self, prompt: str, body: dict, episode: str) -> tuple[str, int, int, str]:
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        sampling = Sampling(int(body.get("max_tokens") or 16), float(body.get("temperature", 1.0) or 0.0),
                            float(body.get("top_p", 1.0)), seed=body.get("seed"), stop=stop)
        with self.lock:
            g = self.backend.generate([prompt], sampling, sessions=[episode])[0]
        stopped = (stop and any(s in g.text for s in stop)) or g.completion_tokens < sampling.max_new_tokens
        finish = "stop" if stopped else "length"
        return g.text, g.prompt_tokens, g.completion_tokens, finish

    def completions(self, body: dict, episode: str) -> dict:
        text, n_in, n_out, finish = self._complete(body["prompt"], body, episode)
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model", "dmr"),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    def chat(self, body: dict, episode: str) -> dict:
        prompt = self.backend.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        text, n_in, n_out, finish = self._complete(prompt, body, episode)
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "dmr"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    def stream(self, kind: str, body: dict, episode: str) -> Iterator[bytes]:
        """The answer as server-sent events. The HF backend decodes a whole batch at once, so the
        text comes as one chunk (after it is generated), then a chunk with the finish reason."""
        out = self.completions(body, episode) if kind == "completions" else self.chat(body, episode)
        return sse_chunks(out, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    def end(self, episode: str) -> None:
        with self.lock:
            self.backend.end_session(episode)

    def healthy(self) -> bool:
        return True


class HTTPUpstream:
    """An OpenAI-compatible server (vLLM); requests are forwarded with its model name."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(timeout=timeout)
        self.name = model or self.client.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def _post(self, path: str, body: dict) -> dict:
        r = self.client.post(f"{self.url}{path}", json={**body, "model": self.name})
        r.raise_for_status()
        return r.json()

    def completions(self, body: dict, episode: str) -> dict:
        return self._post("/v1/completions", body)

    def chat(self, body: dict, episode: str) -> dict:
        return self._post("/v1/chat/completions", body)

    def stream(self, kind: str, body: dict, episode: str) -> Iterator[bytes]:
        """The upstream's event stream, byte for byte. The request is sent and its status checked
        here, so a backend that refuses it fails the request (502) before any chunk is sent."""
        path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        r = self.client.send(self.client.build_request("POST", f"{self.url}{path}", json={**body, "model": self.name}),
                             stream=True)
        if r.is_error:
            r.read()
            r.close()
            r.raise_for_status()

        def chunks():
            try:
                yield from r.iter_bytes()
            finally:  # also when the client goes away mid-stream
                r.close()
        return chunks()

    def end(self, episode: str) -> None:
        pass

    def healthy(self) -> bool:
        try:
            return self.client.get(f"{self.url}/health", timeout=5).status_code == 200
        except Exception:
            return False


def sse(data) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def sse_chunks(out: dict, include_usage: bool = False) -> Iterator[bytes]:
    """A whole (non-streamed) completion or chat completion as OpenAI's stream of chunks: the text,
    a chunk with the finish reason, the usage when the request asked for it
    (`stream_options.include_usage`), then `[DONE]`."""
    chat = out["object"] == "chat.completion"
    head = {"id": out["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": out["created"], "model": out["model"]}
    for c in out["choices"]:
        if chat:
            first = {"index": c["index"], "delta": {"role": "assistant", "content": c["message"]["content"]},
                     "logprobs": None, "finish_reason": None}
            last = {"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}
        else:
            first = {"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": None}
            last = {"index": c["index"], "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}
        yield sse({**head, "choices": [first]})
        yield sse({**head, "choices": [last]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": out["usage"]})
    yield sse("[DONE]")


def upstream(spec: str, **kwargs):
    return HTTPUpstream(spec) if spec.startswith(("http://", "https://")) else LocalUpstream(spec, **kwargs)


def chat_messages(messages) -> list[dict]:
    """The request's messages as {"role", "content"} with text content (a list of text parts is
    joined), or BadRequest naming what is malformed."""
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list of chat messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role'")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" for c in content):
            content = "".join(str(c.get("text", "")) for c in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be text (a string or a list of text parts)")
        out.append({"role": m["role"], "content": content})
    return out


def is_instruct(messages: list[dict]) -> bool:
    """Whether a chat is one WebShop instruction-style step: a single user message (no assistant
    turn) whose last line lists the admissible actions."""
    users = [m for m in messages if m["role"] == "user"]
    return (len(users) == 1 and not any(m["role"] == "assistant" for m in messages)
            and users[0]["content"].strip().rsplit("\n", 1)[-1].startswith(ADMISSIBLE))


def episode_of_chat(messages: list[dict]) -> Episode:
    """The household chat's episode: task + initial observation, then (action, observation) turns."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise BadRequest("a chat request needs at least one user message (the task and the first observation)")
    goal, _, first = str(users[0].get("content", "")).strip().partition("\n")
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    history, i = [], 1
    while i + 1 < len(turns):
        if turns[i]["role"] != "assistant" or turns[i + 1]["role"] != "user":
            raise BadRequest("chat turns must alternate: user (task), assistant (action), user (observation), ...")
        history.append((str(turns[i]["content"]).strip(), str(turns[i + 1]["content"]).strip()))
        i += 2
    if i < len(turns):
        raise BadRequest("the last chat turn must be a user message (the observation to act on)")
    return Episode(goal.strip(), first.strip(), history)


def whole_history(known: list, shown: list, window: int) -> list:
    """An instruction chat's whole history from the pairs its window `shown` and the history `known`
    from the episode's earlier requests. A window that is not full shows every step; a full one is
    the usual next step (known's tail continued by one pair), else the same step again (a retry),
    else, for an episode the proxy did not see from its start, only what the window shows. In a loop
    of `window` identical steps (with a window of 1: at every step) a retry and the next step look
    alike; it is taken as the next."""
    k = len(shown)
    if k < window:
        return list(shown)
    if len(known) >= k - 1 and known[len(known) - (k - 1):] == shown[:-1]:
        return known + shown[-1:]
    if known[-k:] == shown:
        return list(known)
    return list(shown)


def step_type(admissible: list[str]) -> str:
    """The WebShop step type (dmr.envs.shop and .webshop): a step on the search page, where the
    search bar is admissible, is a `search` step, any other a `click` step."""
    return "search" if any(a.startswith("search[") for a in admissible) else "click"


class Proxy:
    """Routing state shared by all requests: the router, its per-episode cache, the metrics."""

    def __init__(self, router, upstreams: list, style: "React | None" = None, max_episodes: int = 4096,
                 instruct: Instruct | None = None, batch_window_ms: float = BATCH_WINDOW_MS):
        """`upstreams`: one backend per router precision, in the router's order (bf16 first)."""
        self.router = router
        self.precisions = list(router.precisions)
        if len(upstreams) != len(self.precisions):
            raise ValueError(f"the router chooses among {self.precisions}: give one upstream per precision, "
                             f"got {len(upstreams)}")
        self.upstreams = dict(zip(self.precisions, upstreams))
        self.style = style or React()
        self.instruct = instruct or Instruct()
        if self.instruct.window <= 0:
            raise ValueError("an instruct prompt without a window shows no steps; the proxy cannot follow its episodes")
        # Instruction chats' trajectories, which their prompts show only a window of:
        # episode -> (first observation, whole history), the most recently used last.
        self.trajectories: OrderedDict = OrderedDict()
        self.trajectory_lock = threading.Lock()
        self.lock = threading.Lock()
        self.decisions: Counter = Counter()
        self.router_ms: deque = deque(maxlen=10_000)
        self.requests = self.errors = 0
        self.episodes: deque = deque()
        self.max_episodes = max_episodes
        self.router_calls = 0
        # Window 0: each request's decision is its own router call, made in the request's thread.
        self.batcher = Batcher(self.decide, batch_window_ms) if batch_window_ms > 0 else None

    def context(self, kind: str, body: dict, episode_header: str | None) -> StepContext:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if kind == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("'prompt' must be one string (one episode step per request)")
            try:
                ep = self.style.episode(prompt)
            except ValueError as e:
                raise BadRequest(f"{e} (an instruction-style prompt goes to /v1/chat/completions)") from None
        else:
            messages = chat_messages(body.get("messages"))
            if is_instruct(messages):
                return self.instruct_context(messages, episode_header)
            ep = episode_of_chat(messages)
        key = episode_header or "ep-" + hashlib.sha1(f"{ep.goal}\n{ep.first}".encode()).hexdigest()[:16]
        return StepContext(key, len(ep.history), ep.goal, ep.history, ep.observation, [], first=ep.first)

    def instruct_context(self, messages: list[dict], episode_header: str | None) -> StepContext:
        """The step of an instruction chat, its history completed from the episode's trajectory."""
        try:
            ep = self.instruct.episode(next(m["content"] for m in messages if m["role"] == "user"))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        key = episode_header or "ep-" + hashlib.sha1(ep.goal.encode()).hexdigest()[:16]
        with self.trajectory_lock:
            first, known = self.trajectories.pop(key, ("", []))
            if not ep.history:  # the first step shows the initial observation: a new episode
                first, history = ep.first, []
            else:
                history = whole_history(known, ep.history, self.instruct.window)
            self.trajectories[key] = (first, history)
            while len(self.trajectories) > self.max_episodes:
                self.trajectories.popitem(last=False)
        return StepContext(key, len(history), ep.goal, history, ep.observation, ep.admissible,
                           step_type=step_type(ep.admissible), first=first)

    def route(self, kind: str, body: dict, episode_header: str | None = None) -> tuple[dict, dict]:
        """(response body, headers); with `"stream": true` in the body, the body is an iterator of
        server-sent events. Raises BadRequest for requests that cannot be routed."""
        ctx = self.context(kind, body, episode_header)
        t0 = time.perf_counter()
        precision, score, ms, batch, started = self.batcher.submit(ctx) if self.batcher else self.decide([ctx])[0]
        wait = 1000 * (started - t0)
        target = self.upstreams[precision]
        headers = {"X-DMR-Precision": precision, "X-DMR-Score": "" if score is None else f"{score:.6f}",
                   "X-DMR-Router-Ms": f"{ms:.3f}", "X-DMR-Batch": str(batch), "X-DMR-Wait-Ms": f"{wait:.3f}",
                   "X-DMR-Episode": ctx.episode}
        if body.get("stream"):  # the decision travels in the headers only
            return target.stream(kind, body, ctx.episode), headers
        out = target.completions(body, ctx.episode) if kind == "completions" else target.chat(body, ctx.episode)
        out["dmr"] = {"precision": precision, "score": score, "episode": ctx.episode, "step": ctx.step,
                      "router_ms": ms, "batch": batch, "wait_ms": wait}
        return out, headers

    def decide(self, contexts: list[StepContext]) -> list[tuple]:
        """One router call on contexts of distinct episodes, counted in the metrics: per context
        (precision, score, the call's ms, the call's batch size, when the call started)."""
        with self.lock:
            t0 = time.perf_counter()
            choice = self.router.decide(contexts)
            ms = 1000 * (time.perf_counter() - t0)
            scores = list(self.router.last_scores)
            self.router_calls += 1
            for ctx, precision in zip(contexts, choice):
                self.router_ms.append(ms)
                self.decisions[precision] += 1
                self.requests += 1
                if ctx.step == 0:
                    self.episodes.append(ctx.episode)
            while len(self.episodes) > self.max_episodes:  # bound the caches of abandoned episodes
                old = self.episodes.popleft()
                self.router.end_session(old)
                for u in self.upstreams.values():
                    u.end(old)
        return [(precision, score, ms, len(contexts), t0) for precision, score in zip(choice, scores)]

    def metrics(self) -> dict:
        import numpy as np

        ms = np.array(self.router_ms) if self.router_ms else np.zeros(1)
        return {"requests": self.requests, "errors": self.errors, "decisions": dict(self.decisions),
                "router_calls": self.router_calls,
                "router_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                              "n": len(self.router_ms)}}


def unauthorized(header: str | None, api_key: str) -> str | None:
    """Why a request's `Authorization` header does not carry `api_key`, or None when it does."""
    scheme, _, token = (header or "").partition(" ")
    if not header:
        return "missing API key: send the header 'Authorization: Bearer <key>' (the proxy runs with --api-key)"
    if scheme.lower() != "bearer" or not token.strip():
        return "malformed Authorization header: expected 'Bearer <key>'"
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return "incorrect API key"
    return None


def api_key_of(flag: str | None) -> str | None:
    """The key requests must send: --api-key when given, else $DMR_API_KEY, else None (no key)."""
    return flag or os.environ.get("DMR_API_KEY") or None


def app(proxy: Proxy, api_key: str | None = None):
    """The FastAPI app. With `api_key`, every endpoint but /health (open for liveness probes) answers
    401 with an OpenAI-style error unless the request sends `Authorization: Bearer <api_key>`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    api = FastAPI(title="dmr routing proxy")

    if api_key:
        @api.middleware("http")
        async def authenticate(request: Request, call_next):
            if request.url.path != "/health":
                problem = unauthorized(request.headers.get("authorization"), api_key)
                if problem:
                    return JSONResponse({"error": {"message": problem, "type": "invalid_request_error",
                                                   "param": None, "code": "invalid_api_key"}}, status_code=401)
            return await call_next(request)

    async def handle(kind: str, request: Request):
        import anyio

        try:
            body = await request.json()
        except Exception:
            proxy.errors += 1
            return JSONResponse({"error": {"message": "the request body is not valid JSON", "type": "invalid_request_error"}},
                                status_code=400)
        try:
            out, headers = await anyio.to_thread.run_sync(proxy.route, kind, body, request.headers.get("x-dmr-episode"))
        except BadRequest as e:
            proxy.errors += 1
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)
        except Exception as e:  # an upstream failure must not take the proxy down
            proxy.errors += 1
            return JSONResponse({"error": {"message": f"upstream failed: {type(e).__name__}: {e}", "type": "upstream_error"}},
                                status_code=502)
        if isinstance(out, dict):
            return JSONResponse(out, headers=headers)
        return StreamingResponse(guarded(out), media_type="text/event-stream", headers=headers)

    def guarded(events: Iterator[bytes]) -> Iterator[bytes]:
        """A stream whose backend fails midway ends with an error event (the openai client raises it)
        instead of a cut connection."""
        try:
            yield from events
        except Exception as e:
            proxy.errors += 1
            yield sse({"error": {"message": f"upstream failed: {type(e).__name__}: {e}", "type": "upstream_error"}})

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await handle("completions", request)

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle("chat", request)

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "dmr", "object": "model", "owned_by": "dmr"}]}

    @api.get("/health")
    async def health():
        ok = all(u.healthy() for u in proxy.upstreams.values())
        return JSONResponse({"status": "ok" if ok else "degraded"}, status_code=200 if ok else 503)

    @api.get("/metrics")
    async def metrics():
        return proxy.metrics()

    return api


def start_background(proxy: Proxy, host: str = "127.0.0.1", api_key: str | None = None):
    """Serve `proxy` from a daemon thread on a free port (tests, benchmarks, notebooks).
    Returns (base URL, uvicorn server); set `server.should_exit = True` to stop it."""
    import time

    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app(proxy, api_key), host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://{host}:{port}", server


def upstream_specs(router_precisions: list[str], high: str | None = None, low: str | None = None,
                   named: list[str] | None = None) -> list[str]:
    """One backend spec per router precision, in the router's order: from `--upstream NAME=SPEC`
    (repeated; any number of precisions) or the two-precision shorthand `--high`/`--low`."""
    if named and (high or low):
        raise SystemExit("give --upstream NAME=URL per precision, or --high and --low, not both")
    if not named:
        if not (high and low):
            raise SystemExit(f"give --upstream NAME=URL for each of the router's precisions {router_precisions} "
                             "(or --high and --low for a two-precision router)")
        if len(router_precisions) != 2:
            raise SystemExit(f"the router chooses among {router_precisions}: --high/--low name two backends; "
                             "give --upstream NAME=URL for each precision")
        return [high, low]
    by_name = {}
    for item in named:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise SystemExit(f"--upstream {item!r}: expected NAME=URL or NAME=CHECKPOINT")
        if name in by_name:
            raise SystemExit(f"--upstream {name} given twice")
        by_name[name] = spec
    if set(by_name) != set(router_precisions):
        missing, extra = sorted(set(router_precisions) - set(by_name)), sorted(set(by_name) - set(router_precisions))
        raise SystemExit(f"the router chooses among {router_precisions}: "
                         + "; ".join(x for x in (f"no --upstream for {missing}" if missing else "",
                                                 f"--upstream for unknown precisions {extra}" if extra else "") if x))
    return [by_name[p] for p in router_precisions]


def build(router_dir: str, high: str | None = None, low: str | None = None, budget: float | None = None,
          calibration: str | None = None, threshold: float | None = None, prefix: str = "", pace: float | None = None,
          burst: float = 0.0, instruct_window: int = 4, batch_window_ms: float = BATCH_WINDOW_MS,
          upstreams: list[str] | None = None, **backend_kwargs) -> Proxy:
    """`upstreams`: NAME=SPEC per router precision; `high`/`low`: the two-precision shorthand."""
    if (threshold is None) == (budget is None):
        raise SystemExit("give exactly one of --budget (with the router's calibration.json) and --threshold")
    if budget is not None:
        calibration = calibration or str(Path(router_dir) / "calibration.json")
        threshold = budget_threshold(calibration, budget)
    meta = json.loads((Path(router_dir) / "router.json").read_text())
    if meta.get("encoder") == PROPOSAL:
        raise SystemExit(f"{router_dir}: a proposal router (route.router.encoder: proposal) reads the low model's hidden "
                         "states in-process; the proxy only forwards requests to servers. Route it with dmr.agent, or "
                         "serve a text router (encoder: text)")
    router = load_router(router_dir, threshold=threshold)
    if pace is not None:
        router.set_pace(pace, burst)
    specs = upstream_specs(list(router.precisions), high, low, upstreams)
    return Proxy(router, [upstream(spec, **backend_kwargs) for spec in specs], React(prefix=prefix),
                 instruct=Instruct(window=instruct_window), batch_window_ms=batch_window_ms)


def main(argv=None):
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[cli.backend(choose=False), cli.pacing()])
    p.add_argument("--router", required=True, help="trained router directory (dmr.klst)")
    p.add_argument("--upstream", action="append", default=None, metavar="NAME=URL",
                   help="the backend of one router precision (repeat for each: bf16=http://..., w4=..., w3=...): URL of "
                        "an OpenAI-compatible server, or a checkpoint")
    p.add_argument("--high", default=None, help="two-precision shorthand: the high-precision backend (URL or checkpoint)")
    p.add_argument("--low", default=None, help="two-precision shorthand: the low-precision backend (URL or checkpoint)")
    p.add_argument("--budget", type=float, default=None, help="high-precision budget K (threshold from calibration.json)")
    p.add_argument("--calibration", default=None, help="calibration.json (default: the router directory's)")
    p.add_argument("--threshold", type=float, default=None, help="a fixed router threshold instead of --budget")
    p.add_argument("--prefix", default="", help="few-shot prefix the agent's ReAct prompts start with")
    p.add_argument("--instruct-window", type=int, default=4,
                   help="steps the agent's instruction-style (WebShop) prompts show, its prompt.window (the instruct style's "
                        "default 4; config/config.yaml and paper.yaml use 2)")
    p.add_argument("--batch-window-ms", type=float, default=BATCH_WINDOW_MS,
                   help="concurrent requests arriving within this window share one router call (one context per "
                        "episode per call); 0: each request's decision is its own call")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request but /health (default: $DMR_API_KEY; "
                        "unset: no key, as for a proxy reachable from this machine only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    api_key = api_key_of(a.api_key)
    proxy = build(a.router, a.high, a.low, a.budget, a.calibration, a.threshold, a.prefix, a.pace, a.burst,
                  a.instruct_window, a.batch_window_ms, a.upstream, **json.loads(a.backend_kwargs))
    print(f"routing between {proxy.precisions} at threshold {proxy.router.threshold:.4f} on http://{a.host}:{a.port}"
          f" ({'API key required' if api_key else 'no API key'})")
    if not api_key and a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {a.host} without an API key: anyone who reaches the port can use the backends")
    uvicorn.run(app(proxy, api_key), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
