"""Bounded load test of the routing proxy on loopback: p50/p99 router overhead per request.

Starts `dmr.serve` in-process with HF upstreams, then C concurrent clients each drive household
episodes through the official openai client. Prints, per request, the router's decision time
(X-DMR-Router-Ms, measured in the proxy) and the whole request latency, as p50/p99.

    python benchmarks/proxy_overhead.py --router results/household/tiny/rtn_w2a16/router \\
        --high results/household/tiny/bf16/model --low results/household/tiny/rtn_w2a16/model
"""
import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", required=True)
    p.add_argument("--high", required=True)
    p.add_argument("--low", required=True)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--episodes", type=int, default=8, help="episodes in all")
    p.add_argument("--max-steps", type=int, default=15)
    a = p.parse_args()

    from openai import OpenAI

    from dmr import envs, prompts
    from dmr.prompts import Episode
    from dmr.serve import build, start_background

    proxy = build(a.router, a.high, a.low, threshold=a.threshold)
    url, server = start_background(proxy)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    style = prompts.get("react")
    env_tasks = envs.make("household", max_steps=a.max_steps).tasks("test", a.episodes)

    def episode(task):
        env = envs.make("household", max_steps=a.max_steps)
        first = env.reset(task)
        ep, rows = Episode(first.goal, first.text, [], first.admissible), []
        while True:
            t0 = time.perf_counter()
            raw = client.completions.with_raw_response.create(model="dmr", prompt=style.render(None, ep), max_tokens=24,
                                                              temperature=0, stop=["\n"],
                                                              extra_headers={"X-DMR-Episode": task.key})
            total = 1000 * (time.perf_counter() - t0)
            rows.append((float(raw.headers["x-dmr-router-ms"]), total))
            text = raw.parse().choices[0].text
            action = style.parse(text) or text.strip()
            tr = env.step(action)
            ep.history.append((action, tr.text))
            if tr.done:
                return rows

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        rows = [r for ep in pool.map(episode, env_tasks) for r in ep]
    wall = time.perf_counter() - t0
    router, total = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    print(f"{len(rows)} requests from {a.clients} concurrent clients in {wall:.1f} s ({len(rows) / wall:.1f} req/s)")
    print(f"{'ms per request':<28}{'p50':>8}{'p99':>8}")
    print(f"{'router decision (proxy)':<28}{np.percentile(router, 50):8.2f}{np.percentile(router, 99):8.2f}")
    print(f"{'whole request (client)':<28}{np.percentile(total, 50):8.2f}{np.percentile(total, 99):8.2f}")
    print(f"router share of the request: {100 * router.sum() / total.sum():.1f}%; decisions {proxy.metrics()['decisions']}")
    server.should_exit = True


if __name__ == "__main__":
    main()
