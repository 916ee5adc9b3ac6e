"""GPU check (issue 29, item 8): the Python side of benchmarks/gpu_check.sh.

The shell script runs the stages, each time-boxed; this helper gives it what it needs and gathers
what the stages left into one results.json and one results.md:

    plan       shell assignments for the stages, read from the config (cell, prompt, decoding, sizes)
    wheels     the packages the device's image lacks, pinned to this venv's versions (for --fetch-wheels)
    pins       NAME==VERSION of requirements.txt for the names given (installs from a registry)
    probe      the machine: GPU, Python, package versions, the source commit -> env.json
    serve      start one vLLM server per model, each on its own (one failing does not stop the
               others), write servers.json, and keep them up until SIGTERM
    cli        run a dmr entry point (dmr.agent, dmr.kl) whose `--backend vllm` models talk to the
               servers of servers.json instead of starting their own
    throughput agent-loop throughput at 1 vs N shards (benchmarks/rollout_throughput.py's measure)
    gather     stages.tsv, logs and artefacts of a work folder -> results.json, results.md

`gather` runs again anywhere on the artefacts the device sends back (artefacts.tar.gz unpacked):
    python benchmarks/gpu_check.py gather --work DIR --out DIR

Only the standard library is imported at the top: `pins` and `probe` run on a bare Python (`plan`
needs PyYAML).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the device's image lacks for dmr's CPU-free stages (quantize, rollouts, KL, gather): its
# python3 already has a CUDA torch, transformers, tokenizers, pyarrow, numpy, tqdm and pyyaml.
OVERLAY = ["polars", "polars-runtime-32", "llmcompressor", "compressed-tensors", "loguru", "datasets", "dill",
           "multiprocess", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
# The vLLM backend's client (dmr.llm.vllm) needs openai too; only useful where a vLLM can run.
CLIENT = ["openai", "httpx2", "httpcore2", "truststore", "jiter", "sniffio"]
VERSIONS = ["torch", "transformers", "tokenizers", "llmcompressor", "compressed-tensors", "polars", "datasets",
            "pyarrow", "numpy", "openai", "vllm", "flashinfer-python"]
STATUSES = ("ok", "failed", "timeout", "skipped")


# ---------------------------------------------------------------------------------------------- plan

def plan(config: dict, cell: str, dry: bool) -> dict[str, str]:
    """The stages' parameters for one cell of a config: its environment, prompt and decoding, the
    bf16 checkpoint and its quantization calibration, and the sizes of the check (tiny when `dry`)."""
    bench_name, _, model_name = cell.partition("/")
    if bench_name not in config.get("benchmarks", {}) or model_name not in config.get("models", {}):
        raise SystemExit(f"cell {cell!r}: the config has no benchmark {bench_name!r} or model {model_name!r}")
    bench, model = config["benchmarks"][bench_name], config["models"][model_name]
    if model.get("source", "path") != "path":
        raise SystemExit(f"cell {cell!r}: model {model_name!r} is not a shipped checkpoint (source: path)")
    dec = bench.get("decoding", {})
    env_kwargs = dict(bench.get("env_kwargs", {}))
    cal = model.get("quantize", {}).get("calibration", {})
    expert = {"noise": 0.0, "clean_fraction": 0.5} | model.get("expert", {})
    sizes = {"POOL_N": 64, "TEST_N": 32, "THRU_EPISODES": 16, "THRU_SHARDS": "1 16", "CAL_SAMPLES": cal.get("samples", 128),
             "CAL_LEN": cal.get("max_seq_length", 512), "EXPERT_N": 2 * cal.get("samples", 128), "SHARDS": 16}
    if dry:
        env_kwargs["max_steps"] = min(int(env_kwargs.get("max_steps", 6)), 6)
        sizes |= {"POOL_N": 3, "TEST_N": 3, "THRU_EPISODES": 2, "THRU_SHARDS": "1 2", "CAL_SAMPLES": 8, "CAL_LEN": 128,
                  "EXPERT_N": 16, "SHARDS": 4}
    flags = [f"--max-new-tokens {dec.get('max_new_tokens', 24)}", f"--temperature {dec.get('temperature', 0.0)}"]
    if dec.get("constrained"):
        flags.append("--constrained")
    expert_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in expert.items())
    out = {"CELL": cell, "ENV": bench["env"], "ENV_KWARGS": json.dumps(env_kwargs),
           "PROMPT": json.dumps(bench.get("prompt", {"style": "react"})), "DECODING": " ".join(flags),
           "BF16": str((ROOT / model["path"]).resolve()), "EXPERT_FLAGS": expert_flags,
           "COEFFICIENTS": json.dumps(config.get("latency", {}).get("coefficients", {}))}
    return out | {k: str(v) for k, v in sizes.items()}


def shell_assignments(values: dict[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def pins(requirements: Path, names: list[str]) -> list[str]:
    """NAME==VERSION from requirements.txt for each name it pins, the bare name otherwise."""
    pinned = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pinned[_norm(m.group(1))] = f"{m.group(1)}=={m.group(2)}"
    return [pinned.get(_norm(n), n) for n in names]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(names: list[str]) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


# --------------------------------------------------------------------------------------------- probe

def probe(registry: str, source: Path | None) -> dict:
    """What the check ran on: Python, the GPU (nvidia-smi and torch), package versions, the commit."""
    import platform
    import subprocess

    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count(), "registry": registry, "versions": installed(VERSIONS)}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as e:  # a broken torch is what the probe is there to say
        info["torch_error"] = f"{type(e).__name__}: {e}"
    info["source"] = source_commit(source)
    return info


def source_commit(carried: Path | None) -> dict:
    """The commit the check ran: git where the checkout has .git, else the SOURCE file that
    `gpu_check.sh --fetch-wheels` writes into the carried wheel folder."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return {"commit": head.stdout.strip(), "dirty": bool(dirty), "from": "git"}
    except (OSError, subprocess.TimeoutExpired):
        pass
    if carried is not None and carried.exists():
        return json.loads(carried.read_text()) | {"from": str(carried)}
    return {"commit": os.environ.get("DMR_GPU_CHECK_COMMIT", "unknown"), "from": "DMR_GPU_CHECK_COMMIT"}


# ---------------------------------------------------------------------------------------- vLLM plumbing

def serve(models: dict[str, str], python: str, out: Path, log_dir: Path, gmu: float, extra: list[str],
          timeout: float) -> None:
    """Start a server per model, one after the other (each profiles free memory while it loads),
    each on its own: a model vLLM cannot load (W3A16: no 3-bit kernel) is recorded, not fatal.
    servers.json is rewritten after every attempt; `done` is set once all were tried."""
    from dmr.llm import server as srv

    state: dict = {"done": False, "servers": {}}

    def write():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, out)

    live = []
    for name, model in models.items():
        t0 = time.monotonic()
        spec = srv.ServerSpec(model=model, port=srv.free_port(), gpu_memory_utilization=gmu, extra_args=list(extra))
        try:
            (s,) = srv.start([spec], python=python, timeout=timeout, log_dir=log_dir)
            live.append(s)
            state["servers"][name] = {"model": model, "url": s.url, "log": str(s.log),
                                      "kernels": kernels(s.log.read_text(errors="replace"))}
        except Exception as e:
            state["servers"][name] = {"model": model, "error": str(e).splitlines()[0][:2000],
                                      "first_error": srv.first_error(str(e)), "log": str(log_dir / f"server-{spec.port}.log")}
        state["servers"][name]["seconds"] = round(time.monotonic() - t0, 1)
        write()
    state["done"] = True
    write()
    # dmr.llm.server stops every live server on SIGTERM (its handler) and at exit.
    signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
    while any(s.alive() for s in live):
        time.sleep(1)
    sys.exit(0 if live else 1)


def kernels(log: str) -> list[str]:
    """The linear-layer kernels a vLLM server chose, from its log ("Using MarlinLinearKernel for
    CompressedTensorsWNA16"): which quantized kernel serves a scheme."""
    return sorted(set(re.findall(r"Using (\w+) for ", log)))


def shared_loader(servers: dict, load):
    """`dmr.llm.load` with every vLLM model that servers.json serves bound to its server (base_url),
    so an entry point's `--backend vllm` reuses running servers instead of starting its own."""
    urls = {v["model"]: v for v in servers.values()}

    def bound(name: str, model: str, **kwargs):
        if name != "vllm" or "base_url" in kwargs or "server" in kwargs:
            return load(name, model, **kwargs)
        entry = urls.get(str(model))
        if entry is None:
            raise RuntimeError(f"no vLLM server for {model}; servers.json has {sorted(urls)}")
        if "url" not in entry:
            raise RuntimeError(f"the vLLM server for {model} did not start: {entry.get('error')}")
        return load(name, model, base_url=entry["url"], **kwargs)

    return bound


def run_cli(servers_json: Path, module: str, argv: list[str]) -> None:
    import importlib

    from dmr import llm

    servers = json.loads(servers_json.read_text())["servers"]
    llm.load = shared_loader(servers, llm.load)
    importlib.import_module(module).main(argv)


def throughput(backend_name: str, model: str, servers_json: Path | None, episodes: int, shards: list[int],
               env_kwargs: dict, prompt: dict, constrained: bool, out: Path) -> dict:
    """Episodes/s and steps/s of the agent loop at each shard count (rollout_throughput.measure)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rollout_throughput import measure

    from dmr import llm

    if backend_name == "vllm":
        if servers_json is None:
            raise SystemExit("--backend vllm needs --servers")
        llm.load = shared_loader(json.loads(servers_json.read_text())["servers"], llm.load)
    backend = llm.load(backend_name, model)
    rows = {}
    for n in shards:
        eps, steps, per_cpu = measure(backend, env_kwargs, episodes, n, prompt, constrained)
        rows[str(n)] = {"episodes_per_s": eps, "steps_per_s": steps, "steps_per_cpu_s": per_cpu}
        print(f"{backend_name} shards={n}: {eps:.3f} episodes/s, {steps:.2f} steps/s", flush=True)
    backend.close()
    base = rows[str(shards[0])]
    result = {"backend": backend_name, "model": model, "episodes": episodes, "shards": rows,
              "speedup": {k: v["episodes_per_s"] / base["episodes_per_s"] for k, v in rows.items()}}
    out.write_text(json.dumps(result, indent=1))
    return result


# -------------------------------------------------------------------------------------------- gather

def read_stages(path: Path) -> list[dict]:
    """stages.tsv: name, status, exit code, seconds, limit, reason (one line per stage, as run)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, status, rc, secs, limit, reason = (line.split("\t") + [""] * 6)[:6]
        if status not in STATUSES:
            raise ValueError(f"{path}: stage {name!r} has unknown status {status!r}")
        rows.append({"name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                     "seconds": float(secs) if secs else None, "limit": float(limit) if limit else None,
                     "reason": reason})
    return rows


def log_error(log: Path, lines: int = 3) -> str:
    """What went wrong, from a stage's log: its first exception line (vLLM's root cause comes
    first), else its last non-empty lines."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")
    found = re.search(r"(?m)^.*\b[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b: .*$", text)
    if found:
        return found.group(0).strip()[:500]
    tail = [x for x in text.splitlines() if x.strip()][-lines:]
    return " / ".join(tail)[:500]


def _rows(path: Path):
    import polars as pl

    from dmr.rundir import read_jsonl

    rows = read_jsonl(path)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else None


def kl_summary(df) -> dict:
    q = df["kl"].quantile
    out = {"steps": df.height, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": float(df["kl"].max())}
    if "kl_topk_missing" in df.columns:
        out["topk_missing_steps"] = float((df["kl_topk_missing"] > 0).mean())
    return out


def kl_compare(hf, vllm, top: float = 0.2) -> dict:
    """The vLLM backend's step KL (top-k, coarsened) against the HF backend's (exact) on the same
    pool steps: rank agreement (Spearman), the share of HF's top-`top` steps that vLLM's top-`top`
    also holds (what routing labels depend on: tau sits near that quantile), the error on that tail
    (median |vLLM / HF - 1|, and the ratio of the 90th and 99th percentiles), and the share of
    steps where vLLM's KL exceeds HF's by over 5% (the coarsened KL never exceeds the exact one
    between the same distributions, so these measure the two engines' numeric difference)."""
    import numpy as np
    import polars as pl

    from dmr.ablation import top_k
    from dmr.diagnose import spearman

    j = hf.select("task", "step", "kl").join(vllm.select("task", "step", pl.col("kl").alias("kl_vllm")), on=["task", "step"])
    if j.height == 0:
        raise ValueError("the HF and vLLM KL tables share no (task, step)")
    h, v = j["kl"].to_numpy(), j["kl_vllm"].to_numpy()
    th, tv = top_k(h, top), top_k(v, top)
    tail = th & (h > 0)
    return {"steps": j.height, "hf_only": hf.height - j.height, "vllm_only": vllm.height - j.height,
            "spearman": spearman(h, v), "top": top, "top_overlap": float((th & tv).sum() / max(1, th.sum())),
            "tail_median_rel_error": float(np.median(np.abs(v[tail] / h[tail] - 1))) if tail.any() else float("nan"),
            "p90_ratio": _ratio(np.quantile(v, 0.9), np.quantile(h, 0.9)),
            "p99_ratio": _ratio(np.quantile(v, 0.99), np.quantile(h, 0.99)),
            "above_exact_share": float((v > h * 1.05 + 1e-9).mean())}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def run_rows(runs_dir: Path, coefficients: dict) -> list[dict]:
    """One row per rollout under runs_dir/BACKEND/RUN: success, steps, the high-precision share,
    and the per-step latency (Eq. 9's per-token coefficient c_p = elapsed call time / completion
    tokens, dmr.latency.token_coefficient; and the mean call time a step waited), with each
    single-precision run's ratio to the same backend's bf16 run next to Table 3's ratio from the
    config's coefficients, and the W3 coefficient projected from a measured W4 (c_W4 / 1.15)."""
    from dmr import latency

    rows = []
    for spec_path in sorted(runs_dir.glob("*/*/spec.json")):
        run = spec_path.parent
        spec = json.loads(spec_path.read_text())
        eps, steps = _rows(run / "episodes.jsonl"), _rows(run / "steps.jsonl")
        if eps is None or steps is None:
            continue
        precisions = list(spec["models"])
        quant = precisions[-1] if spec["policy"] == "quant" else (precisions[0] if spec["policy"] == "full" else None)
        row = {"backend": run.parent.name, "run": run.name, "policy": spec["policy"], "precisions": precisions,
               "quant": quant, "episodes": eps.height, "success": float(eps["won"].mean()),
               "steps_mean": float(eps["steps"].mean()),
               "high_share": float(eps["high_calls"].sum() / max(1, eps["calls"].sum())) if spec["policy"] != "quant" else 0.0}
        if quant is not None:
            c = latency.token_coefficient([steps])
            row |= {"ms_per_token": 1e3 * c["coef"], "ms_per_step": 1e3 * float(steps["llm_time"].mean()),
                    "tokens": c["tokens"], "calls": c["calls"]}
        rows.append(row)
    full = {r["backend"]: r for r in rows if r["policy"] == "full" and "ms_per_token" in r}
    for r in rows:
        base = full.get(r["backend"])
        if r["policy"] == "quant" and base and "ms_per_token" in r:
            r["low_vs_high"] = r["ms_per_token"] / base["ms_per_token"]
            try:
                per, _ = latency.config_coefficients(coefficients, [r["quant"]])
                r["table3_low_vs_high"] = per[r["quant"]] / per["bf16"]
            except ValueError:
                r["table3_low_vs_high"] = None
    for backend in {r["backend"] for r in rows}:
        w4 = {r["quant"]: r["ms_per_token"] for r in rows
              if r["backend"] == backend and r["policy"] == "quant" and "_w4a" in (r["quant"] or "")}
        w3 = [r for r in rows if r["backend"] == backend and r["policy"] == "quant" and "_w3a" in (r["quant"] or "")]
        if w4:
            proj = latency.w3_projection([r["quant"] for r in w3] or ["gptq_w3a16"], w4)
            for r in w3:
                r["w3_projected_ms_per_token"] = proj[r["quant"]][1]
    return rows


def gather(work: Path, out: Path) -> dict:
    """Everything the stages left under `work`, as one dict (results.json) and its Markdown."""
    stages = read_stages(work / "stages.tsv")
    for s in stages:
        if s["status"] in ("failed", "timeout"):
            s["error"] = log_error(work / "logs" / f"{s['name']}.log")
    res: dict = {"env": _json(work / "env.json"), "plan": _json(work / "plan.json"), "stages": stages,
                 "servers": (_json(work / "servers.json") or {}).get("servers", {}), "problems": []}
    res["quantize"] = {}
    for meta in sorted(work.glob("models/*/dmr_quantization.json")):
        m = json.loads(meta.read_text())
        res["quantize"][m["scheme"]] = {"calibration_samples": m["calibration_samples"],
                                        "max_seq_length": m["max_seq_length"], **m.get("agreement", {}),
                                        "versions": m.get("versions", {})}
    try:
        import polars  # noqa: F401
    except ImportError as e:
        res["problems"].append(f"gather: polars is missing ({e}); KL, rollouts and latency left out "
                               "(run `gather` again where polars is, on the unpacked artefacts)")
        return _finish(res, out)
    res["kl"] = {}
    for hf_path in sorted(work.glob("kl/hf_*.jsonl")):
        scheme = hf_path.stem[3:]
        entry = {}
        try:
            hf = _rows(hf_path)
            entry["hf"] = kl_summary(hf)
            vl = _rows(work / "kl" / f"vllm_{scheme}.jsonl")
            if vl is not None:
                entry["vllm"] = kl_summary(vl)
                entry["compare"] = kl_compare(hf, vl)
        except Exception as e:
            res["problems"].append(f"kl {scheme}: {type(e).__name__}: {e}")
        res["kl"][scheme] = entry
    try:
        res["rollouts"] = run_rows(work / "rollouts", (res["plan"] or {}).get("COEFFICIENTS") or {})
    except Exception as e:
        res["rollouts"] = []
        res["problems"].append(f"rollouts: {type(e).__name__}: {e}")
    res["throughput"] = {p.stem.split("_", 1)[1]: json.loads(p.read_text()) for p in sorted(work.glob("throughput_*.json"))}
    return _finish(res, out)


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _finish(res: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(markdown(res))
    return res


def _cell(text: str | None, n: int = 300) -> str:
    """Text for one Markdown table cell: vLLM's log prefixes gone, whitespace collapsed, no pipes."""
    text = re.sub(r"\(\w+ pid=\d+\)\s+[A-Z]+\s+[\d-]+ [\d:.]+ \[[^\]]*\]\s*", "", text or "")
    return " ".join(text.split()).replace("|", "/")[:n]


def _f(x, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return format(x, fmt)


def markdown(res: dict) -> str:
    env, plan_ = res.get("env") or {}, res.get("plan") or {}
    src = env.get("source", {})
    dirty = " (uncommitted changes)" if src.get("dirty") else ""
    lines = ["# GPU check (benchmarks/gpu_check.sh)", "",
             f"Commit {src.get('commit', 'unknown')}{dirty}; cell {plan_.get('CELL', '?')}; "
             f"{'CPU smoke run (tiny sizes, numbers meaningless)' if plan_.get('DRY') == '1' else 'full run'}; "
             f"GPU: {env.get('gpu') or env.get('nvidia_smi') or 'none'}; Python {env.get('python', '?')}, "
             + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v) + ".", "",
             "## Stages", "", "| stage | status | seconds | limit | reason or error |", "|---|---|---|---|---|"]
    for s in res.get("stages", []):
        why = s.get("error") or s.get("reason") or ""
        lines.append(f"| {s['name']} | {s['status']} | {_f(s['seconds'], '.0f')} | {_f(s['limit'], '.0f')} | "
                     f"{_cell(why, 500)} |")
    if res.get("servers"):
        lines += ["", "## vLLM servers", "", "| model | started | seconds | linear kernels | error |", "|---|---|---|---|---|"]
        for name, s in res["servers"].items():
            lines.append(f"| {name} | {'yes' if 'url' in s else 'no'} | {_f(s.get('seconds'), '.0f')} | "
                         f"{', '.join(s.get('kernels', [])) or '–'} | {_cell(s.get('first_error') or s.get('error'))} |")
    if res.get("quantize"):
        lines += ["", "## Quantization (llmcompressor oneshot)", "",
                  "| scheme | top-1 agreement with bf16 | mean KL(bf16 ‖ quant) per position | samples | versions |",
                  "|---|---|---|---|---|"]
        for q, m in res["quantize"].items():
            v = ", ".join(f"{k} {x}" for k, x in m.get("versions", {}).items())
            lines.append(f"| {q} | {_f(m.get('top1_agreement'))} | {_f(m.get('mean_kl'), '.2e')} | "
                         f"{m['calibration_samples']} | {v} |")
    if res.get("kl"):
        lines += ["", "## Step KL: vLLM (top-20, coarsened) against HF (exact), same pool steps", "",
                  "| scheme | steps | HF p50 / p90 / p99 | vLLM p50 / p90 / p99 | Spearman | top-20% overlap "
                  "| tail median rel. error | p90 ratio | p99 ratio | vLLM > HF (5%) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for q, e in res["kl"].items():
            h, v, c = e.get("hf", {}), e.get("vllm", {}), e.get("compare", {})
            qs = lambda d: " / ".join(_f(d.get(k), ".2e") for k in ("p50", "p90", "p99")) if d else "–"  # noqa: E731
            lines.append(f"| {q} | {c.get('steps', h.get('steps', '–'))} | {qs(h)} | {qs(v)} | {_f(c.get('spearman'))} | "
                         f"{_f(c.get('top_overlap'))} | {_f(c.get('tail_median_rel_error'))} | {_f(c.get('p90_ratio'))} | "
                         f"{_f(c.get('p99_ratio'))} | {_f(c.get('above_exact_share'))} |")
    runs = res.get("rollouts") or []
    if runs:
        lines += ["", "## Micro cell and per-step latency (same test tasks on each backend)", "",
                  "| backend | run | success | steps | high share | ms/token | ms/step | low/high | Table 3 low/high "
                  "| W3 projected ms/token |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['backend']} | {r['run']} | {_f(100 * r['success'], '.1f')}% ({r['episodes']}) | "
                         f"{_f(r['steps_mean'], '.1f')} | {_f(100 * r['high_share'], '.0f')}% | "
                         f"{_f(r.get('ms_per_token'), '.2f')} | {_f(r.get('ms_per_step'), '.2f')} | "
                         f"{_f(r.get('low_vs_high'))} | {_f(r.get('table3_low_vs_high'))} | "
                         f"{_f(r.get('w3_projected_ms_per_token'), '.2f')} |")
        lines += ["", "ms/token: Eq. 9's per-token coefficient (elapsed batched call time / completion tokens, "
                  "dmr.latency.token_coefficient); ms/step: mean call time a step waited. The HF backend runs "
                  "quantized checkpoints dequantized (dense bf16 weights), so its low/high ratio is about 1 by "
                  "construction; vLLM's runs use its quantized kernels."]
    if res.get("throughput"):
        lines += ["", "## Rollout throughput (agent loop, 1 vs N shards)", "",
                  "| backend | shards | episodes/s | steps/s | speedup |", "|---|---|---|---|---|"]
        for b, t in res["throughput"].items():
            for n, m in t["shards"].items():
                lines.append(f"| {b} | {n} | {_f(m['episodes_per_s'])} | {_f(m['steps_per_s'], '.1f')} | "
                             f"{_f(t['speedup'][n], '.2f')}x |")
    not_done = [s for s in res.get("stages", []) if s["status"] != "ok"]
    if not_done or res.get("problems"):
        lines += ["", "## Not done", ""]
        lines += [f"- {s['name']} ({s['status']}): {_cell(s.get('error') or s.get('reason'), 500) or 'no reason recorded'}"
                  for s in not_done]
        lines += [f"- {p}" for p in res.get("problems", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("plan")
    a.add_argument("--config", type=Path, default=ROOT / "config/config.yaml")
    a.add_argument("--cell", default="household/tiny")
    a.add_argument("--dry", action="store_true")
    a.add_argument("--json", type=Path, default=None, help="also write the plan here")
    a = sub.add_parser("wheels")
    a.add_argument("--client", action="store_true", help="also the vLLM client's packages (openai)")
    a = sub.add_parser("pins")
    a.add_argument("names", nargs="*")
    a.add_argument("--overlay", action="store_true", help="the packages the device's image lacks (OVERLAY)")
    a.add_argument("--client", action="store_true", help="the vLLM client's packages (CLIENT)")
    a = sub.add_parser("probe")
    a.add_argument("--registry", default="unknown")
    a.add_argument("--source", type=Path, default=None)
    a.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("serve")
    a.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    a.add_argument("--python", required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--log-dir", type=Path, required=True)
    a.add_argument("--gpu-memory-utilization", type=float, default=0.08)
    a.add_argument("--timeout", type=float, default=300)
    a.add_argument("--extra", default="", help="more vLLM server arguments, one string (--extra=\"--enforce-eager\")")
    a = sub.add_parser("cli")
    a.add_argument("--servers", type=Path, required=True)
    a.add_argument("module", help="dmr.agent or dmr.kl")
    a.add_argument("args", nargs=argparse.REMAINDER)
    a = sub.add_parser("throughput")
    a.add_argument("--backend", default="hf")
    a.add_argument("--model", required=True)
    a.add_argument("--servers", type=Path, default=None)
    a.add_argument("--episodes", type=int, default=16)
    a.add_argument("--shards", type=int, nargs="+", default=[1, 16])
    a.add_argument("--env-kwargs", type=json.loads, default={})
    a.add_argument("--prompt", type=json.loads, default={"style": "react"})
    a.add_argument("--constrained", action="store_true")
    a.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("gather")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "plan":
        import yaml

        values = plan(yaml.safe_load(a.config.read_text()), a.cell, a.dry) | {"DRY": "1" if a.dry else "0"}
        if a.json:
            a.json.write_text(json.dumps(values | {"COEFFICIENTS": json.loads(values["COEFFICIENTS"])}, indent=1))
        print(shell_assignments(values), end="")
    elif a.cmd == "wheels":
        names = OVERLAY + (CLIENT if a.client else [])
        have = installed(names)
        missing = [n for n, v in have.items() if v is None]
        if missing:
            raise SystemExit(f"this Python lacks {missing}: run it with the project's venv")
        print("\n".join(f"{n}=={v}" for n, v in have.items()))
    elif a.cmd == "pins":
        names = a.names + (OVERLAY if a.overlay else []) + (CLIENT if a.client else [])
        if not names:
            raise SystemExit("pins: name packages, or give --overlay / --client")
        print("\n".join(pins(ROOT / "requirements.txt", names)))
    elif a.cmd == "probe":
        info = probe(a.registry, a.source)
        a.out.write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
    elif a.cmd == "serve":
        models = dict(m.split("=", 1) for m in a.model)
        a.log_dir.mkdir(parents=True, exist_ok=True)
        serve(models, a.python, a.out, a.log_dir, a.gpu_memory_utilization, shlex.split(a.extra), a.timeout)
    elif a.cmd == "cli":
        run_cli(a.servers, a.module, [x for x in a.args if x != "--"])
    elif a.cmd == "throughput":
        throughput(a.backend, a.model, a.servers, a.episodes, a.shards, a.env_kwargs, a.prompt, a.constrained, a.out)
    elif a.cmd == "gather":
        res = gather(a.work, a.out)
        print((a.out / "results.md").read_text())
        bad = [s["name"] for s in res["stages"] if s["status"] in ("failed", "timeout")]
        if bad:
            print(f"stages not ok: {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()
