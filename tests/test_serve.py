"""Routing proxy (dmr.serve): household episodes through the official openai client get the same
decisions as the in-process router; bad requests get a 4xx and the proxy stays up."""
from __future__ import annotations

import hashlib
import json

import httpx
import pytest
import torch

from dmr import envs, prompts
from dmr.router import RouterNet, load_router, save_router
from dmr.routing import StepContext
from dmr.prompts import Episode


@pytest.fixture(scope="module")
def proxy_url(tiny_world, noisy_model, tmp_path_factory):
    from dmr.serve import build, start_background

    _, _, model = tiny_world
    d = tmp_path_factory.mktemp("router")
    torch.manual_seed(0)
    save_router(RouterNet(layers=2, window=8), d, ["bf16", "low"])
    proxy = build(str(d), str(model), str(noisy_model), threshold=0.5)
    url, server = start_background(proxy)
    yield url, d, proxy
    server.should_exit = True


def test_episodes_through_openai_client_match_in_process_router(proxy_url):
    from openai import OpenAI

    url, router_dir, proxy = proxy_url
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    local = load_router(router_dir, threshold=0.5)
    style = prompts.get("react")
    env = envs.make("household", max_steps=6)
    tasks = env.tasks("test", 3)
    # A threshold at the median first-step score, so that both precisions get used.
    probe = load_router(router_dir)
    firsts = [env.reset(t) for t in tasks]
    first_scores = probe.scores([StepContext(t.key, 0, o.goal, [], o.text, o.admissible, first=o.text)
                                 for t, o in zip(tasks, firsts)])
    local.threshold = proxy.router.threshold = sorted(first_scores)[1]
    seen = set()
    for task in tasks:
        first = env.reset(task)
        ep = Episode(first.goal, first.text, [], first.admissible)
        for step in range(6):
            raw = client.completions.with_raw_response.create(
                model="dmr", prompt=style.render(None, ep), max_tokens=12, temperature=0, stop=["\n"],
                extra_headers={"X-DMR-Episode": task.key})
            out = raw.parse()
            ctx = StepContext(task.key, step, ep.goal, list(ep.history), ep.observation, ep.admissible, first=ep.first)
            expect = local.decide([ctx])[0]
            assert raw.headers["x-dmr-precision"] == expect, (task.key, step)
            assert float(raw.headers["x-dmr-score"]) == pytest.approx(local.last_scores[0], abs=1e-5)
            seen.add(expect)
            text = out.choices[0].text
            assert out.usage.completion_tokens >= 1
            tr = env.step(style.parse(text) or text.strip())
            ep.history.append((style.parse(text) or text.strip(), tr.text))
            if tr.done:
                break
    m = httpx.get(f"{url}/metrics").json()
    assert sum(m["decisions"].values()) == m["requests"] > 0 and m["router_ms"]["p50"] > 0
    assert seen == {"bf16", "low"}


def test_chat_endpoint_and_derived_episode(proxy_url):
    url, _, _ = proxy_url
    body = {"model": "dmr", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Your task is to: put a mug in fridge.\nYou are in the middle of a room."},
                         {"role": "assistant", "content": "go to fridge 1"},
                         {"role": "user", "content": "The fridge 1 is closed."}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["dmr"]["step"] == 1 and j["dmr"]["episode"].startswith("ep-")
    assert r.headers["x-dmr-precision"] in ("bf16", "low") and j["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("path,payload,needle", [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b'{"prompt": 3}', "'prompt' must be one string"),
    ("/v1/completions", b'{"prompt": "no react prompt"}', "not a ReAct prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "x"}]}', "at least one user message"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "'messages' must be a list"),
    ("/v1/chat/completions", b'{"messages": ["hi"]}', "messages[0] must be an object"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\nAdmissible actions: a"}]}',
     "not an instruct prompt"),
])
def test_bad_requests_get_4xx_and_the_proxy_stays_up(proxy_url, path, payload, needle):
    url, _, _ = proxy_url
    r = httpx.post(url + path, content=payload, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Your task is to: x.\nYou see y.\n>", "max_tokens": 4,
                                                   "temperature": 0}, timeout=60)
    assert ok.status_code == 200


def test_a_proposal_router_is_refused_by_name(tmp_path):
    from dmr.serve import build

    save_router(RouterNet(layers=1, window=1), tmp_path, ["bf16", "low"], encoder="proposal")
    with pytest.raises(SystemExit, match="proposal router"):
        build(str(tmp_path), "unused-high", "unused-low", threshold=0.5)


def _household_prompt():
    env = envs.make("household", max_steps=6)
    task = env.tasks("test", 1)[0]
    first = env.reset(task)
    return task.key, prompts.get("react").render(None, Episode(first.goal, first.text, [], first.admissible))


CHAT = [{"role": "user", "content": "Your task is to: put a mug in fridge.\nYou are in the middle of a room."},
        {"role": "assistant", "content": "go to fridge 1"},
        {"role": "user", "content": "The fridge 1 is closed."}]


def _streamed(url):
    """(completions text, chat text, headers of each) of one prompt and one chat, streamed through the openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    episode, prompt = _household_prompt()
    kw = {"extra_headers": {"X-DMR-Episode": episode}}
    plain = client.completions.create(model="dmr", prompt=prompt, max_tokens=12, temperature=0, **kw)
    raw = client.completions.with_raw_response.create(model="dmr", prompt=prompt, max_tokens=12, temperature=0,
                                                      stream=True, **kw)
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    plain_chat = client.chat.completions.create(model="dmr", messages=CHAT, max_tokens=8, temperature=0)
    raw_chat = client.chat.completions.with_raw_response.create(model="dmr", messages=CHAT, max_tokens=8, temperature=0,
                                                                stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw_chat.parse() if c.choices)
    assert text == plain_chat.choices[0].message.content
    return raw.headers, raw_chat.headers


def test_streaming_through_openai_client_equals_the_whole_answer(proxy_url):
    url, _, _ = proxy_url
    for headers in _streamed(url):
        assert headers["x-dmr-precision"] in ("bf16", "low") and headers["x-dmr-router-ms"]
    # the raw events: OpenAI's chunk format, ending with [DONE]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}})
    events = _events(r.text)
    assert r.status_code == 200 and r.headers["x-dmr-precision"] and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] >= 1 and events[-2]["choices"] == []
    assert [e["choices"][0]["finish_reason"] is not None for e in events[:-2]] == [False, True]


def _events(text: str) -> list:
    """The events of a stream, each chunk without its per-request id and creation second."""
    out = []
    for e in text.split("\n\n"):
        if e:
            data = e.removeprefix("data: ")
            out.append(data if data == "[DONE]" else {k: v for k, v in json.loads(data).items() if k not in ("id", "created")})
    return out


def test_an_http_backend_stream_is_passed_through(proxy_url):
    """A second proxy in front of the first, over HTTP: its streams are the first proxy's events."""
    from dmr.serve import HTTPUpstream, Proxy, start_background

    url, router_dir, _ = proxy_url
    front = Proxy(load_router(router_dir, threshold=0.5), [HTTPUpstream(url), HTTPUpstream(url)])
    front_url, server = start_background(front)
    try:
        for headers in _streamed(front_url):
            assert headers["x-dmr-precision"] in ("bf16", "low")
        body = {"messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
        front_events, back_events = (_events(httpx.post(f"{u}/v1/chat/completions", json=body, timeout=60).text)
                                     for u in (front_url, url))
        assert front_events == back_events and front_events[-1] == "[DONE]"
    finally:
        server.should_exit = True


def test_api_key_is_required_when_set(proxy_url, monkeypatch):
    import openai

    from dmr.serve import api_key_of, start_background

    _, _, proxy = proxy_url
    url, server = start_background(proxy, api_key="s3cret")
    try:
        _, prompt = _household_prompt()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="dmr", prompt=prompt, max_tokens=4, temperature=0).choices[0].text is not None
        assert ok.models.list().data[0].id == "dmr"
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
                model="dmr", prompt=prompt, max_tokens=4)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, timeout=30)
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        server.should_exit = True
    monkeypatch.setenv("DMR_API_KEY", "from-env")
    assert api_key_of(None) == "from-env" and api_key_of("flag") == "flag"
    monkeypatch.setenv("DMR_API_KEY", "")
    assert api_key_of(None) is None


def _shop_episode(seed: int = 1, max_steps: int = 10):
    """(task key, [(Episode at the step, step type)]) of one shop episode: the expert's actions with
    random admissible clicks mixed in, so it runs past the prompt's window and has both step types."""
    import random

    env, rng = envs.make("shop", max_steps=max_steps), random.Random(seed)
    task = env.tasks("test", 1)[0]
    first = env.reset(task)
    ep, kind, steps = Episode(first.goal, first.text, [], first.admissible), first.info["next_step_type"], []
    while True:
        steps.append((Episode(ep.goal, ep.first, list(ep.history), list(ep.admissible)), kind))
        clicks = [a for a in ep.admissible if "<" not in a]
        action = env.expert_action() if rng.random() > 0.4 or not clicks else rng.choice(clicks)
        tr = env.step(action)
        ep.history.append((action, tr.text))
        ep.admissible, kind = tr.admissible, tr.info.get("next_step_type")
        if tr.done:
            return task.key, steps


def test_shop_episode_through_instruct_chat_matches_in_process_router(proxy_url, tmp_path):
    """WebShop's instruction chat, whose prompt shows only the last 2 steps: the proxy's decisions
    and scores equal the in-process router's on the agent's whole-history contexts, search steps
    forced to bf16 by a router that decides click steps (with the episode header and derived)."""
    from openai import OpenAI

    from dmr.prompts.instruct import Instruct
    from dmr.serve import Proxy, start_background

    _, _, base = proxy_url
    torch.manual_seed(1)
    save_router(RouterNet(layers=2, window=8), tmp_path, ["bf16", "low"], eligible=("click",))
    key, steps = _shop_episode()
    contexts = [StepContext(key, i, ep.goal, ep.history, ep.observation, ep.admissible, step_type=kind, first=ep.first)
                for i, (ep, kind) in enumerate(steps)]
    assert len(steps) > 4 and {c.step_type for c in contexts} == {"search", "click"}
    probe = load_router(tmp_path)
    clicks = sorted(s for c in contexts for s in probe.scores([c]) if c.step_type == "click")
    threshold = (clicks[len(clicks) // 2 - 1] + clicks[len(clicks) // 2]) / 2  # both precisions get used
    proxy = Proxy(load_router(tmp_path, threshold=threshold), list(base.upstreams.values()), instruct=Instruct(window=2))
    url, server = start_background(proxy)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    style = prompts.get("instruct", window=2)
    try:
        for header in (key, None):
            local = load_router(tmp_path, threshold=threshold)
            seen = set()
            for (ep, _), ctx in zip(steps, contexts):
                raw = client.chat.completions.with_raw_response.create(
                    model="dmr", messages=[{"role": "user", "content": style.content(ep)}], max_tokens=4,
                    temperature=0, extra_headers={"X-DMR-Episode": header} if header else None)
                expect, score = local.decide([ctx])[0], local.last_scores[0]
                assert raw.headers["x-dmr-precision"] == expect, (header, ctx.step)
                if score is None:  # a search step: not the router's to decide
                    assert raw.headers["x-dmr-score"] == "" and expect == "bf16"
                else:
                    assert float(raw.headers["x-dmr-score"]) == pytest.approx(score, abs=1e-5)
                assert raw.parse().model_extra["dmr"]["step"] == ctx.step
                seen.add((expect, ctx.step_type))
            assert seen == {("bf16", "search"), ("bf16", "click"), ("low", "click")}
            derived = "ep-" + hashlib.sha1(steps[0][0].goal.encode()).hexdigest()[:16]  # from the task alone
            assert raw.headers["x-dmr-episode"] == (header or derived)
    finally:
        server.should_exit = True


def test_whole_history_of_a_windowed_prompt():
    from dmr.serve import whole_history

    a, b, c, d = ("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")
    assert whole_history([], [a], 2) == [a]                    # the window is not full: it is everything
    assert whole_history([a, b], [b, c], 2) == [a, b, c]       # the next step
    assert whole_history([a, b, c], [b, c], 2) == [a, b, c]    # the same step again
    assert whole_history([a, b, c], [c, d], 2) == [a, b, c, d]
    assert whole_history([], [c, d], 2) == [c, d]              # joined midway: what the window shows
    assert whole_history([a, b], [d, c], 2) == [d, c]          # not this episode's trajectory


def _counted(proxy):
    """The episodes of each router call the proxy makes."""
    calls, decide = [], proxy.router.decide

    def counted(contexts):
        calls.append([c.episode for c in contexts])
        return decide(contexts)
    proxy.router.decide = counted
    return calls


def _concurrently(proxy, requests, stagger: float = 0.0):
    """proxy.route on (prompt, episode) pairs from one thread each, started together (or `stagger`
    seconds apart, in order); their (precision, score, step, batch) in request order."""
    import threading
    import time

    out, gate = [None] * len(requests), threading.Barrier(len(requests))

    def one(i, prompt, episode):
        gate.wait()
        time.sleep(i * stagger)
        body, _ = proxy.route("completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0}, episode)
        out[i] = tuple(body["dmr"][k] for k in ("precision", "score", "step", "batch"))
    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("window_ms", [0, 1000])
def test_concurrent_requests_share_one_router_call(proxy_url, window_ms):
    """N episodes' concurrent requests: one router call of batch N within a window, N calls of one
    without; either way the decisions and scores of N separate in-process calls."""
    from dmr.serve import Proxy

    _, router_dir, base = proxy_url
    style, env = prompts.get("react"), envs.make("household", max_steps=6)
    tasks = env.tasks("test", 5)
    firsts = [env.reset(t) for t in tasks]
    eps = [Episode(o.goal, o.text, [], o.admissible) for o in firsts]
    scores = sorted(load_router(router_dir).scores([StepContext(t.key, 0, e.goal, [], e.first, [], first=e.first)
                                                    for t, e in zip(tasks, eps)]))
    threshold = (scores[1] + scores[2]) / 2  # both precisions, no score at the boundary
    proxy = Proxy(load_router(router_dir, threshold=threshold), list(base.upstreams.values()), batch_window_ms=window_ms)
    calls, local, seen = _counted(proxy), load_router(router_dir, threshold=threshold), set()
    for step in range(2):  # every episode's first step, then its second
        got = _concurrently(proxy, [(style.render(None, e), t.key) for t, e in zip(tasks, eps)])
        seen |= {g[0] for g in got}
        for (precision, score, s, batch), t, e in zip(got, tasks, eps):
            expect = local.decide([StepContext(t.key, step, e.goal, list(e.history), e.observation, [], first=e.first)])
            assert (precision, s) == (expect[0], step) and score == pytest.approx(local.last_scores[0], abs=1e-5)
            assert batch == (len(tasks) if window_ms else 1)
        for e in eps:
            e.history.append(("look", "You are in the middle of a room."))
    assert sorted(map(len, calls)) == ([len(tasks)] * 2 if window_ms else [1] * 2 * len(tasks))
    assert seen == {"bf16", "low"}
    assert proxy.metrics()["router_calls"] == len(calls)


def test_requests_of_one_episode_never_share_a_router_call(proxy_url):
    """Within one window: episode A's step 0, B's step 0, A's step 1 (arriving in that order) make
    two calls, [A, B] then [A], and A's step 1 is decided on the cache its step 0 left."""
    from dmr.serve import Proxy

    _, router_dir, base = proxy_url
    style, env = prompts.get("react"), envs.make("household", max_steps=6)
    a, b = env.tasks("test", 2)
    ea, eb = (Episode(o.goal, o.text, [], o.admissible) for o in (env.reset(a), env.reset(b)))
    ea1 = Episode(ea.goal, ea.first, [("look", "You are in the middle of a room.")])
    proxy = Proxy(load_router(router_dir, threshold=0.5), list(base.upstreams.values()), batch_window_ms=1000)
    calls = _counted(proxy)
    got = _concurrently(proxy, [(style.render(None, ea), "A"), (style.render(None, eb), "B"),
                                (style.render(None, ea1), "A")], stagger=0.05)
    assert calls == [["A", "B"], ["A"]] and [g[3] for g in got] == [2, 2, 1]
    local = load_router(router_dir, threshold=0.5)
    for (_, score, step, _), (key, ep) in zip(got, [("A", ea), ("B", eb), ("A", ea1)]):
        local.decide([StepContext(key, len(ep.history), ep.goal, ep.history, ep.observation, [], first=ep.first)])
        assert step == len(ep.history) and score == pytest.approx(local.last_scores[0], abs=1e-5)


def test_three_precisions_three_upstreams(tiny_world, noisy_model, tmp_path):
    """A router of three classes behind one endpoint, one upstream per precision (`--upstream
    NAME=SPEC`): each request, sent with the openai client, reaches the upstream of the precision
    the in-process router picks, and the header names it."""
    from openai import OpenAI

    from dmr.serve import build, start_background, upstream_specs

    _, _, model = tiny_world
    env, style = envs.make("household", max_steps=6), prompts.get("react")
    contexts, eps = [], []
    for task in env.tasks("test", 12):
        first = env.reset(task)
        eps.append((task.key, Episode(first.goal, first.text, [], first.admissible)))
        contexts.append(StepContext(task.key, 0, first.goal, [], first.text, first.admissible, first=first.text))
    torch.manual_seed(3)
    save_router(RouterNet(n_classes=3, layers=1, window=8), tmp_path, ["bf16", "w4", "w2"])
    probe = load_router(tmp_path)
    with torch.no_grad():
        p = torch.tensor(probe._probs(probe._embeddings(contexts)))
    # One threshold per rung (dmr.routing.ladder), placed so that every precision occurs: w2 for
    # the third of steps least likely to need more, then w4 for half of the rest.
    need_w4, need_w2 = p[:, 0], p[:, 0] + p[:, 1]
    t2 = need_w2.sort().values[len(contexts) // 3]
    rest = need_w4[need_w2 >= t2].sort().values
    thresholds = [float(rest[len(rest) // 2]), float(t2)]
    proxy = build(str(tmp_path), threshold=0.5,
                  upstreams=[f"w2={noisy_model}", f"bf16={model}", f"w4={noisy_model}"])
    reached = []
    for name, u in proxy.upstreams.items():  # record which upstream answers each request
        u.completions = (lambda f, n: lambda body, ep: (reached.append(n), f(body, ep))[1])(u.completions, name)
    local = load_router(tmp_path)
    local.threshold = proxy.router.threshold = thresholds
    expect = [local.decide([c])[0] for c in contexts]
    url, server = start_background(proxy)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        got = [client.completions.with_raw_response.create(
            model="dmr", prompt=style.render(None, ep), max_tokens=4, temperature=0, stop=["\n"],
            extra_headers={"X-DMR-Episode": key}).headers["x-dmr-precision"] for key, ep in eps]
    finally:
        server.should_exit = True
    assert got == expect and reached == expect
    assert set(expect) == {"bf16", "w4", "w2"}
    # The CLI's mapping: by name, in the router's order; the two-precision shorthand only for two.
    assert upstream_specs(["bf16", "w4", "w2"], named=["w2=c", "bf16=a", "w4=b"]) == ["a", "b", "c"]
    with pytest.raises(SystemExit, match=r"no --upstream for \['w2'\]"):
        upstream_specs(["bf16", "w4", "w2"], named=["bf16=a", "w4=b"])
    with pytest.raises(SystemExit, match="--high/--low name two backends"):
        upstream_specs(["bf16", "w4", "w2"], "a", "b")
    with pytest.raises(SystemExit, match="expected NAME=URL"):
        upstream_specs(["bf16", "w4"], named=["bf16"])
