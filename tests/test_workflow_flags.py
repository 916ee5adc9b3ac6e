"""workflow/lib/flags.py without Snakemake: a known config, validated by the workflow's schema (which
fills in its defaults), in; the paths and command-line flags of the jobs out."""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import yaml
from flags import ABLATION_RUN, Flags, as_json, cell, cli_flags, ladder, lows, run_seed
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")

# Three cells: household/tiny routes one of its two schemes, shop/tiny routes none (its GRPO router
# would decide search and click steps), alf/big is a local checkpoint on a fixed ALFWorld split.
CONFIG = yaml.safe_load("""
backend: {name: hf}
benchmarks:
  household:
    env: household
    env_kwargs: {max_steps: 12}
    tasks: {train: 100, calib: 8, test: 4}
    prompt: {style: react}
    decoding: {max_new_tokens: 16}
  shop:
    env: shop
    tasks: {train: 30, calib: 4, test: 2}
    router_steps: [click]
    grpo_router_steps: [search, click]
    prompt: {style: instruct}
    decoding: {constrained: true}
  alf:
    env: alfworld
    env_kwargs: {data: data/alfworld}
    tasks: {train: 1000, calib: 70, test: all}
    tasks_per_seed: same
    prompt: {style: react}
    decoding: {}
models:
  tiny: {source: train, select: {at: [0.9, 0.8], tasks: 30}, train: {steps: 10, max_minutes: 2}}
  big:
    source: path
    path: /nonexistent/Big
    router: {d_model: 64}
    quantize: {calibration: {source: calib.txt}}
route:
  kl_tasks: 10
  router: {layers: 2, d_model: 32, heads: 4}
  train: {epochs: 2}
  budgets: [0.2, 0.4]
  pace: {burst: 2}
  dagger: {tasks: 5, budget: 0.4}
  baselines: [random, oracle]
  baseline_budgets: [0.4]
  ablation: {depths: [2, 4], taus: [dense], all_steps: true, train: {epochs: 1}}
latency: {coefficients: {household/tiny: {bf16: 1.0, router: 0.5}}}
grpo: {lambdas: [0.1, 0.5], lambda: 0.5, tasks: 2, group_size: 4, iterations: 3, lr: 0.001, clip: 0.2,
       kl_coef: 0.01, seed: 0}
resources: {default: {runtime: 10}, kl: {gpu: 1}}
cells:
  - {benchmark: household, model: tiny, quants: [rtn_w2a16, gptq_w4a16], route: [rtn_w2a16]}
  - {benchmark: shop, model: tiny, quants: [gptq_w4a16], route: []}
  - {benchmark: alf, model: big, quants: [gptq_w4a16]}
evaluate: {seeds: [0, 2]}
""")
HOUSE = {"benchmark": "household", "model": "tiny", "quant": "rtn_w2a16"}
SHOP = {"benchmark": "shop", "model": "tiny", "quant": "gptq_w4a16"}
ALF = {"benchmark": "alf", "model": "big", "quant": "gptq_w4a16"}
H = "results/household/tiny"


def make(edit=None, basedir="/repo"):
    config = copy.deepcopy(CONFIG)
    if edit:
        edit(config)
    validate(config, SCHEMA)
    return Flags(config, basedir)


@pytest.fixture(scope="module")
def flags():
    return make()


def args_of(flags: str) -> dict:
    """--key value ... as {key: value}, values joined by spaces (JSON values shell-unquoted)."""
    out, key = {}, None
    for word in shlex.split(flags):
        if word.startswith("--"):
            key = word[2:]
            out[key] = None
        else:
            out[key] = word if out[key] is None else f"{out[key]} {word}"
    return out


def test_helpers():
    assert cli_flags({"max_minutes": 4, "batch_size": 8}) == "--max-minutes 4 --batch-size 8"
    assert cli_flags({}) == ""
    obj = {"style": "react", "prefix": "it's"}
    assert shlex.split(as_json(obj)) == [json.dumps(obj)]
    assert cell("{quant}/kl/steps.parquet") == "results/{benchmark}/{model}/{quant}/kl/steps.parquet"
    assert cell("card", {"benchmark": "b", "model": "m"}) == "results/b/m/card"
    assert cell("{quant}/model", HOUSE, quant="bf16") == f"{H}/bf16/model"
    assert [run_seed(r) for r in ("seed0", "seed12", "train", "calib", "probe")] == [0, 12, 0, 0, 0]


def test_config_wide_flags(flags):
    assert flags.backend == "--backend hf --backend-kwargs '{}'"
    assert flags.budgets == "0.2 0.4"
    assert flags.grpo_lambda == "0.5"
    # grpo.advantage comes from the schema's default; epochs is not set, so not passed.
    assert flags.grpo_flags == ("--tasks 2 --group-size 4 --iterations 3 --lr 0.001 --clip 0.2 --kl-coef 0.01 "
                                "--advantage std --seed 0")
    assert flags.ablation_variants == ["depth2", "depth4", "tau-dense", "steps-ao", "steps-as"]
    assert flags.candidates(HOUSE) == ["p0.80", "p0.90", "p1.00"] and flags.candidates(ALF) == ["p1.00"]
    nogrpo = make(lambda c: c.pop("grpo"))
    assert (nogrpo.grpo_lambda, nogrpo.grpo_flags) == ("none", "")


def test_resources_default_then_config_default_then_rule(flags):
    assert flags.resources("kl", 2) == {"cpus_per_task": 2, "gpu": 1, "mem_mb": 8000, "runtime": 10}
    assert flags.resources("summary") == {"cpus_per_task": 1, "gpu": 0, "mem_mb": 2000, "runtime": 10}
    assert make(lambda c: c.pop("resources")).resources("grpo", 3) == {
        "cpus_per_task": 3, "gpu": 0, "mem_mb": 8000, "runtime": 240}


def test_env_and_engine_args(flags):
    assert flags.env_args(HOUSE) == """--env household --env-kwargs '{"max_steps": 12}'"""
    # A relative ALFWorld data root is the repository's, so `snakemake --directory` elsewhere finds it.
    assert flags.env_args(ALF) == """--env alfworld --env-kwargs '{"data": "/repo/data/alfworld"}'"""
    absolute = make(lambda c: c["benchmarks"]["alf"]["env_kwargs"].update(data="/data/alf"))
    assert absolute.env_args(ALF) == """--env alfworld --env-kwargs '{"data": "/data/alf"}'"""
    assert flags.engine_args(HOUSE) == ("--backend hf --backend-kwargs '{}' --max-new-tokens 16 --temperature 0.0 "
                                        """--top-p 1.0 --prompt '{"style": "react"}' --shards 16""")
    assert flags.engine_args(SHOP).endswith("""--prompt '{"style": "instruct"}' --constrained --shards 16""")


def test_data_need_counts_every_split_a_config_plays(flags):
    # distinct tasks per seed: seeds 0 and 2 play test tasks [0, 12); selection plays 30 calibration tasks.
    assert flags.data_need(HOUSE) == "calib=30 test=12 train=10"
    assert flags.data_need(SHOP) == "calib=30 test=6"  # nothing routed: no KL pool
    assert flags.data_need(ALF) == "calib=70 test=all train=10"  # a local model: no selection
    assert flags.data_input(ALF) == ["results/alf/data.json"] and flags.data_input(HOUSE) == []


def test_run_tasks(flags):
    def tasks(w, run):
        return flags.run_tasks({**w, "run": run})
    assert tasks(HOUSE, "seed0") == "--split test --n 4 --offset 0"
    assert tasks(HOUSE, "seed2") == "--split test --n 4 --offset 8"
    assert tasks(HOUSE, "train") == "--split train --n 10 --offset 0"
    assert tasks(HOUSE, "dagger") == "--split train --n 5 --offset 10"  # after the KL pool's tasks
    assert tasks(HOUSE, "calib") == "--split calib --n 8 --offset 0"
    assert tasks(ALF, "seed2") == "--split test --n all --offset 0"
    same = make(lambda c: c["benchmarks"]["household"].update(tasks_per_seed="same"))  # a fixed split
    assert same.run_tasks({**HOUSE, "run": "seed2"}) == "--split test --n 4 --offset 0"
    assert same.data_need(HOUSE) == "calib=30 test=4 train=10"


def test_models_and_local_files(flags, tmp_path, monkeypatch):
    assert flags.model_dir(HOUSE) == f"{H}/bf16/model"
    assert flags.model_dir(HOUSE, "rtn_w2a16") == f"{H}/rtn_w2a16/model"
    assert flags.model_dir(ALF) == "/nonexistent/Big"
    assert flags.built_models(ALF, "bf16", "gptq_w4a16") == ["results/alf/big/gptq_w4a16/model"]
    assert flags.model_flags(HOUSE, "bf16", "rtn_w2a16") == (
        f"--model bf16={H}/bf16/model --model rtn_w2a16={H}/rtn_w2a16/model")
    assert flags.local_files() == {"models.big.path": "/nonexistent/Big",
                                   "models.big.quantize.calibration.source": "calib.txt"}
    assert flags.calibration(HOUSE) == ([f"{H}/bc/episodes.jsonl"], f"expert:{H}/bc/episodes.jsonl")
    assert flags.calibration(ALF) == ([], "calib.txt")  # an input only once it exists
    # A relative checkpoint: as given where it is in the working directory, else the checkout's (agents/).
    checkout, work = tmp_path / "checkout", tmp_path / "work"
    (checkout / "agents/tiny").mkdir(parents=True)
    work.mkdir()
    monkeypatch.chdir(work)
    shipped = make(lambda c: c["models"]["big"].update(path="agents/tiny"), basedir=str(checkout))
    assert shipped.model_dir(ALF) == str(checkout / "agents/tiny")
    (work / "agents/tiny").mkdir(parents=True)
    assert shipped.model_dir(ALF) == "agents/tiny"


def test_rollout_spec_per_policy(flags):
    def spec(w, policy, run="seed0"):
        return flags.rollout_spec({**w, "policy": policy, "run": run})
    both = f"--model bf16={H}/bf16/model --model rtn_w2a16={H}/rtn_w2a16/model"
    rd = f"{H}/rtn_w2a16/router"
    assert spec(HOUSE, "full") == ([f"{H}/bf16/model"], f"--model bf16={H}/bf16/model --policy full")
    assert spec(HOUSE, "quant")[1] == f"--model rtn_w2a16={H}/rtn_w2a16/model --policy quant"
    inputs, args = spec(HOUSE, "dmr-k0.4")
    assert inputs == [f"{H}/bf16/model", f"{H}/rtn_w2a16/model", f"{rd}/router.json", f"{rd}/calibration.json"]
    assert args == f"{both} --policy dmr --router {rd} --calibration {rd}/calibration.json --budget 0.4 --pace 0.4 --burst 2"
    assert spec(HOUSE, "dmr-k0.4", "probe")[1].endswith("--burst 2 --probe-kl")
    assert spec(HOUSE, "dmr0-k0.4", "dagger")[1] == (
        f"{both} --policy dmr --router {H}/rtn_w2a16/router0 --calibration {H}/rtn_w2a16/router0/calibration.json "
        "--budget 0.4 --pace 0.4 --burst 2 --probe-kl")
    assert spec(HOUSE, "dmr-t0.5", "calib") == (
        [f"{H}/bf16/model", f"{H}/rtn_w2a16/model", f"{rd}/router.json"], f"{both} --policy dmr --router {rd} --threshold 0.5")
    match, kl = f"{H}/rtn_w2a16/rollouts/dmr-k0.4/seed0/episodes.parquet", f"{H}/rtn_w2a16/kl/steps.parquet"
    assert spec(HOUSE, "oracle-k0.4")[1] == f"{both} --policy oracle --match {match} --kl {kl}"
    assert spec(HOUSE, "random-k0.4") == ([f"{H}/bf16/model", f"{H}/rtn_w2a16/model", match],
                                         f"{both} --policy random --match {match}")
    # GRPO's router decides the shop's search steps too; the ALFWorld cell reads its data manifest.
    grpo = "results/shop/tiny/gptq_w4a16/grpo/lam0.5/router"
    assert spec(SHOP, "grpo-t0.5")[1].endswith(f"--policy dmr --router {grpo} --threshold 0.5 --router-steps search click")
    assert spec(SHOP, "dmr-t0.5")[1].endswith("--threshold 0.5 --router-steps click")
    assert spec(ALF, "full") == (["results/alf/data.json"], "--model bf16=/nonexistent/Big --policy full")
    probe = make(lambda c: c["route"].update(kl_block="output", pace=None))
    assert probe.rollout_spec({**HOUSE, "policy": "dmr-k0.2", "run": "probe"})[1].endswith(
        "--budget 0.2 --probe-kl --kl-block output")


def test_router_steps(flags):
    assert (flags.routed_steps(HOUSE), flags.routed_steps(SHOP), flags.routed_steps(SHOP, "grpo")) == (
        "action", "click", "search click")
    assert flags.router_steps_flag(SHOP, "grpo", flags.routed_steps(SHOP)) == " --router-steps search click"
    assert flags.router_steps_flag(HOUSE, "grpo", flags.routed_steps(HOUSE)) == ""


def test_tables_and_targets(flags):
    methods = flags.table_methods(HOUSE)
    assert list(methods) == ["Full", "rtn_w2a16/Quant", "rtn_w2a16/DMR@0.2", "rtn_w2a16/DMR@0.4", "rtn_w2a16/GRPO@0.2",
                             "rtn_w2a16/GRPO@0.4", "rtn_w2a16/Random@0.4", "rtn_w2a16/Oracle@0.4", "gptq_w4a16/Quant"]
    assert methods["rtn_w2a16/Oracle@0.4"] == [f"{H}/rtn_w2a16/rollouts/oracle-k0.4/seed{s}/episodes.parquet" for s in (0, 2)]
    assert list(flags.table_methods(SHOP)) == ["Full", "gptq_w4a16/Quant"]
    regime = flags.regime_inputs(HOUSE)
    assert list(regime) == ["full", "rtn_w2a16", "gptq_w4a16"]
    assert regime["rtn_w2a16"][:2] == [f"{H}/rtn_w2a16/kl/steps.parquet", f"{H}/rtn_w2a16/kl/threshold.json"]
    assert len(regime["rtn_w2a16"]) == 6 and len(regime["gptq_w4a16"]) == 4  # the oracle only where routed
    targets = flags.cell_targets()
    assert [t for t in targets if t.startswith("results/shop/")] == [
        "results/shop/tiny/tables/main.md", "results/shop/tiny/tables/latency.md"]
    assert f"{H}/figures/grpo_curve_rtn_w2a16_lam0.5.png" in targets and f"{H}/tables/rank.md" in targets
    assert f"{H}/tables/diagnose_rtn_w2a16.md" in targets and f"{H}/tables/diagnose_gptq_w4a16.md" not in targets


def test_forced_row_where_routers_decide_only_some_steps(flags):
    """A routed shop scheme (routers decide clicks, searches are forced to bf16) gets a Forced row:
    random:0 under the same router steps, every click at the scheme and every search at bf16. The
    household's routers decide every step, so its Forced would be its Quant: no row."""
    shop = make(lambda c: c["cells"][1].update(route=["gptq_w4a16"]))
    methods = shop.table_methods(SHOP)
    assert methods["gptq_w4a16/Forced"] == [f"results/shop/tiny/gptq_w4a16/rollouts/forced/seed{s}/episodes.parquet"
                                            for s in (0, 2)]
    inputs, spec = shop.rollout_spec({**SHOP, "policy": "forced", "run": "seed0"})
    assert args_of(spec)["policy"] == "random:0" and args_of(spec)["router-steps"] == "click"
    assert args_of(spec)["model"] == "gptq_w4a16=results/shop/tiny/gptq_w4a16/model" and len(inputs) >= 2
    assert "bf16=results/shop/tiny/bf16/model" in spec
    assert not any(m.endswith("/Forced") for m in flags.table_methods(HOUSE))


def test_latency(flags):
    inputs, args = flags.latency(HOUSE)
    assert len(inputs) == 3 * 2 * 2  # Full and two Quants, two seeds, steps and episodes
    a = args_of(args)
    assert a["high"] == f"{H}/bf16/rollouts/full/seed0 {H}/bf16/rollouts/full/seed2"
    assert args.count("--low ") == 2 and "--no-w3-projection" not in a
    assert json.loads(a["coefficients"]) == {"bf16": 1.0, "router": 0.5}
    assert (a["source"], a["replay"], a["router-steps"], a["shards"]) == ("measured", "16", "action", "16")
    assert "encoder_quant" not in json.loads(a["arch"])  # `none` is left out, as before the option existed
    with pytest.raises(ValueError, match="none for 'alf/big'"):
        flags.latency(ALF)


def test_klst_args_per_ablation_variant(flags):
    own = json.loads(args_of(flags.klst_args(HOUSE))["arch"])
    assert own == {"layers": 2, "d_model": 32, "heads": 4, "window": 50, "encoder": "text"}
    assert json.loads(args_of(flags.klst_args(ALF))["arch"])["d_model"] == 64  # the model's width
    assert args_of(flags.klst_args(HOUSE)) == {"step-types": "action", "arch": json.dumps(own), "epochs": "2"}

    def variant(v):
        return args_of(flags.klst_args({**HOUSE, "variant": v}))
    assert json.loads(variant("depth4")["arch"]) == {**own, "layers": 4} and variant("depth4")["epochs"] == "1"
    assert variant("tau-dense")["tau-point"] == "dense"
    assert variant("steps-as")["step-types"] == "all" and variant("steps-as")["label-set"] == "as"
    assert variant("steps-as")["labels-summary"] == f"{H}/rtn_w2a16/kl/labels.json"
    assert json.loads(variant("encoder-proposal")["arch"]) == {**own, "encoder": "proposal", "window": 1}
    # ablation.train differs from route.train: the cell's own setting is retrained as `base`.
    assert flags.ablation_router(HOUSE, "depth2") == f"{H}/rtn_w2a16/ablation/base/router"
    assert flags.ablation_router(HOUSE, "depth4") == f"{H}/rtn_w2a16/ablation/depth4/router"
    same = make(lambda c: c["route"]["ablation"].pop("train"))
    assert same.ablation_router(HOUSE, "depth2") == same.ablation_router(HOUSE, "tau-auto") == f"{H}/rtn_w2a16/router"


def test_ablation_online_runs(flags):
    """Per budget the cell's DMR@K runs, then each variant's on the same seeds beside its router; a variant
    that is the cell's router (here `base`, retrained on ablation.train) plays its router's runs."""
    inputs, args = flags.ablation_online(HOUSE)
    q = f"{H}/rtn_w2a16"
    assert args_of(flags.ablation_online(HOUSE)[1].split(" --online ")[0]) == {
        "reference": f"0.2 {q}/rollouts/dmr-k0.2/seed0 {q}/rollouts/dmr-k0.2/seed2"}
    assert f"--online depth2 0.4 {q}/ablation/base/rollouts/dmr-k0.4/seed0 {q}/ablation/base/rollouts/dmr-k0.4/seed2" in args
    assert f"--online steps-as 0.2 {q}/ablation/steps-as/rollouts/dmr-k0.2/seed0" in args
    # 2 budgets x 2 seeds x (the cell's DMR + base, depth4, tau-dense, steps-as; depth2 and steps-ao are base)
    assert len(inputs) == len(set(inputs)) == 2 * 2 * 5 and f"{q}/rollouts/dmr-k0.4/seed2/episodes.parquet" in inputs
    # A variant's runs: its own router, calibrated as the cell's; the calibration run at threshold 0.5.
    w = {**HOUSE, "variant": "depth4", "policy": "dmr-k0.4", "run": "seed2"}
    ins, spec = flags.rollout_spec(w)
    assert f"{q}/ablation/depth4/router/calibration.json" in ins
    assert args_of(spec)["router"] == f"{q}/ablation/depth4/router" and args_of(spec)["budget"] == "0.4"
    assert flags.rollout_spec({**w, "run": "seed0"})[1] == spec  # the seed is the rule's --seed, not the policy's
    assert args_of(flags.rollout_spec({**w, "policy": "dmr-t0.5", "run": "calib"})[1])["threshold"] == "0.5"
    assert flags.routed_run(w, "dmr", "t", 0.5, pattern=ABLATION_RUN, run="calib") == (
        f"{q}/ablation/depth4/rollouts/dmr-t0.5/calib/steps.parquet")
    with pytest.raises(ValueError, match="a variant plays its KL-ST router"):
        flags.rollout_spec({**w, "policy": "random-k0.4"})
    # online.seeds: the first N evaluation seeds, 0 none; online.budgets: a subset of route.budgets.
    one = make(lambda c: c["route"]["ablation"].update(online={"seeds": 1, "budgets": [0.4]}))
    assert one.ablation_online(HOUSE)[1].split(" --online ")[0] == f"--reference 0.4 {q}/rollouts/dmr-k0.4/seed0"
    assert make(lambda c: c["route"]["ablation"].update(online={"seeds": 0})).ablation_online(HOUSE) == ([], "")


def test_a_ladder_scheme_routes_three_precisions_at_cost_budgets():
    """Three precisions in one cell (issue: a router over bf16, W4 and W2): a routed `A+B` has DMR, GRPO
    and random matched to its per-precision shares at each cost budget, beside the two-precision
    routers bf16-A and bf16-B calibrated to the same cost budgets (dmr-cK); its KL pools and τ are its
    low precisions'; a two-precision scheme keeps its commands."""
    lad = make(lambda c: (c["cells"][0].update(route=["rtn_w2a16", "gptq_w4a16+rtn_w2a16"]),
                          c["route"].update(cost_budgets=[0.8, 0.9])))
    X = {**HOUSE, "quant": "gptq_w4a16+rtn_w2a16"}
    assert lows("gptq_w4a16+rtn_w2a16") == ["gptq_w4a16", "rtn_w2a16"] and ladder(X["quant"])
    assert not ladder("rtn_w2a16") and lows("rtn_w2a16") == ["rtn_w2a16"]
    x, rd = f"{H}/gptq_w4a16+rtn_w2a16", f"{H}/gptq_w4a16+rtn_w2a16/router"
    three = f"--model bf16={H}/bf16/model --model gptq_w4a16={H}/gptq_w4a16/model --model rtn_w2a16={H}/rtn_w2a16/model"
    inputs, args = lad.rollout_spec({**X, "policy": "dmr-k0.8", "run": "seed0"})
    # a cost budget is not paced: the pace holds a share of bf16 steps
    assert args == f"{three} --policy dmr --router {rd} --calibration {rd}/calibration.json --budget 0.8"
    assert inputs[:3] == [f"{H}/bf16/model", f"{H}/gptq_w4a16/model", f"{H}/rtn_w2a16/model"]
    assert lad.rollout_spec({**X, "policy": "random-k0.8", "run": "seed2"})[1] == (
        f"{three} --policy random --match {x}/rollouts/dmr-k0.8/seed2/episodes.parquet")
    w4 = f"{H}/gptq_w4a16/router"
    assert lad.rollout_spec({**HOUSE, "quant": "gptq_w4a16", "policy": "dmr-c0.9", "run": "seed0"}) == (
        [f"{H}/bf16/model", f"{H}/gptq_w4a16/model", f"{w4}/router.json", f"{w4}/calibration_cost.json"],
        f"--model bf16={H}/bf16/model --model gptq_w4a16={H}/gptq_w4a16/model --policy dmr --router {w4} "
        f"--calibration {w4}/calibration_cost.json --budget 0.9")
    for policy in ("quant", "oracle-k0.8"):
        with pytest.raises(ValueError, match="DMR, GRPO and random"):
            lad.rollout_spec({**X, "policy": policy, "run": "seed0"})
    assert (lad.scheme_budgets(X), lad.scheme_budgets(HOUSE)) == ("0.8 0.9", "0.2 0.4")
    assert lad.cost_coefficients(X) == [f"{H}/latency/coefficients.json"] and lad.cost_coefficients(HOUSE) == []
    methods = list(lad.table_methods(HOUSE))
    assert methods[:9] == list(make().table_methods(HOUSE))  # the two-precision rows as they were
    assert methods[9:] == [f"gptq_w4a16+rtn_w2a16/{m}" for m in (
        "DMR@0.8", "DMR@0.9", "GRPO@0.8", "GRPO@0.9", "Random@0.8", "Random@0.9",
        "DMR-gptq_w4a16@0.8", "DMR-gptq_w4a16@0.9", "DMR-rtn_w2a16@0.8", "DMR-rtn_w2a16@0.9")]
    assert lad.table_methods(HOUSE)["gptq_w4a16+rtn_w2a16/DMR-gptq_w4a16@0.9"][0] == (
        f"{H}/gptq_w4a16/rollouts/dmr-c0.9/seed0/episodes.parquet")
    targets = lad.cell_targets()
    assert f"{H}/figures/router_scores_gptq_w4a16+rtn_w2a16.png" in targets
    assert f"{H}/figures/grpo_curve_gptq_w4a16+rtn_w2a16_lam0.5.png" in targets
    assert not [t for t in targets if "+" in t and ("kl_hist" in t or "diagnose" in t or "/kl/" in t)]
    assert [t for t in targets if "+" not in t] == make().cell_targets()


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["cells"].append({"benchmark": "web", "model": "tiny"}), "cells: unknown benchmark 'web'"),
    (lambda c: c["cells"][1].update(route=["awq_w4a16"]), r"shop/tiny routes \['awq_w4a16'\], which are not in its quants"),
    (lambda c: c["cells"][0].update(route=["gptq_w4a16+awq_w4a16"]), r"household/tiny routes \['awq_w4a16'\], which are not"),
    (lambda c: c["cells"][0].update(route=["gptq_w4a16+gptq_w4a16"]), "each low precision once"),
    (lambda c: c["models"]["tiny"]["select"].update(at=[0.8, 0.804]), "snapshots are named by two decimals"),
    (lambda c: c["models"]["tiny"]["select"].update(at=[0.999]), "snapshots are named by two decimals"),
    (lambda c: c["grpo"].update({"lambda": 0.2}), "grpo.lambda 0.2 is not in grpo.lambdas"),
    (lambda c: (c["route"]["router"].update(encoder="proposal"), c["backend"].update(name="vllm")),
     "it needs backend.name 'hf', not 'vllm'"),
    (lambda c: c["route"].update(baseline_budgets=[0.7]), r"baseline_budgets \[0.7\] are not in route.budgets"),
    (lambda c: c["models"]["big"]["router"].update(heads=5), "model 'big'.*d_model 64 is not a multiple of heads 5"),
    (lambda c: c["route"]["ablation"].update(online={"seeds": 3}), "online.seeds 3: more than the 2 evaluation seeds"),
    (lambda c: c["route"]["ablation"].update(online={"budgets": [0.4, 0.7]}),
     r"online.budgets \[0.7\] are not in route.budgets"),
])
def test_check_names_what_the_schema_cannot_say(edit, message):
    with pytest.raises(ValueError, match=message):
        make(edit)
