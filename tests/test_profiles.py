"""The paper profile, the Slurm and local profiles, and the report: everything about running the full
reproduction at cluster scale that can be checked without GPUs (dry-runs over the full DAG, lint,
rerun scope, the HTML report), plus a real single-node Slurm run of a small part of the micro config."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config/paper.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
SLURM_PROFILE = ROOT / "workflow/profiles/slurm"


def snakemake(*args, cwd: Path, timeout=900):
    return subprocess.run([*SNAKEMAKE, "--directory", str(cwd), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def plan(cwd: Path, *args) -> list[dict]:
    """The jobs of a dry-run: rule, wildcards, outputs and resources of each."""
    r = snakemake("-n", *args, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = []
    for block in re.split(r"^(?=rule \w+:$)", r.stdout, flags=re.M)[1:]:
        job = {"rule": block.split(":", 1)[0][5:], "wildcards": {}, "output": [], "resources": {}}
        for line in block.splitlines()[1:]:
            key, _, value = line.strip().partition(": ")
            if key == "wildcards":
                job["wildcards"] = dict(kv.split("=", 1) for kv in value.split(", "))
            elif key == "output":
                job["output"] = value.split(", ")
            elif key == "resources":
                job["resources"] = dict(kv.split("=", 1) for kv in value.split(", "))
        jobs.append(job)
    return jobs


def ablation_variants(route: dict) -> int:
    """Routers an ablation trains per routed scheme: the cell's own setting reuses its router, or is
    trained once more (`base`) when the ablation's training budget differs from the cell's."""
    ab = route.get("ablation", {})
    own = route.get("router", {}).get("layers", 8)
    base = {**route.get("train", {}), **ab.get("train", {})} != route.get("train", {})
    return (len([d for d in ab.get("depths", []) if d != own]) + len([t for t in ab.get("taus", []) if t != "auto"])
            + (1 if ab.get("all_steps") else 0) + (1 if base and ab else 0))


def expected_counts(cfg: dict) -> Counter:
    """Job counts per rule of a config whose models are local paths calibrated on a local file:
    per benchmark x model the Full seeds and, when something is routed, the bf16 KL pool, the latency
    coefficients and (with GRPO) the rank table; per scheme the quantization and the Quant seeds; per
    routed scheme KL, tau, Table 4, router, the calibration run, the calibration, DMR at every budget
    and the matched baselines, every seed, and with GRPO its training, calibration run, calibration
    and evaluation at every budget; a table per cell, and the summary. (Ablations are `make ablations`.)
    A ladder scheme A+B: its router, calibration run, calibration and GRPO, DMR/GRPO (and matched
    random) at every cost budget, and each of A and B calibrated to those cost budgets and played there."""
    seeds = len(cfg["evaluate"]["seeds"])
    route = cfg.get("route", {})
    grpo = "grpo" in cfg
    per_routed = len(route.get("budgets", [])) + len(route.get("baselines", [])) * len(route.get("baseline_budgets", []))
    per_routed += len(route.get("budgets", [])) if grpo else 0
    costs = len(route.get("cost_budgets", [0.7, 0.8, 0.9]))
    n = Counter(all=1, summary=1)
    for cell in cfg["cells"]:
        quants = cell.get("quants", [])
        ladders = [q for q in cell.get("route", quants) if "+" in q]
        parts = {p for q in ladders for p in q.split("+")}
        routed = [q for q in cell.get("route", quants) if "+" not in q]
        per_ladder = 1 + grpo + costs * seeds * (1 + grpo + ("random" in route.get("baselines", [])))
        n["rollout"] += len(ladders) * per_ladder + len(parts) * costs * seeds
        n["calibrate_cost"] += len(parts)
        for rule in ("klst", "calibrate") + (("grpo", "calibrate_grpo") if grpo else ()):
            n[rule] += len(ladders)
        n["evaluate"] += 1
        n["latency"] += 1
        n["rank"] += 1 if grpo else 0
        # per routed scheme: the calibration run(s), the budgets x seeds, and the online probe run; where
        # routers decide only some step types (router_steps other than action), Forced at every seed
        forced = cfg["benchmarks"][cell["benchmark"]].get("router_steps", ["action"]) != ["action"]
        n["rollout"] += (seeds + (1 if routed else 0) + len(quants) * seeds
                         + len(routed) * (1 + (1 if grpo else 0) + (per_routed + forced) * seeds + 1))
        n["quantize"] += len(quants)
        for rule in ("kl", "threshold", "klst", "calibrate", "step_types", "labels", "diagnose"):
            n[rule] += len(routed)
        for rule in ("grpo", "calibrate_grpo"):
            n[rule] += len(routed) if grpo else 0
    n["data"] += len({c["benchmark"] for c in cfg["cells"] if cfg["benchmarks"][c["benchmark"]]["env"] == "alfworld"})
    return +n


def paper_config() -> dict:
    return yaml.safe_load(PAPER.read_text())


def test_paper_config_has_the_eight_cells_of_table1():
    cfg = paper_config()
    cells = {(c["benchmark"], c["model"], q) for c in cfg["cells"] for q in c["quants"]}
    assert cells == {
        ("alfworld", "qwen3-1.7b", "awq_w4a16"), ("alfworld", "qwen3-1.7b", "gptq_w4a16"),
        ("alfworld", "qwen3-4b", "awq_w4a16"), ("alfworld", "qwen3-4b", "gptq_w3a16"),
        ("webshop", "qwen3-1.7b-webshop-gigpo", "awq_w4a16"), ("webshop", "qwen3-1.7b-webshop-gigpo", "gptq_w4a16"),
        ("webshop", "qwen3-4b-webshop-gigpo", "awq_w4a16"), ("webshop", "qwen3-4b-webshop-gigpo", "gptq_w4a16"),
    }
    assert cfg["backend"]["name"] == "vllm" and cfg["evaluate"]["seeds"] == [0, 1, 2]
    assert cfg["route"]["budgets"] == [0.2, 0.4, 0.7] and cfg["route"]["kl_tasks"] == 1000
    alf, shop = cfg["benchmarks"]["alfworld"], cfg["benchmarks"]["webshop"]
    assert (alf["tasks"]["test"], alf["env_kwargs"]["max_steps"], alf["decoding"]["max_new_tokens"],
            alf["decoding"]["temperature"]) == (134, 50, 100, 0.0)
    assert (shop["tasks"]["test"], shop["env_kwargs"]["max_steps"], shop["decoding"]["max_new_tokens"]) == (500, 30, 512)
    assert shop["decoding"]["temperature"] > 0 and shop["router_steps"] == ["click"]
    assert all(m["source"] == "path" for m in cfg["models"].values())


def test_precisions_overlay_adds_one_ladder_to_the_default(tmp_path):
    """`make precisions`: config/precisions.yaml writes the default's cells out again (a merged list is
    replaced whole), so it must equal config.yaml's but for the household cell's added ladder route;
    its plan adds the three-precision router, its cost calibration and the binary routers' cost runs."""
    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())["cells"]
    over = yaml.safe_load((ROOT / "config/precisions.yaml").read_text())["cells"]
    ladder = "gptq_w4a16+rtn_w2a16_qkvw4"
    assert over[0]["route"] == [*base[0]["route"], ladder]
    assert [{k: v for k, v in c.items() if k != "route"} for c in over] == \
        [{k: v for k, v in c.items() if k != "route"} for c in base] and over[1:] == base[1:]
    r = snakemake("-n", "-p", "--configfile", str(ROOT / "config/config.yaml"), str(ROOT / "config/precisions.yaml"),
                  cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^calibrate_cost\s+2$", r.stdout, re.M), r.stdout[-3000:]
    assert f"results/household/tiny/{ladder}/router/router.pt" in r.stdout
    for run in ("dmr-k0.8", "random-k0.8", "grpo-k0.8"):
        assert f"{ladder}/rollouts/{run}/seed0" in r.stdout, run
    assert "gptq_w4a16/rollouts/dmr-c0.8/seed0" in r.stdout and "rtn_w2a16_qkvw4/rollouts/dmr-c0.8/seed0" in r.stdout


# Configs that stand alone (their headers say so); config/agents.yaml is an overlay of config/config.yaml.
STANDALONE = ["config/paper.yaml", "config/micro.yaml", "config/alfworld.yaml", "config/alfworld-micro.yaml"]


@pytest.fixture
def poisoned(tmp_path):
    """A working directory whose config/config.yaml (the path the Snakefile reads, relative to the working
    directory) is the embedded default plus one key the schema forbids: merged into any config, it
    fails validation with an error naming that key."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text()) | {"leaked_from_config_yaml": True}
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def test_without_configfile_the_embedded_default_is_read(poisoned):
    """The control of the test below: with no --configfile the Snakefile reads config/config.yaml from the
    working directory, so the poisoned copy there is what it reads."""
    r = snakemake("-n", cwd=poisoned)
    assert r.returncode != 0 and "'leaked_from_config_yaml' was unexpected" in r.stdout + r.stderr


@pytest.mark.parametrize("config", STANDALONE)
def test_a_configfile_stands_alone(poisoned, config):
    """No key of config/config.yaml (the embedded default, tuned for a 1M-parameter CPU agent) reaches a
    config given with --configfile: the plan of the paper profile (and of the other stand-alone configs)
    succeeds beside a poisoned config/config.yaml, so every value it uses is its own or the schema's."""
    r = snakemake("-n", "-p", "--configfile", str(ROOT / config), cwd=poisoned)
    out = r.stdout + r.stderr
    assert "leaked_from_config_yaml" not in out, out[-3000:]
    assert r.returncode == 0, out[-3000:]
    assert "Shell command: python -m dmr." in out
    files = re.search(r"Config file\(s\): (.*)", out).group(1)
    assert config in files and "config/config.yaml" not in files, files


# Published dimensions of Qwen3-1.7B and Qwen3-4B (their config.json; the GiGPO WebShop checkpoints are
# fine-tunes of the same architectures): 1.72B and 4.02B parameters, embeddings tied.
QWEN3 = {"1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
         "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32)}


def test_paper_routers_are_2_to_3_percent_of_their_llm(tmp_path):
    """The paper's router has 2-3% of the routed LLM's parameters. Counted on the planned commands: the
    trained router (RouterNet of klst's --arch, without the frozen sentence encoder) against the
    Qwen3 model of its cell; latency times the same router."""
    import inspect

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dmr.router import RouterNet, param_count

    r = snakemake("-n", "-p", "--configfile", str(PAPER), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [line for line in r.stdout.splitlines() if line.startswith("Shell command: python -m dmr.")]
    arch_of = lambda c: json.loads(re.search(r"--arch '([^']+)'", c).group(1))  # noqa: E731
    klst = {re.search(r"--llm (\S+)", c).group(1): arch_of(c) for c in cmds if "python -m dmr.klst " in c}
    latency = {re.search(r"--cell (\S+)", c).group(1): arch_of(c) for c in cmds if "python -m dmr.latency " in c}
    cfg, keys = paper_config(), set(inspect.signature(RouterNet).parameters)
    assert len(klst) == 4 and len(latency) == 4
    ratios = {}
    for cell in cfg["cells"]:
        path = cfg["models"][cell["model"]]["path"]
        arch = klst[path]
        assert latency[f"{cell['benchmark']}/{cell['model']}"] == arch
        size = "4b" if "-4b" in cell["model"] else "1.7b"
        with torch.device("meta"):
            router = param_count(RouterNet(**{k: v for k, v in arch.items() if k in keys}))
            llm = param_count(Qwen3ForCausalLM(Qwen3Config(**QWEN3[size], num_key_value_heads=8, head_dim=128,
                                                            vocab_size=151936, tie_word_embeddings=True)))
        ratios[cell["model"]] = router / llm
    assert all(0.02 <= x <= 0.03 for x in ratios.values()), ratios


def test_paper_ablations_are_their_own_target(tmp_path):
    cfg = paper_config()
    # A three-precision scheme has no ablations of its own (its low precisions' routers have them).
    routed = sum(len([q for q in c.get("route", c["quants"]) if "+" not in q]) for c in cfg["cells"])
    counts = Counter(j["rule"] for j in plan(tmp_path, "ablations", "--configfile", str(PAPER)))
    assert counts["klst_variant"] == routed * ablation_variants(cfg["route"]) == 64
    assert counts["ablation"] == routed
    # Online (route.ablation.online defaults): each variant router calibrated once, and played at every
    # budget and evaluation seed after its calibration run; the cell's own router plays its DMR runs.
    per_router = 1 + len(cfg["route"]["budgets"]) * len(cfg["evaluate"]["seeds"])
    assert counts["calibrate_variant"] == counts["klst_variant"]
    assert counts["rollout_variant"] == counts["klst_variant"] * per_router == 640


def test_paper_dry_run_plans_the_full_dag(tmp_path):
    """8 cells x 3 seeds x 3 budgets, without the checkpoints, the data or WebShop being present."""
    cfg = paper_config()
    for m in cfg["models"].values():
        assert not (tmp_path / m["path"]).exists()
    jobs = plan(tmp_path, "--configfile", str(PAPER))
    counts = Counter(j["rule"] for j in jobs)
    assert counts == expected_counts(cfg)
    # The three-precision cell (alfworld/qwen3-4b: bf16, AWQ-W4, GPTQ-W3): its router, calibration and GRPO,
    # 1 + 1 calibration runs + 3 cost budgets x 3 seeds x (DMR, GRPO), and AWQ-W4 and GPTQ-W3 each at the
    # same cost budgets (2 x 9 runs, 2 calibrations).
    assert counts == {"rollout": 208 + 38 + 12, "quantize": 8, "kl": 8, "threshold": 8, "klst": 9, "calibrate": 9, "labels": 8,
                      "data": 1, "step_types": 8, "diagnose": 8, "grpo": 9, "calibrate_grpo": 9, "calibrate_cost": 2,
                      "latency": 4, "rank": 4, "evaluate": 4, "summary": 1, "all": 1}
    # Rollouts: 4 x (3 Full + the KL pool) + 8 x (3 Quant + 2 calibration runs + 3 K x 3 seeds x (DMR, GRPO)
    # + the online probe run), and the 4 WebShop schemes' Forced runs (searches at bf16, clicks low) x 3 seeds.
    runs = Counter((j["wildcards"]["policy"], j["wildcards"]["run"]) for j in jobs if j["rule"] == "rollout")
    assert runs[("full", "train")] == 4 and runs[("dmr-t0.5", "calib")] == 9
    for s in range(3):
        assert runs[("full", f"seed{s}")] == 4 and runs[("quant", f"seed{s}")] == 8 and runs[("forced", f"seed{s}")] == 4
        # the binary cells' budgets, then the three-precision cell's cost budgets (0.7 is both)
        for k, n in (("0.2", 8), ("0.4", 8), ("0.7", 9), ("0.8", 1), ("0.9", 1)):
            assert runs[(f"dmr-k{k}", f"seed{s}")] == n
        for k in ("0.7", "0.8", "0.9"):
            assert runs[(f"dmr-c{k}", f"seed{s}")] == 2
    three = [j for j in jobs if j["wildcards"].get("quant") == "awq_w4a16+gptq_w3a16"]
    assert {(j["wildcards"]["benchmark"], j["wildcards"]["model"]) for j in three} == {("alfworld", "qwen3-4b")}
    w3 = [j for j in jobs if j["wildcards"].get("quant") == "gptq_w3a16"]
    assert {j["wildcards"]["model"] for j in w3} == {"qwen3-4b"} and {j["wildcards"]["benchmark"] for j in w3} == {"alfworld"}
    # The GPU goes to the jobs that run the LLMs; the router and the tables run on CPUs.
    for j in jobs:
        if j["rule"] == "all":
            continue
        assert j["resources"]["gpu"] == ("1" if j["rule"] in ("rollout", "kl", "quantize", "grpo") else "0"), j
        assert int(j["resources"]["mem_mb"]) > 0 and int(j["resources"]["runtime"]) > 0
        assert int(j["resources"]["cpus_per_task"]) >= 1


def test_embedded_default_asks_for_no_gpu(tmp_path):
    jobs = plan(tmp_path, "--configfile", str(ROOT / "config/config.yaml"))
    assert {j["rule"] for j in jobs} >= {"quantize", "rollout", "kl", "klst"}
    assert {j["resources"].get("gpu") for j in jobs if j["rule"] != "all"} == {"0"}
    klst = next(j for j in jobs if j["rule"] == "klst")
    assert klst["resources"]["cpus_per_task"] == "1"   # the config's threads: one core per job


def test_resources_name_existing_rules(tmp_path):
    cfg = paper_config()
    cfg["resources"]["rolout"] = {"gpu": 1}
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = snakemake("-n", "--configfile", str(path), cwd=tmp_path)
    assert r.returncode != 0 and "['rolout'] are not rules of this workflow" in r.stdout + r.stderr


def test_real_run_stops_before_any_job_when_a_checkpoint_is_missing(tmp_path):
    r = snakemake("--configfile", str(PAPER), "--cores", "1", cwd=tmp_path)
    assert r.returncode != 0
    assert "missing local files named in the config" in r.stdout + r.stderr
    assert "models.qwen3-1.7b.path = 'checkpoints/Qwen3-1.7B'" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_slurm_profile_dry_run(tmp_path):
    """The paper DAG through the Slurm executor: every job carries the partition, account and its resources."""
    jobs = plan(tmp_path, "--configfile", str(PAPER), "--workflow-profile", str(SLURM_PROFILE))
    assert Counter(j["rule"] for j in jobs) == expected_counts(paper_config())
    for j in jobs:
        if j["rule"] == "all":
            continue
        res = j["resources"]
        assert res["slurm_partition"] == "YOUR_PARTITION" and res["slurm_account"] == "YOUR_ACCOUNT", j
        assert {"gpu", "mem_mb", "runtime", "cpus_per_task"} <= set(res)
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"


@pytest.mark.parametrize("config", ["config/config.yaml", "config/paper.yaml"])
def test_lint_is_clean(config):
    r = subprocess.run([*SNAKEMAKE, "--lint", "--configfile", str(ROOT / config)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr


def tiny_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def paper_tree(tmp_path_factory):
    """A finished-looking results tree of the paper config: every output of the plan exists, with
    mtimes in DAG order (`--touch`); figures are real PNGs and tables real HTML for the report."""
    d = tmp_path_factory.mktemp("paper")
    png = tiny_png()
    for job in plan(d, "--configfile", str(PAPER)):
        for out in job["output"]:
            p = d / out
            if job["rule"] == "quantize":
                p.mkdir(parents=True, exist_ok=True)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(png if out.endswith(".png") else b"<table><tr><td>Full</td></tr></table>\n"
                          if out.endswith(".html") else b"")
    r = snakemake("--touch", "--configfile", str(PAPER), "--cores", "1", cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Nothing to be done" in (again := snakemake("-n", "--configfile", str(PAPER), cwd=d)).stdout + again.stderr
    return d


def test_touching_one_router_reruns_only_that_cells_downstream(paper_tree):
    router = paper_tree / "results/alfworld/qwen3-4b/gptq_w3a16/router/router.json"
    time.sleep(0.01)
    router.touch()
    try:
        jobs = plan(paper_tree, "--configfile", str(PAPER))
    finally:
        os.utime(router, (0, 0))  # older than everything downstream again, for the other tests
    cell = {"benchmark": "alfworld", "model": "qwen3-4b"}
    rollouts = [j for j in jobs if j["rule"] == "rollout"]
    assert all({k: j["wildcards"][k] for k in ("benchmark", "model", "quant")} == {**cell, "quant": "gptq_w3a16"}
               for j in rollouts)
    # The calibration run, then the 3 budgets x 3 seeds of DMR; GRPO, which starts from that router, with
    # its calibration run and evaluations; the same router at the three-precision cell's cost budgets
    # (calibrate_cost, dmr-cK); the table and rank table of that benchmark/model; nothing else.
    assert sorted((j["wildcards"]["policy"], j["wildcards"]["run"]) for j in rollouts) == sorted(
        [(f"{r}-t0.5", "calib") for r in ("dmr", "grpo")] + [("dmr-k0.4", "probe")]
        + [(f"{r}-k{k}", f"seed{s}") for r in ("dmr", "grpo") for k in ("0.2", "0.4", "0.7") for s in range(3)]
        + [(f"dmr-c{k}", f"seed{s}") for k in ("0.7", "0.8", "0.9") for s in range(3)])
    assert Counter(j["rule"] for j in jobs) == {"rollout": 30, "calibrate": 1, "grpo": 1, "calibrate_grpo": 1,
                                                "calibrate_cost": 1, "evaluate": 1, "rank": 1, "diagnose": 1,
                                                "summary": 1, "all": 1}
    assert [j["wildcards"] for j in jobs if j["rule"] == "evaluate"] == [cell]
    assert [j["wildcards"] for j in jobs if j["rule"] == "calibrate"] == [{**cell, "quant": "gptq_w3a16", "stage": "router"}]


def test_report_has_tables_figures_and_captions(paper_tree):
    out = paper_tree / "report.html"
    r = snakemake("--report", str(out), "--configfile", str(PAPER), cwd=paper_tree)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    page = out.read_text()
    for text in ("Table 1", "KL-ST", "alfworld/qwen3-4b", "webshop/qwen3-1.7b-webshop-gigpo",
                 "main.html", "pareto.png", "kl_hist_gptq_w3a16.png", "router_scores_awq_w4a16.png",
                 "Success rate against the modelled time",      # caption of the Pareto figure
                 "Step KL(bf16",                                 # caption of the KL histogram
                 "reproduces"):                                  # the workflow description
        assert text in page, text


# --- a real single-node Slurm ------------------------------------------------------------------------

def slurm_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run slurmctld/slurmd"
    if Path("/etc/slurm/slurm.conf").exists() and not Path("/etc/slurm/slurm.conf").is_symlink():
        return "a Slurm is configured on this machine; not replacing it"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "no Slurm and no apt-get to install Debian's"
    return None


@pytest.fixture
def slurm(tmp_path):
    if reason := slurm_unavailable():
        pytest.skip(reason)
    # One Slurm at a time on this machine (/etc/slurm/slurm.conf and the daemons' ports are
    # machine-wide): the real-Slurm tests of two pytest-xdist workers take turns.
    with open(Path(tempfile.gettempdir()) / "dmr-test-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = tmp_path / "slurm"
        up = subprocess.run([str(ROOT / ".ci/slurm.sh"), "up", str(state)], capture_output=True, text=True, timeout=600)
        try:
            assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
            yield state
        finally:
            subprocess.run([str(ROOT / ".ci/slurm.sh"), "down", str(state)], capture_output=True, timeout=120)


def slurm_snakemake(work: Path, configfile: Path, *targets: str) -> list[str]:
    """A Snakemake command line that submits to the test Slurm through the Slurm profile."""
    return ["timeout", "-k", "30", "900", *SNAKEMAKE, "--directory", str(work),
            "--configfile", str(configfile), "--workflow-profile", str(SLURM_PROFILE),
            "--jobs", "2", "--default-resources", "slurm_account=none", "slurm_partition=debug",
            # accounting is off on the test Slurm: squeue instead of sacct for job status
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", *targets]


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_micro_through_real_slurm(slurm, tmp_path):
    """The micro config's chain expert data -> tokenizer -> agent training, each job submitted by
    snakemake-executor-plugin-slurm with the Slurm profile to a real slurmctld (about 14 s per job; the
    test below runs a rollout through it). Three jobs keep CI's time: each one mostly waits on Slurm."""
    work = tmp_path / "work"
    work.mkdir()
    target = "results/household/tiny/train"
    r = subprocess.run(slurm_snakemake(work, ROOT / "config/micro.yaml", target), capture_output=True, text=True,
                       cwd=ROOT, timeout=1000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (work / target / "p1.00/model.safetensors").exists() and (work / target / "p0.50").is_dir()
    # The plugin deletes the Slurm logs of successful jobs; its submission messages remain.
    submitted = re.findall(r"submitted with SLURM jobid \d+ \(log: \S*/rule_(\w+)/", r.stdout + r.stderr)
    assert sorted(submitted) == ["expert_data", "tokenizer", "train_agent"]


def episodes_and_actions(run: Path) -> dict[str, tuple]:
    """Per finished episode of a run directory: (won, steps, the actions in order)."""
    eps = pl.read_parquet(run / "episodes.parquet")
    steps = pl.read_parquet(run / "steps.parquet").sort("task", "step")
    actions = {t: tuple(zip(g["output"], g["action"])) for (t,), g in steps.group_by("task")}
    return {e["task"]: (e["won"], e["steps"], actions[e["task"]]) for e in eps.iter_rows(named=True)}


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_cancelled_rollout_resumes_through_real_slurm(slurm, tmp_path):
    """A rollout cancelled mid-run on Slurm (scancel, as preemption or a node failure ends a job) is
    resubmitted by the profile's `retries: 1` and resumes from its run directory's JSONL: every episode
    once, and the same episodes as an uninterrupted run. The shipped agent (agents/tiny) makes the
    rollout the only job, and 240 episodes (~15 s) give the cancel time to land mid-run."""
    n = 240
    cfg = yaml.safe_load((ROOT / "config/micro.yaml").read_text())
    cfg["models"]["tiny"] = {"source": "path", "path": str(ROOT / "agents/tiny")}
    cfg["benchmarks"]["household"]["tasks"]["test"] = n
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    target = "results/household/tiny/bf16/rollouts/full/seed0/episodes.parquet"
    work, ref = tmp_path / "work", tmp_path / "ref"
    work.mkdir()
    ref.mkdir()
    log, local_log = tmp_path / "snakemake.log", tmp_path / "local.log"
    with log.open("w") as f, local_log.open("w") as lf:
        # Sessions of their own, to end them whole should the test fail midway.
        proc = subprocess.Popen(slurm_snakemake(work, configfile, target), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        # The uninterrupted run of the same job, locally, while Slurm starts the other one.
        local = subprocess.Popen([*SNAKEMAKE, "--directory", str(ref), "--configfile", str(configfile), "--cores", "1",
                                  target], stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    run = work / Path(target).parent
    try:
        deadline, done = time.time() + 300, 0
        while time.time() < deadline and proc.poll() is None:
            done = (run / "episodes.jsonl").read_text().count("\n") if (run / "episodes.jsonl").exists() else 0
            if done >= 10:
                break
            time.sleep(0.2)
        jobs = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert done >= 10 and len(jobs) == 1, (done, jobs, log.read_text()[-3000:])
        subprocess.run(["scancel", jobs[0]], check=True)
        # What the cancelled job left: read once Slurm has ended it, before the retry can start.
        while subprocess.run(["squeue", "-h", "-j", jobs[0], "-o", "%T"], capture_output=True,
                             text=True).stdout.strip() in ("RUNNING", "COMPLETING"):
            time.sleep(0.2)
        first = [json.loads(x) for x in (run / "episodes.jsonl").read_text().splitlines() if x.endswith("}")]
        assert 10 <= len(first) < n, f"the cancel should land mid-run, {len(first)}/{n} episodes were done"
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        assert local.wait(timeout=600) == 0, local_log.read_text()[-3000:]
    finally:
        for p in (proc, local):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = log.read_text()
    assert len(re.findall(r"submitted with SLURM jobid \d+ \(log: \S*/rule_rollout/", out)) == 2, out[-3000:]
    assert f"SLURM-job '{jobs[0]}' failed" in out
    # Each episode once in the resumed JSONL, and once per step in the steps. The episodes done before
    # the cancel were kept as they were, measured times included: resumed, not replayed.
    rows = [json.loads(x) for x in (run / "episodes.jsonl").read_text().splitlines()]
    assert len({r["task"] for r in rows}) == len(rows) == n and rows[:len(first)] == first
    steps = pl.read_parquet(run / "steps.parquet")
    assert steps.select("task", "step").is_unique().all()
    resumed, uninterrupted = episodes_and_actions(run), episodes_and_actions(ref / Path(target).parent)
    assert len(resumed) == n and resumed == uninterrupted


def test_paper_grpo_routes_webshop_search_steps_and_klst_does_not(tmp_path):
    """App. C.1 in the planned commands: on WebShop the KL-ST router and its baselines decide click
    steps, the GRPO training and the GRPO router's evaluations search and click steps; ALFWorld's
    commands carry no step types (every action step is routed)."""
    r = snakemake("-n", "-p", "--configfile", str(PAPER), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [line for line in r.stdout.splitlines() if line.startswith("Shell command: python -m dmr.")]
    grpo_train = [c for c in cmds if "python -m dmr.grpo " in c]
    routed = [c for c in cmds if "python -m dmr.agent " in c and "--policy " in c
              and not re.search(r"--policy (full|quant)\b", c)]
    assert len(grpo_train) == 9 and routed  # 8 binary cells and the three-precision one
    for c in grpo_train + routed:
        steps = re.search(r"--router-steps ((?:\w+ ?)+?)(?= --|$)", c)
        if "--env alfworld" in c:
            assert steps is None, c
        elif "python -m dmr.grpo " in c or "/grpo/lam" in c:
            assert steps.group(1).split() == ["search", "click"], c
        else:
            assert steps.group(1).split() == ["click"], c


def test_regime_sweep_overlay_plans_the_recipe_agent_and_seed_zero(tmp_path):
    """`make regime` with config/agents.yaml and config/regime-sweep.yaml: the household agent is
    trained from its recipe (12000 steps, its injected noise unlearned), and the twelve schemes get a
    KL pool and a seed-0 Quant run each, with no router."""
    r = snakemake("-n", "-p", "regime", "--configfile", *(str(ROOT / f"config/{c}.yaml") for c in
                  ("config", "agents", "regime-sweep")), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--steps 12000" in r.stdout and "--noise-weight 0.0" in r.stdout, r.stdout[-3000:]
    assert re.search(r"^kl\s+12$", r.stdout, re.M), r.stdout[-3000:]
    assert re.search(r"^train_agent\s+1$", r.stdout, re.M) and not re.search(r"^klst\s", r.stdout, re.M)
    assert "rollouts/quant/seed0" in r.stdout and "rollouts/quant/seed1" not in r.stdout
