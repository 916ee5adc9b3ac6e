"""The Snakemake workflow itself: schema validation, lint, dry-run, and a micro end-to-end run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]


def snakemake(*args, cwd: Path, check=False):
    return subprocess.run([*SNAKEMAKE, "--directory", str(cwd), *args], capture_output=True, text=True,
                          check=check, timeout=1800)


def write_config(tmp_path: Path, edit) -> Path:
    cfg = yaml.safe_load((ROOT / "config/micro.yaml").read_text())
    edit(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("edit,key", [
    (lambda c: c["models"]["tiny"].__setitem__("tokenzer", c["models"]["tiny"].pop("tokenizer")), "tokenzer"),
    (lambda c: c.__setitem__("evalute", c.pop("evaluate")), "evalute"),
    (lambda c: c["benchmarks"]["household"]["decoding"].__setitem__("temprature", 0.0), "temprature"),
])
def test_schema_rejects_misspelled_key(tmp_path, edit, key):
    r = snakemake("-n", "--configfile", str(write_config(tmp_path, edit)), cwd=tmp_path)
    assert r.returncode != 0
    assert f"'{key}' was unexpected" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_schema_rejects_mistyped_value(tmp_path):
    cfg = write_config(tmp_path, lambda c: c["models"]["tiny"]["train"].__setitem__("steps", "ten"))
    r = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert r.returncode != 0 and "'ten' is not of type 'integer'" in r.stdout + r.stderr
    assert "['train']['steps']" in r.stdout + r.stderr


def test_cells_must_name_defined_benchmarks(tmp_path):
    cfg = write_config(tmp_path, lambda c: c["cells"].append({"benchmark": "houshold", "model": "tiny"}))
    r = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert r.returncode != 0 and "unknown benchmark 'houshold'" in r.stdout + r.stderr


def test_router_width_must_split_into_heads(tmp_path):
    """A model's router width (models.NAME.router over route.router) is checked before any job runs."""
    cfg = write_config(tmp_path, lambda c: c["models"]["tiny"].__setitem__("router", {"d_model": 130}))
    r = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert r.returncode != 0
    assert "the router of model 'tiny' (route.router, models.tiny.router): d_model 130 is not a multiple of heads 4" \
        in r.stdout + r.stderr


def test_lint_is_clean():
    r = subprocess.run([*SNAKEMAKE, "--lint"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr


def test_dry_run_default_config_lists_rules(tmp_path):
    r = snakemake("-n", "--configfile", str(ROOT / "config/config.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for rule in ("expert_data", "quantize", "rollout", "evaluate", "step_types", "latency",
                 "grpo", "calibrate_grpo", "rank", "diagnose", "summary"):
        assert re.search(rf"^{rule}\s+\d+", r.stdout + r.stderr, re.M), rule
    # The shipped household agent is a checkpoint, not trained by the default run.
    assert "output: results/household/tiny/train\n" not in r.stdout and "output: results/household/tiny/bf16/rollouts" in r.stdout
    # The online ablations run under `make ablations` only.
    assert "rollout_variant" not in r.stdout and "/ablation/" not in r.stdout
    # `make agents`: the overlay trains every agent from its recipe and installs its card.
    r = snakemake("-n", "agents", "--configfile", str(ROOT / "config/config.yaml"), str(ROOT / "config/agents.yaml"),
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for rule in ("expert_data", "tokenizer", "train_agent", "select_rollout", "select_agent", "agent_card", "agents"):
        assert re.search(rf"^{rule}\s+\d+", r.stdout + r.stderr, re.M), rule
    # Ablations are a target of their own (`make ablations`), outside the default run.
    assert not re.search(r"^klst_variant\s+\d+", r.stdout + r.stderr, re.M)
    r = snakemake("-n", "ablations", "--configfile", str(ROOT / "config/config.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for rule in ("klst_variant", "calibrate_variant", "rollout_variant", "ablation"):
        assert re.search(rf"^{rule}\s+\d+", r.stdout + r.stderr, re.M), rule
    # route.ablation.online.seeds 0: offline only, no routed run of a variant.
    cfg = write_config(tmp_path, lambda c: c["route"]["ablation"].update(online={"seeds": 0}))
    r = snakemake("-n", "ablations", "--configfile", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^klst_variant\s+2", r.stdout, re.M) and "rollout_variant" not in r.stdout


def test_each_seed_evaluates_its_own_test_tasks(tmp_path):
    """`tasks_per_seed: distinct`: seed s rolls out test tasks [s*n, (s+1)*n), and the table pools
    every seed (planned here; the micro end-to-end run executes one seed)."""
    cfg = write_config(tmp_path, lambda c: c["evaluate"].__setitem__("seeds", [0, 1, 2]))
    r = snakemake("-n", "-p", "--configfile", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [c for c in r.stdout.splitlines() if c.startswith("Shell command: python -m dmr.")]
    for seed in (0, 1, 2):
        (full,) = [c for c in cmds if f"--out results/household/tiny/bf16/rollouts/full/seed{seed} " in c]
        assert f"--n 4 --offset {4 * seed} " in full, full
    (table,) = [c for c in cmds if "python -m dmr.evaluate " in c and "results/household/" in c]
    assert all(f"results/household/tiny/bf16/rollouts/full/seed{s}/episodes.parquet" in table for s in (0, 1, 2))


def test_dagger_and_pace_plan_the_rounds_they_name(tmp_path):
    """route.dagger.tasks > 0: a round-0 router, its calibration run, its routed probe run of training
    tasks after the KL pool's, and the cell's router trained on both; route.pace adds the pace of each
    budget to the routed DMR runs, and `pace: null` (the paper's rule) leaves the command as it was."""
    cmds = dagger_plan(tmp_path)
    check_dagger(cmds, CELL, offset=MICRO_KL_TASKS)
    r = snakemake("-n", "-p", "--configfile", str(write_config(tmp_path, lambda c: c["route"].__setitem__("pace", None))),
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--budget" in r.stdout and "--pace" not in r.stdout and "router0" not in r.stdout


def test_kl_offset_moves_the_pool_and_what_follows_it(tmp_path):
    """route.kl_offset: the KL pool plays training tasks from the offset on, and the DAgger probe and
    GRPO the tasks after that pool (a pool past the agent's expert games)."""
    cmds = dagger_plan(tmp_path, kl_offset=7)
    (pool,) = [c for c in cmds if "--out results/household/tiny/bf16/rollouts/full/train " in c]
    assert f"--split train --n {MICRO_KL_TASKS} --offset 7 " in pool, pool
    check_dagger(cmds, CELL, offset=7 + MICRO_KL_TASKS)
    grpo = [c for c in cmds if "python -m dmr.grpo " in c]
    assert grpo and all(f"--offset {7 + MICRO_KL_TASKS} " in c for c in grpo), grpo


CELL = "results/household/tiny/gptq_w4a16"
MICRO_KL_TASKS = yaml.safe_load((ROOT / "config/micro.yaml").read_text())["route"]["kl_tasks"]


def dagger_plan(tmp_path, **route):
    """The dry run's dmr commands of the micro config with a DAgger round at 0.4, paced, and `route` over it."""
    r = snakemake("-n", "-p", "--configfile", str(write_config(tmp_path, lambda c: c["route"].update(
        dagger={"tasks": 5, "budget": 0.4}, pace={"burst": 2}, **route))), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return [c for c in r.stdout.splitlines() if c.startswith("Shell command: python -m dmr.")]


def check_dagger(cmds, cell, offset):
    """The DAgger round's commands: round-0 router, its probe of training tasks from `offset`, the final router."""
    (base,) = [c for c in cmds if "dmr.klst " in c and f"--out {cell}/router0 " in c]
    (final,) = [c for c in cmds if "dmr.klst " in c and f"--out {cell}/router " in c]
    assert "--dagger" not in base and f"--dagger {cell}/rollouts/dmr0-k0.4/dagger " in final
    (dagger,) = [c for c in cmds if f"--out {cell}/rollouts/dmr0-k0.4/dagger " in c]
    for arg in ("--split train", "--n 5", f"--offset {offset}", f"--router {cell}/router0",
                f"--calibration {cell}/router0/calibration.json", "--budget 0.4 --pace 0.4 --burst 2", "--probe-kl"):
        assert arg in dagger, arg
    assert any(f"--router {cell}/router0 --threshold 0.5" in c and "--split calib" in c for c in cmds)
    routed = [c for c in cmds if f"--router {cell}/router --calibration" in c]
    assert routed and all(re.search(r"--budget ([0-9.]+) --pace \1 --burst 2 ", c) for c in routed)


def test_encoder_quant_reaches_router_training_and_latency(tmp_path):
    """route.router.encoder_quant other than none goes into the --arch of dmr.klst (which records it
    in router.json for deployment) and of dmr.latency (which times that encoder); at none the flag
    is absent, so fp32 routers' commands are as before the option (checked by hand on the profiles)."""
    def edit(c):
        c["route"]["router"].update(encoder="text", window=50, encoder_quant="int8")
    r = snakemake("-n", "-p", "--configfile", str(write_config(tmp_path, edit)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [c for c in r.stdout.splitlines() if c.startswith("Shell command: python -m dmr.")]
    for stage in ("dmr.klst ", "dmr.latency "):
        assert [c for c in cmds if stage in c] and all('"encoder_quant": "int8"' in c for c in cmds if stage in c), stage
    r = snakemake("-n", "-p", "--configfile", str(ROOT / "config/micro.yaml"), cwd=tmp_path)
    cmds = [c for c in r.stdout.splitlines() if c.startswith("Shell command: python -m dmr.")]
    assert r.returncode == 0 and any("dmr.klst " in c for c in cmds) and not any("encoder_quant" in c for c in cmds)


def test_regime_target_checks_the_schemes_it_names(tmp_path):
    """`make regime`: one dmr.regime table per cell over its `regime` schemes, routed or not: each
    scheme's KL pool and Quant runs; the oracle at K = 0.4 only where the scheme is routed."""
    def edit(c):
        c["cells"][0]["regime"] = [c["cells"][0]["quants"][0], "rtn_w3a16_g32"]  # routed (route = quants), not
        c["route"]["baselines"], c["route"]["baseline_budgets"] = ["random", "oracle"], [0.4]
        c["route"]["budgets"] = sorted(set(c["route"]["budgets"]) | {0.4})
    cfg = write_config(tmp_path, edit)
    routed, extra = yaml.safe_load(cfg.read_text())["cells"][0]["regime"]
    r = snakemake("-n", "-p", "regime", "--configfile", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [c for c in r.stdout.splitlines() if c.startswith("Shell command: python -m dmr.")]
    (table,) = [c for c in cmds if "python -m dmr.regime " in c and "results/household/" in c]
    assert f"--schemes {routed} {extra} " in table and "--cell results/household/tiny " in table
    cell = "results/household/tiny"
    assert any(f"--out {cell}/{extra}/kl/steps.parquet" in c for c in cmds)
    assert any(f"--out {cell}/{extra}/rollouts/quant/seed0 " in c for c in cmds)
    assert any(f"--out {cell}/{routed}/rollouts/oracle-k0.4/seed0 " in c for c in cmds)
    assert not any(f"{cell}/{extra}/rollouts/oracle" in c for c in cmds)
    assert "dmr.regime" not in snakemake("-n", "-p", "--configfile", str(cfg), cwd=tmp_path).stdout


# The micro DAG runs once per session on one xdist worker (`make test` distributes by loadgroup);
# each test below checks one stage of it, so that one failure does not hide the rest. Session, not
# module, scope: xdist may hand that worker another module's test between two of these, and a
# module-scoped fixture would be torn down and the whole DAG run again.
@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Path:
    """The working directory of the whole DAG of the micro config, run for real."""
    tmp_path = tmp_path_factory.mktemp("micro")
    r = snakemake("--configfile", str(ROOT / "config/micro.yaml"), "--cores", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp_path


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_selects_the_bf16_checkpoint(micro):
    """Agent selection on calibration episodes: the chosen candidate is the bf16 checkpoint."""
    cell = micro / "results/household/tiny"
    sel = pl.read_parquet(cell / "tables/select.parquet")
    assert sel["candidate"].to_list() == ["p0.50", "p1.00"] and sel["episodes"].to_list() == [3, 3]
    chosen = json.loads((cell / "bf16/model/selection.json").read_text())["chosen"]
    assert sel.filter(pl.col("chosen"))["candidate"].to_list() == [chosen]
    assert (cell / "bf16/model/model.safetensors").read_bytes() == \
        (cell / "train" / chosen / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_table_1(micro):
    """Table 1 of the household cell: its rows, budgets, seeds, formats and paired comparison."""
    cell = micro / "results/household/tiny"
    table = pl.read_parquet(cell / "tables/main.parquet")
    assert table["method"].to_list() == ["Full", "Quant", "DMR", "DMR", "DMR", "GRPO", "GRPO", "GRPO", "Random", "Oracle",
                                         "Uncertainty"]
    assert table["quant"].to_list() == ["bf16"] + ["gptq_w4a16"] * 10
    assert table["budget"].to_list()[1:] == [None, 0.2, 0.4, 0.7, 0.2, 0.4, 0.7, 0.4, 0.4, 0.4]
    assert set(table["seeds"]) == {1} and set(table["episodes"]) == {4}
    assert table["high_frac"].to_list()[:2] == [1.0, 0.0]
    assert (cell / "tables/main.md").read_text().startswith("# household/tiny")
    assert r"\begin{tabular}" in (cell / "tables/main.tex").read_text()
    row = table.filter(pl.col("method") == "DMR").row(1, named=True)
    assert row["vs_random"] is not None and row["paired_tasks"] == 4 and row["vs_random_verdict"] in ("win", "tie", "loss")


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_latency(micro):
    """Latency (App. A): measured coefficients, Table 3, and the modelled time in Table 1."""
    cell = micro / "results/household/tiny"
    table = pl.read_parquet(cell / "tables/main.parquet")
    coef = json.loads((cell / "latency/coefficients.json").read_text())
    assert coef["source"] == "measured" and coef["router"] > 0 and coef["router_replay"]["decided"] > 0
    assert set(coef["per_token"]) == {"bf16", "gptq_w4a16"} and coef["t_ref"] > 0
    assert pl.read_parquet(cell / "tables/latency.parquet")["quant"].to_list() == ["gptq_w4a16"]
    assert "cost" in table.columns  # null here: the micro agent wins no episode, and time counts wins only
    assert "Latency: coefficients measured here" in (cell / "tables/main.md").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_grpo(micro):
    """GRPO (Sec. 4.3): started from the KL-ST router, moved it, calibrated and evaluated like it."""
    cell = micro / "results/household/tiny"
    grpo = cell / "gptq_w4a16/grpo/lam0.1"
    curve = pl.read_parquet(grpo / "curve.parquet")
    assert curve.height == 1 and curve["episodes"].to_list() == [4]
    traj = pl.read_parquet(grpo / "trajectories.parquet")
    assert traj.group_by("group").agg(pl.col("advantage").sum().abs())["advantage"].max() < 1e-4
    a = torch.load(cell / "gptq_w4a16/router/router.pt", weights_only=True)
    b = torch.load(grpo / "router/router.pt", weights_only=True)
    assert a.keys() == b.keys() and (curve["decisions"][0] == 0 or any(not torch.equal(a[k], b[k]) for k in a))
    assert set(json.loads((grpo / "router/calibration.json").read_text())["thresholds"]) == {"0.2", "0.4", "0.7"}
    grpo_steps = pl.read_parquet(cell / "gptq_w4a16/rollouts/grpo-k0.4/seed0/steps.parquet")
    assert grpo_steps["route_score"].null_count() == 0


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_average_rank(micro):
    """Average rank (Sec. 5.3): the eight-point pool and its attribution."""
    cell = micro / "results/household/tiny"
    ranks = pl.read_parquet(cell / "tables/rank.parquet")
    assert ranks.height == 8 and sorted(set(ranks["method"])) == ["DMR", "Full", "GRPO", "Quant"]
    summary = pl.read_parquet(cell / "tables/rank_summary.parquet")
    assert summary["winner"][0] in ("KL-ST", "GRPO", "tie") and summary["time_axis"][0] == "cost"


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_figures(micro):
    """Every figure of the cell, as .png and .pdf."""
    cell = micro / "results/household/tiny"
    for fig in ("pareto", "kl_hist_gptq_w4a16", "router_scores_gptq_w4a16", "grpo_curve_gptq_w4a16_lam0.1",
                "router_scores_gptq_w4a16_grpo_lam0.1", "pareto_rank"):
        assert (cell / f"figures/{fig}.png").exists() and (cell / f"figures/{fig}.pdf").exists(), fig


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_klst_stage(micro):
    """KL-ST stage: KL pool of the configured size, one KL row per pool step, a router and budgets."""
    cell = micro / "results/household/tiny"
    pool = pl.read_parquet(cell / "bf16/rollouts/full/train/episodes.parquet")
    assert pool.height == 10 and set(pool["split"]) == {"train"}
    kls = pl.read_parquet(cell / "gptq_w4a16/kl/steps.parquet")
    assert kls.height == pl.read_parquet(cell / "bf16/rollouts/full/train/steps.parquet").height
    assert (kls["kl"] >= 0).all()
    cal = json.loads((cell / "gptq_w4a16/router/calibration.json").read_text())
    assert set(cal["thresholds"]) == {"0.2", "0.4", "0.7"}
    assert json.loads((cell / "gptq_w4a16/router/metrics.json").read_text())["params"]["router"] > 0
    calib = pl.read_parquet(cell / "gptq_w4a16/rollouts/dmr-t0.5/calib/episodes.parquet")
    assert calib.height == 8 and set(calib["split"]) == {"calib"}


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_paced_dmr_run(micro):
    """Paced (route.pace, burst 2): the threshold is capped at 0.5, and a step goes high only while
    the episode's high steps stay within 0.4 x its steps so far + 2."""
    cell = micro / "results/household/tiny"
    cal = json.loads((cell / "gptq_w4a16/router/calibration.json").read_text())
    dmr_steps = pl.read_parquet(cell / "gptq_w4a16/rollouts/dmr-k0.4/seed0/steps.parquet")
    tau = min(cal["thresholds"]["0.4"], 0.5)
    assert dmr_steps["route_score"].null_count() == 0
    for _, ep in dmr_steps.sort("task", "step").group_by("task", maintain_order=True):
        high = 0
        for n, r in enumerate(ep.iter_rows(named=True)):
            want = r["route_score"] >= tau and high + 1 <= 0.4 * (n + 1) + 2
            assert (r["precision"] == "bf16") == want, (r["task"], r["step"])
            high += want


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_rollouts_and_checkpoints(micro):
    """The Full and Quant rollouts, the quantized checkpoint's metadata and the step-type table."""
    cell = micro / "results/household/tiny"
    for run in ("bf16/rollouts/full", "gptq_w4a16/rollouts/quant"):
        eps = pl.read_parquet(cell / f"{run}/seed0/episodes.parquet")
        assert eps.height == 4 and set(eps["index"]) == set(range(4))
    meta = json.loads((cell / "gptq_w4a16/model/dmr_quantization.json").read_text())
    assert meta["scheme"] == "gptq_w4a16" and meta["versions"]["llmcompressor"] == "0.14.0.1"
    cfg = (cell / "bf16/model/config.json").read_text()
    assert '"Qwen3ForCausalLM"' in cfg and '"bfloat16"' in cfg
    steps_by_type = pl.read_parquet(cell / "gptq_w4a16/kl/step_types.parquet")
    assert steps_by_type["step_type"].to_list() == ["action", "all"]


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_shop_cell(micro):
    """The shop cell: the embedded WebShop through expert data, training, quantization and rollouts."""
    tmp_path = micro
    shop = tmp_path / "results/shop/tiny"
    st = pl.read_parquet(shop / "tables/main.parquet")
    assert st["method"].to_list() == ["Full", "Quant"] and set(st["episodes"]) == {2}
    for run in ("bf16/rollouts/full", "gptq_w4a16/rollouts/quant"):
        steps = pl.read_parquet(shop / f"{run}/seed0/steps.parquet")
        assert set(steps["step_type"]) <= {"search", "click"}
        assert (steps.filter(pl.col("step") == 0)["step_type"] == "search").all()
        eps = pl.read_parquet(shop / f"{run}/seed0/episodes.parquet")
        assert eps["score"].is_between(0.0, 1.0).all() and (eps["steps"] <= 5).all()


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_summary_and_timing(micro):
    """The summary the README quotes, and where the time went: one benchmark file per job, per rule."""
    tmp_path = micro
    text = (tmp_path / "results/summary.md").read_text()
    assert "## household/tiny" in text and "Δ vs Random (95% CI)" in text and "## Where the time goes" in text
    assert "Critical path (" in text and "| train_agent |" in text
    timing = pl.read_parquet(tmp_path / "results/timing.parquet")
    assert {"train_agent", "quantize", "rollout", "klst", "evaluate"} <= set(timing["rule"])
    # Every job's benchmark file but the summary's own, written after it ran.
    tsvs = [p for p in (tmp_path / "results").glob("**/benchmarks/*/*.tsv") if p.parent.name != "summary"]
    assert (timing["minutes"] > 0).all() and timing["jobs"].sum() == len(tsvs)


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_is_deterministic(micro):
    """Determinism: a second run from clean (the household cell, up to the KL-ST router) gives the
    same expert data, agent, quantized checkpoint, KL pool, step KL, KL-ST router and Full
    rollout; rollouts, calibration and Table 1 are functions of those and the seeds."""
    tmp_path = micro
    clean = tmp_path / "clean"
    clean.mkdir()
    cfg = write_config(clean, lambda c: c.__setitem__("cells", c["cells"][:1]))
    kl_table = "results/household/tiny/gptq_w4a16/kl/steps.parquet"
    full = "results/household/tiny/bf16/rollouts/full/seed0/steps.parquet"
    router = "results/household/tiny/gptq_w4a16/router"
    r2 = snakemake("--configfile", str(cfg), "--cores", "2", kl_table, full, f"{router}/router.pt", cwd=clean)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    for f in ("household/tiny/bc/episodes.jsonl", "household/tiny/bf16/model/model.safetensors",
              "household/tiny/gptq_w4a16/model/model.safetensors"):
        assert (clean / "results" / f).read_bytes() == (tmp_path / "results" / f).read_bytes(), f
    assert pl.read_parquet(clean / kl_table).select("task", "step", "kl").equals(
        pl.read_parquet(tmp_path / kl_table).select("task", "step", "kl"))
    ours, theirs = torch.load(clean / router / "router.pt"), torch.load(tmp_path / router / "router.pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for run in (full, "results/household/tiny/bf16/rollouts/full/train/steps.parquet"):
        cols = ["task", "step", "output", "precision", "route_score"]
        assert pl.read_parquet(clean / run).select(cols).sort("task", "step").equals(
            pl.read_parquet(tmp_path / run).select(cols).sort("task", "step")), run


@pytest.mark.long
def test_micro_table_1_is_byte_identical_from_clean(tmp_path):
    """Two runs from clean of the micro household cell, each the whole chain from expert data to Table 1
    (make test-long): Table 1's parquet, Markdown and LaTeX are byte-identical, and only the wall-time
    table differs. Latency coefficients come from the config, as in the embedded default: measured ones
    (the micro config's) are wall time too, and reach GRPO's reward."""
    def edit(c):
        c["cells"] = c["cells"][:1]
        c["latency"] = {"source": "config", "coefficients": {"bf16": 25.02, "low": 16.77, "router": 19.9}}

    tables = []
    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        r = snakemake("--configfile", str(write_config(d, edit)), "--cores", "2",
                      "results/household/tiny/tables/main.md", cwd=d)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        tables.append(d / "results/household/tiny/tables")
    for name in ("main.parquet", "main.md", "main.tex"):
        assert (tables[0] / name).read_bytes() == (tables[1] / name).read_bytes(), name
    assert {"ep_time", "speedup"} <= set(pl.read_parquet(tables[0] / "wall_time.parquet").columns)


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_ablations_online(micro):
    """`snakemake ablations` on the finished micro DAG: each variant router is calibrated and played at
    every budget on the cell's test tasks, and the table has its success per K beside the offline columns."""
    r = snakemake("ablations", "--configfile", str(ROOT / "config/micro.yaml"), "--cores", "2", cwd=micro)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = yaml.safe_load((ROOT / "config/micro.yaml").read_text())
    budgets, online = cfg["route"]["budgets"], cfg["route"]["ablation"]["online"]["budgets"]
    variants = ["tau-dense", "encoder-text"]
    q = micro / "results/household/tiny/gptq_w4a16"
    df = pl.read_parquet(micro / "results/household/tiny/tables/ablation_gptq_w4a16.parquet")
    # Offline columns at every budget; online ones at the budgets route.ablation.online plays.
    assert sorted(df.select("variant", "budget").rows()) == sorted((v, k) for v in variants for k in budgets)
    assert df["recall"].null_count() == 0 and df["val_bacc"].null_count() == 0
    played = df.filter(pl.col("budget").is_in(online))
    assert played.height == len(variants) * len(online) and played["success"].null_count() == 0
    assert df.filter(~pl.col("budget").is_in(online))["success"].null_count() == df.height - played.height
    for r in played.iter_rows(named=True):
        run = pl.read_parquet(q / f"ablation/{r['variant']}/rollouts/dmr-k{r['budget']:g}/seed0/episodes.parquet")
        main = pl.read_parquet(q / f"rollouts/dmr-k{r['budget']:g}/seed0/episodes.parquet")
        assert r["success"] == pytest.approx(100 * run["won"].mean())
        assert r["delta"] == pytest.approx(100 * (run["won"].mean() - main["won"].mean()))  # same tasks, one seed
        assert r["dmr_success"] == pytest.approx(100 * main["won"].mean())
        assert r["paired_tasks"] == len(main) == cfg["benchmarks"]["household"]["tasks"]["test"]
        assert 0 <= r["high_frac"] <= 1 and not r["cell_router"]
    assert (q / "ablation/tau-dense/router/calibration.json").exists()
    assert "Δ vs DMR@K" in (micro / "results/household/tiny/tables/ablation_gptq_w4a16.md").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_rerun_has_nothing_to_do(micro):
    """A rerun of the finished DAG has nothing to do."""
    tmp_path = micro
    again = snakemake("--configfile", str(ROOT / "config/micro.yaml"), "--cores", "2", "-n", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("micro")
def test_micro_report(micro):
    """The Snakemake report of the finished run: Table 1 as HTML, the figures, their captions."""
    tmp_path = micro
    cell = micro / "results/household/tiny"
    assert "<td>Full</td>" in (cell / "tables/main.html").read_text()
    report = snakemake("--configfile", str(ROOT / "config/micro.yaml"), "--report", str(tmp_path / "report.html"),
                       cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "report.html").read_text()
    for text in ("Table 1", "KL-ST", "main.html", "pareto.png", "kl_hist_gptq_w4a16.png", "Success rate against"):
        assert text in page, text


@pytest.mark.parametrize("at,message", [([0.601, 0.604], "must differ there"), ([0.996], "below 0.995"),
                                        ([], "should be non-empty")])
def test_selection_snapshots_need_distinct_names(tmp_path, at, message):
    cfg = write_config(tmp_path, lambda c: c["models"]["tiny"]["select"].__setitem__("at", at))
    r = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert r.returncode != 0 and message in r.stdout + r.stderr
