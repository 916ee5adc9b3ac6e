"""Load and soak test of the routing proxy (dmr.serve) on loopback, with and without batched decisions.

The proxy runs as its own process (`python -m dmr.serve` on 127.0.0.1, so its memory is its own)
in front of two in-process HF backends: the shipped tiny agent (agents/tiny) as bf16 and a
round-to-nearest quantized copy of it. C concurrent clients, each with the official openai client,
play E episodes of the embedded household environment through it. The same load runs twice, with
`--batch-window-ms 0` (each decision its own router call) and with the batched default, and the
table puts the two side by side:
- router wait: what a request spends on its decision, queue (X-DMR-Wait-Ms) + the router call it
  shared (X-DMR-Router-Ms), p50/p99;
- compute per decision: the call's time over its batch (X-DMR-Batch), mean, and the mean batch;
- request: the whole request as the client sees it, p50/p99; decisions (valid requests) per second;
- the proxy process's RSS after start-up, once the first 20% of the episodes have ended (`warm`: its
  bounded caches, such as each HF backend's 64 KV sessions, have filled by then), after the load,
  and its peak; growth from warm to end is what a leak would show;
- errors: valid requests that failed, and with `--malformed P` a share P of extra malformed
  requests (not JSON, a body that is no object, a prompt that is no ReAct prompt, two prompts, a
  chat without a user message, a chat ending on an assistant turn) mixed into the episodes, every
  one of which must get a 4xx without disturbing its episode.
The exit status is 1 when a valid request failed or a malformed one got anything but a 4xx.

Router: `--router DIR` (a text router, with `--budget` and its calibration.json or `--threshold`);
by default a randomly initialized router of the paper's shape (8 layers, d_model 128, window 50:
its latency does not depend on the weights, as in router_latency.py), calibrated at `--budget` on
expert episodes of the calib split, so both backends serve. Everything is sent to 127.0.0.1 only,
episodes and time are bounded (`--time-limit` per run: no new step starts after it), and the proxy
processes are stopped at the end.

    python benchmarks/proxy_soak.py                            # 16 clients, 500 episodes, twice
    python benchmarks/proxy_soak.py --clients 4 --episodes 20 --malformed 0.05
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def expert_episodes(n: int, max_steps: int) -> list[dict]:
    """Noisy expert episodes of the calib split (dmr.expert): calibration steps for the router and
    calibration texts for the quantization, never the test tasks the load plays."""
    from dmr import envs, expert

    env, rng = envs.make("household", max_steps=max_steps), random.Random(0)
    return [expert.episode(env, t, 0.2, rng) for t in env.tasks("calib", n)]


def quantized_copy(high: Path, scheme: str, work: Path, episodes: list[dict]) -> Path:
    """A quantized copy of `high` (dmr.quantize), made once and reused from `work`."""
    out = work / f"{high.name}-{scheme}"
    meta = out / "dmr_quantization.json"
    if meta.exists() and json.loads(meta.read_text())["source_model"] == str(high):
        return out
    from dmr import prompts
    from dmr.quantize import quantize
    from dmr.tokenizer import corpus

    print(f"quantizing {high} ({scheme}) -> {out}", flush=True)
    quantize(high, scheme, list(corpus(episodes, prompts.get("react")))[:32], 512, out)
    return out


def random_router(work: Path, episodes: list[dict]) -> Path:
    """A randomly initialized text router of the paper's shape, with a calibration.json of its
    scores on the expert steps (what dmr.calibrate records), so --budget K sends about K of the
    steps to bf16."""
    import torch

    from dmr.router import RouterNet, load_router, save_router
    from dmr.routing import StepContext

    d = work / "router"
    torch.manual_seed(0)
    save_router(RouterNet(), d, ["bf16", "low"], config={"note": "random init (benchmarks/proxy_soak.py)"})
    router, scores = load_router(d), []
    for t in range(max(len(e["steps"]) for e in episodes)):  # step by step: the router's cache advances per call
        live = [e for e in episodes if t < len(e["steps"])]
        scores += router.scores([StepContext(
            e["task"], t, e["goal"], [(s["action"], s["next_obs"]) for s in e["steps"][:t]], e["steps"][t]["obs"],
            e["steps"][t]["admissible"], first=e["first"]) for e in live])
    (d / "calibration.json").write_text(json.dumps({"scores": scores}))
    return d


class Proxy:
    """`python -m dmr.serve` on a free loopback port, its output in a log file."""

    def __init__(self, args: list[str], log: Path):
        from dmr.llm.server import free_port

        self.port, self.log = free_port(LOOPBACK), log
        self.url = f"http://{LOOPBACK}:{self.port}"
        with log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "dmr.serve", *args, "--host", LOOPBACK,
                                          "--port", str(self.port)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the proxy exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the proxy did not start within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def memory_mib(self) -> dict:
        """Resident set size now and at its peak (VmRSS, VmHWM), MiB."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def malformed(kind: int, client, http, url: str, episode: str) -> int:
    """Send one malformed request of `kind`; its HTTP status (0 when no answer came)."""
    import openai

    headers = {"X-DMR-Episode": episode}
    try:
        if kind == 0:  # not JSON
            return http.post(f"{url}/v1/completions", content=b'{"prompt": ', headers={
                **headers, "Content-Type": "application/json"}).status_code
        if kind == 1:  # JSON, not an object
            return http.post(f"{url}/v1/chat/completions", json=[1, 2], headers=headers).status_code
        if kind == 2:  # a prompt that is no ReAct prompt
            client.completions.create(model="dmr", prompt="hello there", max_tokens=4, extra_headers=headers)
        elif kind == 3:  # two prompts in one request
            client.completions.create(model="dmr", prompt=["a", "b"], max_tokens=4, extra_headers=headers)
        elif kind == 4:  # a chat without a user message
            client.chat.completions.create(model="dmr", messages=[{"role": "system", "content": "be brief"}],
                                           max_tokens=4, extra_headers=headers)
        else:  # a chat that ends on an assistant turn
            client.chat.completions.create(model="dmr", max_tokens=4, extra_headers=headers, messages=[
                {"role": "user", "content": "Your task is to: put a mug in fridge.\nYou are in a room."},
                {"role": "assistant", "content": "go to fridge 1"}])
    except openai.APIStatusError as e:
        return e.status_code
    except Exception:
        return 0
    return 200


def load(url: str, a, on_warm=None) -> dict:
    """Play `a.episodes` test episodes with `a.clients` concurrent clients; per valid request
    (router wait ms, compute ms per decision, batch, request ms), and the failures. `on_warm()` is
    called once, when the first `a.warm` share of the episodes has ended."""
    import httpx
    from openai import OpenAI

    from dmr import envs, prompts
    from dmr.prompts import Episode

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=a.request_timeout)
    http = httpx.Client(timeout=a.request_timeout)
    style = prompts.get("react")
    tasks = envs.make("household", max_steps=a.max_steps).tasks("test", a.episodes)
    deadline = time.time() + a.time_limit
    rows, failed, bad, malformed_status = [], [], [], []
    lock = threading.Lock()
    ended, warm_at = [0], max(1, round(a.warm * len(tasks)))

    def count_end():
        with lock:
            ended[0] += 1
            warm = ended[0] == warm_at
        if warm and on_warm:
            on_warm()

    def episode(task) -> bool:
        rng = random.Random(f"{a.seed}/{task.key}")
        env = envs.make("household", max_steps=a.max_steps)
        first = env.reset(task)
        ep = Episode(first.goal, first.text, [], first.admissible)
        while time.time() < deadline:
            if rng.random() < a.malformed:
                status = malformed(rng.randrange(6), client, http, url, task.key)
                with lock:
                    malformed_status.append(status)
                    if not 400 <= status < 500:
                        bad.append(status)
            t0 = time.perf_counter()
            try:
                raw = client.completions.with_raw_response.create(
                    model="dmr", prompt=style.render(None, ep), max_tokens=a.max_tokens, temperature=0, stop=["\n"],
                    extra_headers={"X-DMR-Episode": task.key})
                text = raw.parse().choices[0].text
            except Exception as e:  # a failed valid request ends its episode
                with lock:
                    failed.append(f"{task.key} step {len(ep.history)}: {type(e).__name__}: {e}")
                return False
            total = 1000 * (time.perf_counter() - t0)
            h = raw.headers
            router_ms, batch = float(h["x-dmr-router-ms"]), int(h["x-dmr-batch"])
            with lock:
                rows.append((float(h["x-dmr-wait-ms"]) + router_ms, router_ms / batch, batch, total,
                             h["x-dmr-precision"]))
            action = style.parse(text) or text.strip()
            tr = env.step(action)
            ep.history.append((action, tr.text))
            if tr.done:
                return True
        return False

    t0 = time.perf_counter()
    def played(task) -> bool:
        try:
            return episode(task)
        finally:
            count_end()

    with ThreadPoolExecutor(a.clients) as pool:
        finished = sum(pool.map(played, tasks))
    wall = time.perf_counter() - t0
    http.close()
    return {"rows": rows, "failed": failed, "bad": bad, "malformed": malformed_status, "finished": finished,
            "wall": wall, "metrics": httpx.get(f"{url}/metrics", timeout=30).json()}


def run_once(window: float, serve_args: list[str], a, work: Path) -> dict:
    proxy = Proxy([*serve_args, "--batch-window-ms", f"{window:g}"], work / f"proxy_window{window:g}.log")
    try:
        proxy.wait_ready()
        start, warm = proxy.memory_mib(), {}
        r = load(proxy.url, a, on_warm=lambda: warm.update(proxy.memory_mib()))
        end = proxy.memory_mib()
    finally:
        proxy.stop()
    r.update(rss_start=start["VmRSS"], rss_warm=warm.get("VmRSS", np.nan), rss_end=end["VmRSS"],
             rss_peak=end["VmHWM"])
    return r


def summary(r: dict) -> dict:
    rows = r["rows"] or [(np.nan,) * 4 + ("",)]
    wait, per_decision, batch, total = (np.array([x[i] for x in rows], dtype=float) for i in range(4))
    high = sum(x[4] == "bf16" for x in r["rows"])
    return {
        "router wait p50 (ms)": np.percentile(wait, 50), "router wait p99 (ms)": np.percentile(wait, 99),
        "compute / decision (ms)": per_decision.mean(), "decisions per call": batch.mean(),
        "request p50 (ms)": np.percentile(total, 50), "request p99 (ms)": np.percentile(total, 99),
        "decisions / s": len(r["rows"]) / r["wall"],
        "proxy RSS start (MiB)": r["rss_start"], "proxy RSS warm (MiB)": r["rss_warm"],
        "proxy RSS end (MiB)": r["rss_end"], "proxy RSS peak (MiB)": r["rss_peak"],
        "RSS end / warm": r["rss_end"] / r["rss_warm"],
        "valid requests": len(r["rows"]), "bf16 share": high / max(1, len(r["rows"])),
        "episodes finished": r["finished"], "wall (s)": r["wall"],
        "valid failed": len(r["failed"]), "malformed sent": len(r["malformed"]),
        "malformed 4xx": sum(400 <= s < 500 for s in r["malformed"]), "malformed not 4xx": len(r["bad"]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--episodes", type=int, default=500, help="episodes per run (test split of the household env)")
    p.add_argument("--time-limit", type=float, default=1800, help="seconds per run; no step starts after it")
    p.add_argument("--malformed", type=float, default=0.0, help="chance of a malformed request before each step")
    p.add_argument("--batch-window-ms", type=float, default=None,
                   help="the batched run's window (default: dmr.serve's, 5 ms); the other run uses 0")
    p.add_argument("--max-steps", type=int, default=15, help="episode step limit")
    p.add_argument("--warm", type=float, default=0.2,
                   help="share of the episodes after which the proxy's RSS is read again (`warm`): its bounded "
                        "caches (the backends' 64 KV sessions, the router's episodes) are full by then")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--high", type=Path, default=ROOT / "agents/tiny", help="bf16 checkpoint")
    p.add_argument("--low", type=Path, default=None, help="low-precision checkpoint (default: --scheme copy of --high)")
    p.add_argument("--scheme", default="rtn_w4a16", help="dmr.quantize scheme of the default low checkpoint")
    p.add_argument("--router", type=Path, default=None, help="a trained text router (default: random init, calibrated)")
    p.add_argument("--budget", type=float, default=0.4, help="high-precision budget K (threshold from calibration.json)")
    p.add_argument("--threshold", type=float, default=None, help="a fixed threshold instead of --budget")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dmr_proxy_soak",
                   help="router, quantized copy (reused) and proxy logs")
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=0, help="where the malformed requests fall")
    a = p.parse_args()
    from dmr.serve import BATCH_WINDOW_MS

    window = BATCH_WINDOW_MS if a.batch_window_ms is None else a.batch_window_ms
    if window <= 0:
        raise SystemExit("--batch-window-ms is the batched run's window: give one > 0")
    a.work.mkdir(parents=True, exist_ok=True)
    episodes = expert_episodes(32, a.max_steps) if a.low is None or a.router is None else []
    low = a.low or quantized_copy(a.high.resolve(), a.scheme, a.work, episodes)
    router = a.router or random_router(a.work, episodes)
    choose = ["--threshold", str(a.threshold)] if a.threshold is not None else ["--budget", str(a.budget)]
    serve_args = ["--router", str(router), *choose, "--high", str(a.high), "--low", str(low)]
    print(f"{a.clients} clients x {a.episodes} episodes (max {a.max_steps} steps), malformed {a.malformed:g}, "
          f"time limit {a.time_limit:g} s per run; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
          f"proxy: {' '.join(serve_args)}", flush=True)
    results = {}
    for w in (0.0, window):
        print(f"run with --batch-window-ms {w:g} ...", flush=True)
        results[w] = run_once(w, serve_args, a, a.work)
    s0, s1 = summary(results[0.0]), summary(results[window])
    name = f"window {window:g} ms"
    print(f"\n{'':<26}{'window 0':>12}{name:>14}{'batched / 0':>13}")
    for k in s0:
        counted = k.startswith(("valid", "malformed", "episodes"))  # counts: side by side, no ratio
        ratio = "" if counted or not s0[k] else f"{s1[k] / s0[k]:.2f}"
        fmt = "d" if counted else ".2f"
        print(f"{k:<26}{s0[k]:>12{fmt}}{s1[k]:>14{fmt}}{ratio:>13}")
    problems = []
    for w, r in results.items():
        m = r["metrics"]
        print(f"window {w:g}: proxy /metrics requests {m['requests']}, router calls {m['router_calls']}, "
              f"errors {m['errors']}, decisions {m['decisions']}")
        problems += [f"window {w:g}: {f}" for f in r["failed"][:5]]
        problems += [f"window {w:g}: a malformed request got status {s or 'no answer'}" for s in r["bad"][:5]]
    for line in problems:
        print("FAIL", line)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
