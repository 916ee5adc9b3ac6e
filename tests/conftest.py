"""Shared fixtures: a real (tiny, briefly trained) agent built once per session from the real
household environment, tokenizer trainer and Qwen3 trainer. Nothing here is mocked."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYTHONPATH", str(ROOT))
# One BLAS/OpenMP thread per test process (Snakemake sets the same for each job from its `threads`):
# `make test` runs more processes than cores, and idle OpenMP threads spin on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# ALFWorld's fast-downward translations (dmr.envs.alfworld.sas_cache_dir) go to a folder of this test
# session, shared by its workers' subprocesses, not to the user's cache.
if "DMR_SAS_CACHE" not in os.environ:
    os.environ["DMR_SAS_CACHE"] = _SAS_TMP = tempfile.mkdtemp(prefix="dmr-sas-")
else:
    _SAS_TMP = None


def pytest_unconfigure(config):
    """The session's translation folder goes with the process that made it (xdist's controller)."""
    import shutil

    if _SAS_TMP and not hasattr(config, "workerinput"):
        shutil.rmtree(_SAS_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(episodes.jsonl, tokenizer dir, model dir) of a 1-layer agent trained for a few steps."""
    from dmr import expert, tiny_agent, tokenizer

    d = tmp_path_factory.mktemp("tiny_world")
    eps = d / "episodes.jsonl"
    expert.main(["--env", "household", "--episodes", "60", "--noise", "0.2", "--out", str(eps)])
    tok_dir = d / "tokenizer"
    tokenizer.main(["--episodes", str(eps), "--vocab-size", "512", "--out", str(tok_dir)])
    model_dir = d / "model"
    tiny_agent.main(["--episodes", str(eps), "--tokenizer", str(tok_dir), "--steps", "3",
                     "--arch", '{"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1, '
                     '"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}',
                     "--batch-tokens", "2048", "--threads", "1", "--out", str(model_dir)])
    return eps, tok_dir, model_dir


@pytest.fixture(scope="session")
def python():
    return sys.executable


@pytest.fixture(scope="session")
def noisy_model(tiny_world, tmp_path_factory):
    """The tiny agent with perturbed weights: a second, genuinely different precision of it."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    _, _, model_dir = tiny_world
    d = tmp_path_factory.mktemp("noisy") / "model"
    shutil.copytree(model_dir, d)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    m.to(torch.bfloat16).save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def rollout_pool():
    """pool(model, out, n, max_steps): a bf16 household rollout of n training tasks (dmr.agent), the
    KL pool that dmr.kl replays."""
    import json

    from dmr import agent

    def _pool(model, out, n=4, max_steps=6):
        agent.main(["--env", "household", "--env-kwargs", json.dumps({"max_steps": max_steps}), "--split", "train",
                    "--n", str(n), "--model", f"bf16={model}", "--max-new-tokens", "12", "--shards", "3",
                    "--out", str(out), "--quiet"])
        return out
    return _pool


@pytest.fixture
def windowed_pool():
    """Synthetic KL-ST examples: episodes of L steps with random D-dim step embeddings, every step's
    window its episode so far. `label(e, t)` gives a step's class and the embedding feature that
    marks it (+4), or None for an unmarked step."""
    import torch

    def make(n_eps, L, D, label):
        emb = torch.randn(n_eps * L, D, generator=torch.Generator().manual_seed(0))
        wins, y = [], []
        for e in range(n_eps):
            for t in range(L):
                r = e * L + t
                wins.append(list(range(e * L, r + 1)))
                c, feature = label(e, t)
                if feature is not None:
                    emb[r, feature] += 4.0
                y.append(c)
        return emb, wins, y

    return make


@pytest.fixture
def household_run(tiny_world, noisy_model):
    """Both precisions of a routed household run on three short test tasks: (backends, style, play)
    where play(router, out) runs the agent loop and returns its step rows."""
    import json

    from dmr import envs, prompts
    from dmr.agent import AgentConfig, run
    from dmr.llm import load

    _, _, model = tiny_world
    backends = {"bf16": load("hf", str(model)), "low": load("hf", str(noisy_model))}
    style = prompts.get("react")
    cfg = AgentConfig(max_new_tokens=12, shards=3)
    tasks = envs.make("household", max_steps=5).tasks("test", 3)

    def play(router, out):
        run(lambda: envs.make("household", max_steps=5), tasks, backends, router, cfg, out, progress=False)
        return [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    return backends, style, play


def pytest_addoption(parser):
    parser.addoption("--alfworld-splits", default="valid_seen,valid_train",
                     help="comma-separated ALFWorld splits the expert sweeps (-m sweep) play every game of; any "
                          "split the data has, e.g. valid_unseen or train (unpacked from the shared archive)")


def pytest_collection_modifyitems(config, items):
    """The end-to-end DAGs first: under `-n 2` (the Makefile's test command) they then overlap the
    many short tests instead of running alone at the end. The real-Slurm runs lead: they mostly wait
    on Slurm, so the DAG beside them has the CPU to itself meanwhile. The two real-Slurm tests share
    an xdist group, so they run one after the other on one worker: their fixture's lock (one Slurm per
    machine) would otherwise hold a second worker idle while the first one's test runs."""
    items.sort(key=lambda item: 0 if "slurm" in getattr(item, "fixturenames", ())
               else 1 if item.get_closest_marker("slow") else 2)

