"""The agent loop with the real HF backend on a tiny real agent: invalid steps, batching, the
routing hook, resume after a killed run and reruns with another spec."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from dmr import envs
from dmr.agent import AgentConfig, run
from dmr.agent import main as agent_main
from dmr.llm import load
from dmr.policies import make_router
from dmr.rundir import finalize

ROOT = Path(__file__).resolve().parents[1]


def _episode_checks(out, tasks):
    eps = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert sorted(e["task"] for e in eps) == sorted(t.key for t in tasks)  # each exactly once
    per = Counter(s["task"] for s in steps)
    for e in eps:
        idx = sorted(s["step"] for s in steps if s["task"] == e["task"])
        assert idx == list(range(e["steps"])), e["task"]  # no lost or repeated step
        assert per[e["task"]] == e["steps"]
    return eps, steps


def test_run_batched_records_and_invalid_steps(tiny_world, tmp_path):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=1)
    env_kwargs = {"max_steps": 6}
    tasks = envs.make("household", **env_kwargs).tasks("test", 5)
    # Unconstrained decoding from a barely trained model: mostly malformed or inadmissible outputs,
    # which must become invalid steps, never a crash.
    cfg = AgentConfig(prompt={"style": "instruct", "window": 2}, max_new_tokens=8, shards=3, constrained=False)
    run(lambda: envs.make("household", **env_kwargs), tasks, {"bf16": b}, make_router("full", ["bf16"]),
        cfg, tmp_path, progress=False)
    eps, steps = _episode_checks(tmp_path, tasks)
    assert all(s["precision"] == "bf16" for s in steps)
    bad = [s for s in steps if not s["valid"]]
    assert bad, "a barely trained model should produce some invalid steps"
    for s in steps:
        if s["malformed"]:
            assert not s["valid"] and s["action"] is None
        if s["valid"]:
            assert s["action"] is not None
        assert s["completion_tokens"] >= 1 and s["prompt_tokens"] > 0 and s["step_time"] > 0
    finalize(tmp_path, {"test": True})
    assert pl.read_parquet(tmp_path / "episodes.parquet").height == 5


def test_random_router_mixes_backends(tiny_world, tmp_path):
    _, _, model = tiny_world
    b = load("hf", str(model), threads=1)
    tasks = envs.make("household", max_steps=5).tasks("test", 4)
    cfg = AgentConfig(max_new_tokens=40, shards=4, constrained=True)
    # Two "precisions" backed by one model: the loop must route each step to its backend.
    run(lambda: envs.make("household", max_steps=5), tasks, {"bf16": b, "low": b},
        make_router("random:0.5", ["bf16", "low"], seed=3), cfg, tmp_path, progress=False)
    eps, steps = _episode_checks(tmp_path, tasks)
    assert {s["precision"] for s in steps} == {"bf16", "low"}
    assert all(s["valid"] for s in steps), "constrained decoding only emits admissible actions"
    assert sum(e["high_calls"] for e in eps) == sum(s["precision"] == "bf16" for s in steps)


def test_resume_after_kill_loses_and_repeats_nothing(tiny_world, tmp_path, python):
    _, _, model = tiny_world
    out = tmp_path / "run"
    cmd = [python, "-m", "dmr.agent", "--env", "household", "--env-kwargs", '{"max_steps": 8}', "--n", "10",
           "--model", f"bf16={model}", "--max-new-tokens", "40", "--constrained",
           "--shards", "2", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = (out / "episodes.jsonl").read_text().count("\n") if (out / "episodes.jsonl").exists() else 0
        if done >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [json.loads(x)["task"] for x in (out / "episodes.jsonl").read_text().splitlines() if x.strip()]
    assert 3 <= len(first) < 10, "the kill should land mid-run"
    # a torn line, as a kill in the middle of a write leaves
    with (out / "steps.jsonl").open("a") as f:
        f.write('{"task": "household/test/9", "st')
    agent_main(cmd[3:])  # the resume, in process: only the killed run needs a process of its own
    tasks = envs.make("household").tasks("test", 10)
    eps, _ = _episode_checks(out, tasks)
    kept = [e["task"] for e in eps][:len(first)]
    assert kept == first, "finished episodes survive the resume untouched"
    assert (out / "episodes.parquet").exists()


def test_rerun_with_another_spec_never_resumes_stale_episodes(tiny_world, tmp_path):
    """A run directory left by another model or decoding setup is moved aside, not resumed."""
    _, _, model = tiny_world
    out = tmp_path / "run"
    base = ["--env", "household", "--env-kwargs", '{"max_steps": 3}', "--n", "2",
            "--model", f"bf16={model}", "--constrained", "--shards", "2", "--out", str(out), "--quiet"]
    agent_main(base + ["--max-new-tokens", "40"])
    first = (out / "episodes.jsonl").read_text()
    agent_main(base + ["--max-new-tokens", "40"])  # same spec: nothing reruns
    assert (out / "episodes.jsonl").read_text() == first
    agent_main(base + ["--max-new-tokens", "39"])  # another spec: a fresh run
    (stale,) = out.glob("stale-*")
    assert (stale / "episodes.jsonl").read_text() == first
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "spec.json").read_text())["agent"]["max_new_tokens"] == 39


def test_three_precision_router_records_its_distribution(tiny_world, tmp_path):
    """A router over (bf16, w4, w3): each decided step records its distribution (`route_probs`),
    its precision is the ladder's at the threshold, and dmr.calibrate derives cost-budget
    thresholds from the run."""
    import torch

    from dmr import calibrate
    from dmr.router import RouterNet, save_router
    from dmr.routing import ladder

    _, _, model = tiny_world
    b = load("hf", str(model), threads=1)
    torch.manual_seed(0)
    router_dir = tmp_path / "router"
    save_router(RouterNet(n_classes=3, d_model=32, layers=1, heads=2, ff=32, window=4), router_dir,
                ["bf16", "w4", "w3"])
    tasks = envs.make("household", max_steps=4).tasks("test", 3)
    out = tmp_path / "run"
    # One model behind all three names: the loop must still send each step to its precision's backend.
    router = make_router("dmr", ["bf16", "w4", "w3"], router=str(router_dir), threshold=0.5, router_steps=["action"])
    run(lambda: envs.make("household", max_steps=4), tasks, {"bf16": b, "w4": b, "w3": b}, router,
        AgentConfig(max_new_tokens=40, shards=3, constrained=True), out, progress=False)
    _, steps = _episode_checks(out, tasks)
    for s in steps:
        assert len(s["route_probs"]) == 3 and abs(sum(s["route_probs"]) - 1) < 1e-5
        assert s["route_score"] == s["route_probs"][0]
        assert s["precision"] == ["bf16", "w4", "w3"][ladder(s["route_probs"], 0.5)]
    finalize(out, {"test": True})
    pl.DataFrame({"score": [0.5]}).write_parquet(router_dir / "train_scores.parquet")
    cal_path = tmp_path / "calibration.json"
    calibrate.main(["--run", str(out), "--train-scores", str(router_dir / "train_scores.parquet"), "--budgets", "0.5",
                    "0.8", "--coefficients", '{"bf16": 2.0, "w4": 1.0, "w3": 0.5}', "--out", str(cal_path),
                    "--figure", str(tmp_path / "fig.png")])
    cal = json.loads(cal_path.read_text())
    assert cal["steps"] == len(steps) and sorted(cal["probs"]) == sorted(s["route_probs"] for s in steps)
    assert cal["weights"] == [s["completion_tokens"] for s in steps]
    for k, share in cal["realised_cost_share"].items():
        assert share <= float(k) + 1e-9
        assert sum(cal["realised_precision_share"][k].values()) == pytest.approx(1.0)
