"""benchmarks/gpu_check.{sh,py}: the GPU check's plan, gathering and report on known inputs.

The check itself needs a GPU (and vLLM); `bash benchmarks/gpu_check.sh --cpu-smoke` runs its stages
at tiny sizes on a CPU (minutes, so not here). These tests cover what turns the stages' files into
results.json and results.md, the plan read from the config, and that the script parses.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------ plan

def test_plan_reads_the_cell_from_the_config():
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    p = gc.plan(cfg, "household/tiny", dry=False)
    assert p["ENV"] == "household" and json.loads(p["ENV_KWARGS"]) == cfg["benchmarks"]["household"]["env_kwargs"]
    assert Path(p["BF16"]) == (ROOT / "agents/tiny").resolve() and (Path(p["BF16"]) / "config.json").exists()
    assert p["DECODING"] == "--max-new-tokens 24 --temperature 0.0"
    assert p["CAL_SAMPLES"] == "128" and p["CAL_LEN"] == "512" and p["SHARDS"] == "16"
    assert json.loads(p["COEFFICIENTS"])["bf16"] == 25.02
    assert "--repeat 0.3" in p["EXPERT_FLAGS"] and "--clean-fraction 0.4" in p["EXPERT_FLAGS"]
    dry = gc.plan(cfg, "household/tiny", dry=True)
    assert json.loads(dry["ENV_KWARGS"])["max_steps"] == 6 and int(dry["POOL_N"]) < int(p["POOL_N"])
    shop = gc.plan(cfg, "shop/tiny_shop", dry=False)
    assert "--constrained" in shop["DECODING"] and json.loads(shop["PROMPT"])["style"] == "instruct"
    with pytest.raises(SystemExit, match="no benchmark 'nowhere'"):
        gc.plan(cfg, "nowhere/tiny", dry=False)


def test_shell_assignments_survive_quotes_and_spaces():
    values = {"A": '{"style": "react", "q": "it\'s"}', "B": "--x 1 --y 2", "C": ""}
    for line in gc.shell_assignments(values).splitlines():
        (token,) = shlex.split(line)
        key, _, value = token.partition("=")
        assert values[key] == value
    out = subprocess.run(["bash", "-c", gc.shell_assignments(values) + 'printf "%s|%s" "$A" "$B"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == f"{values['A']}|{values['B']}"


def test_pins_come_from_requirements(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ntorch==2.13.0\nfoo_bar == 1.0 ; python_version > '3'\nloose>=2\n")
    assert gc.pins(req, ["torch", "foo-bar", "loose", "other"]) == ["torch==2.13.0", "foo_bar==1.0", "loose", "other"]
    real = gc.pins(ROOT / "requirements.txt", ["llmcompressor", "polars", "compressed-tensors"])
    assert all("==" in r for r in real)


# ---------------------------------------------------------------------------------------- stages

def test_read_stages_and_the_error_of_a_failed_one(tmp_path):
    (tmp_path / "stages.tsv").write_text("probe\tok\t0\t1.5\t60\t\n"
                                         "quantize_gptq_w3a16\tfailed\t1\t12.0\t150\t\n"
                                         "env_vllm\tskipped\t\t\t\tno vLLM here\n"
                                         "kl_hf\ttimeout\t124\t120.0\t120\t\n")
    stages = gc.read_stages(tmp_path / "stages.tsv")
    assert [s["status"] for s in stages] == ["ok", "failed", "skipped", "timeout"]
    assert stages[0]["seconds"] == 1.5 and stages[2]["rc"] is None and stages[2]["reason"] == "no vLLM here"
    log = tmp_path / "q.log"
    log.write_text("loading\nTraceback (most recent call last):\n  File x\nValueError: group size 128 does not divide 96\n"
                   "RuntimeError: see root cause above\n")
    assert gc.log_error(log) == "ValueError: group size 128 does not divide 96"
    log.write_text("one\n\ntwo\nthree\n")
    assert gc.log_error(log) == "one / two / three"
    assert gc.log_error(tmp_path / "missing.log") == ""
    (tmp_path / "bad.tsv").write_text("x\tmaybe\t0\t1\t1\t\n")
    with pytest.raises(ValueError, match="unknown status 'maybe'"):
        gc.read_stages(tmp_path / "bad.tsv")


# -------------------------------------------------------------------------------------------- KL

def _kl(values, missing=0):
    import polars as pl

    return pl.DataFrame({"task": [f"t{i // 5}" for i in range(len(values))], "step": [i % 5 for i in range(len(values))],
                         "kl": [float(v) for v in values], "kl_topk_missing": [missing] * len(values)})


def test_kl_compare_on_known_pairs():
    hf = _kl(range(1, 21))
    same = gc.kl_compare(hf, _kl(range(1, 21)))
    assert same["steps"] == 20 and same["spearman"] == pytest.approx(1.0) and same["top_overlap"] == 1.0
    assert same["tail_median_rel_error"] == 0.0 and same["p99_ratio"] == pytest.approx(1.0)
    assert same["above_exact_share"] == 0.0
    half = gc.kl_compare(hf, _kl([v / 2 for v in range(1, 21)]))
    assert half["spearman"] == pytest.approx(1.0) and half["top_overlap"] == 1.0
    assert half["tail_median_rel_error"] == pytest.approx(0.5) and half["p90_ratio"] == pytest.approx(0.5)
    assert half["above_exact_share"] == 0.0
    rev = gc.kl_compare(hf, _kl(range(20, 0, -1)))
    assert rev["spearman"] == pytest.approx(-1.0) and rev["top_overlap"] == 0.0
    double = gc.kl_compare(hf, _kl([2 * v for v in range(1, 21)]))
    assert double["above_exact_share"] == 1.0
    # The top 20% of 20 steps are 4; vLLM's top 4 shares 2 of them.
    mixed = list(range(1, 21))
    mixed[19], mixed[18], mixed[0], mixed[1] = 0.5, 0.6, 100.0, 90.0
    assert gc.kl_compare(hf, _kl(mixed))["top_overlap"] == 0.5
    part = gc.kl_compare(hf, _kl(range(1, 11)))
    assert part["steps"] == 10 and part["hf_only"] == 10
    with pytest.raises(ValueError, match="share no"):
        gc.kl_compare(hf, _kl([1.0]).with_columns(task=__import__("polars").lit("other")))


# ------------------------------------------------------------------------------ rollouts, latency

def _run(root: Path, backend: str, name: str, policy: str, models: list[str], llm_time: float, tokens: int,
         won: list[bool], high: int = 0):
    d = root / backend / name
    d.mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps({"policy": policy, "models": {m: {"path": m} for m in models}}))
    steps, eps = [], []
    for i, w in enumerate(won):
        for s in range(2):
            steps.append({"task": f"t{i}", "step": s, "llm_time": llm_time, "completion_tokens": tokens,
                          "route_score": None})
        eps.append({"task": f"t{i}", "won": w, "steps": 2, "high_calls": high, "calls": 2})
    _jsonl(d / "steps.jsonl", steps)
    _jsonl(d / "episodes.jsonl", eps)


COEF = {"bf16": 25.02, "low": 16.77, "gptq_w3a16": 14.58, "router": 19.9}


def _runs(root: Path):
    _run(root, "hf", "full", "full", ["bf16"], 0.1, 10, [True, True], high=2)
    _run(root, "hf", "quant-gptq_w4a16", "quant", ["gptq_w4a16"], 0.06, 10, [True, False])
    _run(root, "hf", "quant-gptq_w3a16", "quant", ["gptq_w3a16"], 0.05, 10, [False, False])
    _run(root, "hf", "random-gptq_w4a16", "random", ["bf16", "gptq_w4a16"], 0.08, 10, [True, True], high=1)
    _run(root, "vllm", "full", "full", ["bf16"], 0.02, 10, [True, False], high=2)


def test_run_rows_give_latency_ratios_against_bf16_and_table3(tmp_path):
    _runs(tmp_path)
    rows = {(r["backend"], r["run"]): r for r in gc.run_rows(tmp_path, COEF)}
    full, w4, w3 = rows["hf", "full"], rows["hf", "quant-gptq_w4a16"], rows["hf", "quant-gptq_w3a16"]
    assert full["ms_per_token"] == pytest.approx(10.0) and full["ms_per_step"] == pytest.approx(100.0)
    assert full["success"] == 1.0 and full["high_share"] == 1.0 and full["tokens"] == 40
    assert w4["low_vs_high"] == pytest.approx(0.6) and w4["table3_low_vs_high"] == pytest.approx(16.77 / 25.02)
    assert w4["success"] == 0.5 and w4["high_share"] == 0.0
    assert w3["low_vs_high"] == pytest.approx(0.5) and w3["table3_low_vs_high"] == pytest.approx(14.58 / 25.02)
    assert w3["w3_projected_ms_per_token"] == pytest.approx(6.0 / 1.15)
    mixed = rows["hf", "random-gptq_w4a16"]
    assert mixed["quant"] is None and "ms_per_token" not in mixed and mixed["high_share"] == 0.5
    assert rows["vllm", "full"]["ms_per_token"] == pytest.approx(2.0) and "low_vs_high" not in rows["vllm", "full"]


# ---------------------------------------------------------------------------------------- gather

def test_gather_writes_one_json_and_one_markdown(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    (work / "stages.tsv").write_text("quantize_gptq_w4a16\tok\t0\t20.0\t150\t\n"
                                     "quantize_gptq_w3a16\tfailed\t1\t9.0\t150\t\n"
                                     "env_vllm\tskipped\t\t\t\tno vLLM on this machine\n")
    (work / "logs/quantize_gptq_w3a16.log").write_text("Traceback\nRuntimeError: CUDA error: no kernel image\n")
    (work / "env.json").write_text(json.dumps({"python": "3.12.3", "gpu": "NVIDIA H200", "versions": {"torch": "2.11.0"},
                                               "source": {"commit": "abc1234", "dirty": False}}))
    (work / "plan.json").write_text(json.dumps({"CELL": "household/tiny", "DRY": "0", "COEFFICIENTS": COEF}))
    q = work / "models/gptq_w4a16"
    q.mkdir(parents=True)
    (q / "dmr_quantization.json").write_text(json.dumps({
        "scheme": "gptq_w4a16", "calibration_samples": 128, "max_seq_length": 512,
        "agreement": {"top1_agreement": 0.99, "mean_kl": 1.5e-4, "positions": 100},
        "versions": {"llmcompressor": "0.14.0.1"}}))
    rows = [{"task": f"t{i}", "step": 0, "kl": float(i + 1), "kl_topk_missing": 0} for i in range(10)]
    _jsonl(work / "kl/hf_gptq_w4a16.jsonl", rows)
    _jsonl(work / "kl/vllm_gptq_w4a16.jsonl", [r | {"kl": r["kl"] * 0.9} for r in rows])
    _jsonl(work / "kl/hf_gptq_w3a16.jsonl", rows)
    _runs(work / "rollouts")
    (work / "throughput_hf.json").write_text(json.dumps({
        "backend": "hf", "episodes": 16, "shards": {"1": {"episodes_per_s": 0.5, "steps_per_s": 7.0, "steps_per_cpu_s": 7.0},
                                                   "16": {"episodes_per_s": 4.0, "steps_per_s": 56.0, "steps_per_cpu_s": 50.0}},
        "speedup": {"1": 1.0, "16": 8.0}}))
    (work / "servers.json").write_text(json.dumps({"done": True, "servers": {
        "bf16": {"model": "/m/bf16", "url": "http://127.0.0.1:1/v1", "seconds": 30.0, "kernels": ["MarlinLinearKernel"]},
        "gptq_w3a16": {"model": "/m/w3", "error": "vLLM server ... exited", "seconds": 9.0, "first_error":
                       "(Worker pid=14706) ERROR 12-04 16:49:17 [multiproc_executor.py:953] ValueError: no kernel |\n"
                       "(Worker pid=14706) ERROR 12-04 16:49:17 [multiproc_executor.py:953]  Unsupported uint3b4"}}}))
    res = gc.gather(work, out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["stages"][1]["error"] == "RuntimeError: CUDA error: no kernel image"
    assert saved["quantize"]["gptq_w4a16"]["top1_agreement"] == 0.99
    cmp_ = saved["kl"]["gptq_w4a16"]["compare"]
    assert cmp_["spearman"] == pytest.approx(1.0) and cmp_["p99_ratio"] == pytest.approx(0.9)
    assert "vllm" not in saved["kl"]["gptq_w3a16"] and saved["kl"]["gptq_w3a16"]["hf"]["steps"] == 10
    assert saved["throughput"]["hf"]["speedup"]["16"] == 8.0 and res["problems"] == []
    md = (out / "results.md").read_text()
    assert "Commit abc1234; cell household/tiny; full run; GPU: NVIDIA H200" in md
    assert "| gptq_w4a16 | 0.990 | 1.50e-04 | 128 |" in md
    assert "| gptq_w3a16 | no | 9 | – | ValueError: no kernel / Unsupported uint3b4 |" in md
    assert "| bf16 | yes | 30 | MarlinLinearKernel |  |" in md
    assert "| hf | 16 | 4.000 | 56.0 | 8.00x |" in md
    assert "| hf | quant-gptq_w4a16 | 50.0% (2) | 2.0 | 0% | 6.00 | 60.00 | 0.600 | 0.670 | – |" in md
    assert "- quantize_gptq_w3a16 (failed): RuntimeError: CUDA error: no kernel image" in md
    assert "- env_vllm (skipped): no vLLM on this machine" in md
    assert not math.isnan(cmp_["tail_median_rel_error"])


def test_gather_of_an_empty_work_folder_still_reports(tmp_path):
    res = gc.gather(tmp_path / "nothing", tmp_path / "out")
    assert res["stages"] == [] and res["rollouts"] == [] and res["kl"] == {}
    assert (tmp_path / "out/results.md").read_text().startswith("# GPU check")


# ----------------------------------------------------------------------------------- vLLM plumbing

def test_shared_loader_binds_served_models_only():
    calls = []

    def load(name, model, **kw):
        calls.append((name, model, kw))
        return name, model, kw

    servers = {"bf16": {"model": "/m/bf16", "url": "http://127.0.0.1:9/v1"},
               "gptq_w3a16": {"model": "/m/w3", "error": "no 3-bit kernel"}}
    bound = gc.shared_loader(servers, load)
    assert bound("vllm", "/m/bf16", top_logprobs=20) == ("vllm", "/m/bf16", {"base_url": "http://127.0.0.1:9/v1",
                                                                              "top_logprobs": 20})
    assert bound("hf", "/m/bf16") == ("hf", "/m/bf16", {})
    assert bound("vllm", "/m/x", server={"gpu_memory_utilization": 0.1})[2] == {"server": {"gpu_memory_utilization": 0.1}}
    with pytest.raises(RuntimeError, match="did not start: no 3-bit kernel"):
        bound("vllm", "/m/w3")
    with pytest.raises(RuntimeError, match="no vLLM server for /m/other"):
        bound("vllm", "/m/other")


def test_the_vllm_backend_binds_to_a_shared_server_without_calling_it():
    pytest.importorskip("openai")
    from dmr import llm

    model = str(ROOT / "agents/tiny")
    b = gc.shared_loader({"bf16": {"model": model, "url": "http://127.0.0.1:9/v1"}}, llm.load)("vllm", model)
    try:
        assert b.base_url == "http://127.0.0.1:9/v1" and b.model == model and b.server is None
    finally:
        b.close()


# ---------------------------------------------------------------------------------------- script

def test_the_script_parses_and_explains_itself(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    h = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert h.returncode == 0 and "--cpu-smoke" in h.stdout and "--fetch-wheels" in h.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    r = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "DMR_GPU_CHECK_WORK": str(foreign), "OUT": str(tmp_path / "o")})
    assert r.returncode == 2 and "not a gpu_check work folder" in r.stderr and (foreign / "keep.txt").exists()


def test_kernels_are_read_off_a_server_log():
    log = ("(Worker pid=1) INFO 12-04 16:47:53 [__init__.py:923] Using MacheteLinearKernel for mixed-precision linear\n"
           "(Worker pid=1) INFO 12-04 16:47:53 [compressed_tensors_wNa16.py:138] Using MacheteLinearKernel for "
           "CompressedTensorsWNA16\nUsing FLASH_ATTN backend.\n")
    assert gc.kernels(log) == ["MacheteLinearKernel"] and gc.kernels("nothing") == []


def test_serve_takes_vllm_arguments_that_look_like_flags(tmp_path, monkeypatch):
    got = {}
    monkeypatch.setattr(gc, "serve", lambda models, python, out, log_dir, gmu, extra, timeout: got.update(
        models=models, extra=extra, gmu=gmu))
    gc.main(["serve", "--model", "bf16=/m/a", "--model", "w4=/m/b", "--python", "py", "--out", str(tmp_path / "s.json"),
             "--log-dir", str(tmp_path / "logs"), "--extra=--enforce-eager --max-model-len 1024"])
    assert got == {"models": {"bf16": "/m/a", "w4": "/m/b"}, "extra": ["--enforce-eager", "--max-model-len", "1024"],
                   "gmu": 0.08}
    # The script passes them that way (argparse takes a bare "--enforce-eager" for an option).
    assert '--extra="$VLLM_ARGS"' in SCRIPT.read_text()
