import json
import os
import re
import shlex

from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

# Jobs run `python -m dmr.<stage>` from this checkout, with or without an installed package,
# locally and on cluster nodes alike.
shell.prefix(f'export PYTHONPATH="{workflow.basedir}:$PYTHONPATH"; ')

RESULTS = "results"
THREADS = config.get("threads", 2)


def _check_cells():
    for cell in config["cells"]:
        if cell["benchmark"] not in config["benchmarks"]:
            raise ValueError(f"cells: unknown benchmark {cell['benchmark']!r}; defined: {sorted(config['benchmarks'])}")
        if cell["model"] not in config["models"]:
            raise ValueError(f"cells: unknown model {cell['model']!r}; defined: {sorted(config['models'])}")
        model = config["models"][cell["model"]]
        if len(set(cell.get("quants", []))) != len(cell.get("quants", [])):
            raise ValueError(f"cells: {cell['benchmark']}/{cell['model']} lists a quant scheme twice")
        if model["source"] == "path" and not model.get("path"):
            raise ValueError(f"models.{cell['model']}: source 'path' needs a 'path'")
        extra = set(cell.get("route", [])) - set(cell.get("quants", []))
        if extra:
            raise ValueError(f"cells: {cell['benchmark']}/{cell['model']} routes {sorted(extra)}, which are not in its quants")
    route = config.get("route", {})
    missing = set(route.get("baseline_budgets", [])) - set(route.get("budgets", []))
    if missing:
        raise ValueError(f"route.baseline_budgets {sorted(missing)} are not in route.budgets: baselines match a DMR run")


_check_cells()

wildcard_constraints:
    benchmark="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_.-]+",
    quant="[A-Za-z0-9_]+",
    policy="[A-Za-z0-9_.:-]+",
    seed=r"\d+",
    run=r"seed\d+|train|calib",


def bench(wildcards):
    return config["benchmarks"][wildcards.benchmark]


# Environments whose game files come from a download: their jobs depend on the `data` rule.
DATA_ENVS = {"alfworld"}


def env_kwargs(wildcards):
    """The benchmark's env_kwargs; a relative data path is relative to the repository, so a run in
    another working directory (snakemake --directory) finds the same files."""
    kwargs = dict(bench(wildcards).get("env_kwargs") or {})
    data = kwargs.get("data")
    if data and not os.path.isabs(os.path.expanduser(data)):
        kwargs["data"] = os.path.normpath(os.path.join(workflow.basedir, data))
    return kwargs


def data_input(wildcards):
    """The benchmark's data manifest, for environments that read downloaded game files."""
    return [f"{RESULTS}/{wildcards.benchmark}/data.json"] if bench(wildcards)["env"] in DATA_ENVS else []


def data_need(wildcards):
    """--need of the data check: the tasks of each protocol split this config plays."""
    b = bench(wildcards)
    need = {"calib": b["tasks"]["calib"], "test": b["tasks"]["test"]}
    if any(cell_routes(wildcards.benchmark, c["model"]) for c in config["cells"] if c["benchmark"] == wildcards.benchmark):
        need["train"] = route_cfg().get("kl_tasks", 1000)
    if b.get("tasks_per_seed", "distinct") == "distinct":
        need["test"] *= max(config["evaluate"]["seeds"]) + 1
    return " ".join(f"{k}={v}" for k, v in need.items())


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def as_json(obj):
    """A config mapping as one shell-quoted JSON argument."""
    return shlex.quote(json.dumps(obj or {}))


def model_dir(benchmark, model, quant="bf16"):
    """HF checkpoint of a cell at one precision: trained here, or a local path from the config."""
    cfg = config["models"][model]
    if quant == "bf16" and cfg["source"] == "path":
        return cfg["path"]
    return f"{RESULTS}/{benchmark}/{model}/{quant}/model"


def bf16_input(wildcards):
    """The bf16 checkpoint as a rule input, when it is one we build (not a local path)."""
    return built_models(wildcards, ["bf16"])


def route_cfg():
    return config.get("route", {})


# A rollout directory is {quant}/rollouts/{policy}/{run}: run `seedN` evaluates test tasks, `train`
# is the bf16 KL pool of the training split, `calib` the router's calibration pool.
def run_split(wildcards):
    return {"train": "train", "calib": "calib"}.get(wildcards.run, "test")


def run_seed(wildcards):
    return int(wildcards.run[4:]) if wildcards.run.startswith("seed") else 0


def run_n(wildcards):
    if wildcards.run == "train":
        return route_cfg().get("kl_tasks", 1000)
    return bench(wildcards)["tasks"]["calib" if wildcards.run == "calib" else "test"]


def run_offset(wildcards):
    """Seed s of a generated pool evaluates its own test tasks [s*n, (s+1)*n)."""
    if run_split(wildcards) != "test" or bench(wildcards).get("tasks_per_seed", "distinct") != "distinct":
        return 0
    return run_seed(wildcards) * bench(wildcards)["tasks"]["test"]


def decoding_args(wildcards):
    d = bench(wildcards)["decoding"]
    args = [f"--max-new-tokens {d.get('max_new_tokens', 32)}", f"--temperature {d.get('temperature', 0.0)}",
            f"--top-p {d.get('top_p', 1.0)}", f"--prompt {as_json(bench(wildcards)['prompt'])}"]
    if d.get("constrained", False):
        args.append("--constrained")
    return " ".join(args)


def run_dir(benchmark, model, quant, policy, run):
    return f"{RESULTS}/{benchmark}/{model}/{quant}/rollouts/{policy}/{run}"


def cell_quants(benchmark, model):
    for c in config["cells"]:
        if c["benchmark"] == benchmark and c["model"] == model:
            return c.get("quants", [])
    return []


def rollout_precisions(wildcards):
    """The precisions a rollout's policy can route to, high first."""
    return {"full": ["bf16"], "quant": [wildcards.quant]}.get(wildcards.policy, ["bf16", wildcards.quant])


def rollout_models(wildcards):
    return " ".join(f"--model {q}={model_dir(wildcards.benchmark, wildcards.model, q)}"
                    for q in rollout_precisions(wildcards))


# Routed policies in paths: dmr-tT (learned router at a fixed threshold T), dmr-kK (at the threshold
# calibrated for budget K), random-kK and oracle-kK (matched to the realised fraction of dmr-kK).
POLICY = re.compile(r"(dmr|random|oracle)-([kt])([0-9.]+)")


def cell_dir(w):
    return f"{RESULTS}/{w.benchmark}/{w.model}"


def router_dir(w):
    return f"{cell_dir(w)}/{w.quant}/router"


def kl_steps(w):
    return f"{cell_dir(w)}/{w.quant}/kl/steps.parquet"


def policy_inputs(wildcards):
    """Files a routed policy needs besides the models."""
    m = POLICY.fullmatch(wildcards.policy)
    if not m:
        return []
    kind, mode, value = m.groups()
    if kind == "dmr":
        return [f"{router_dir(wildcards)}/router.json"] + (
            [f"{router_dir(wildcards)}/calibration.json"] if mode == "k" else [])
    match = f"{run_dir(wildcards.benchmark, wildcards.model, wildcards.quant, f'dmr-k{value}', wildcards.run)}/episodes.parquet"
    return [match] + ([kl_steps(wildcards)] if kind == "oracle" else [])


def policy_args(wildcards):
    m = POLICY.fullmatch(wildcards.policy)
    if not m:
        return f"--policy {wildcards.policy}"
    kind, mode, value = m.groups()
    if kind == "dmr":
        rd = router_dir(wildcards)
        if mode == "t":
            return f"--policy dmr --router {rd} --threshold {value}"
        return f"--policy dmr --router {rd} --calibration {rd}/calibration.json --budget {value}"
    if mode != "k":
        raise ValueError(f"policy {wildcards.policy}: baselines are matched to a budget, write {kind}-k{value}")
    match, *rest = policy_inputs(wildcards)
    return f"--policy {kind} --match {match}" + (f" --kl {rest[0]}" if rest else "")


def built_models(wildcards, precisions):
    """The checkpoints of `precisions` that this workflow builds (local paths are not rule outputs)."""
    paths = [model_dir(wildcards.benchmark, wildcards.model, q) for q in precisions]
    return [p for p in paths if p.startswith(f"{RESULTS}/")]


def rollout_inputs(wildcards):
    return built_models(wildcards, rollout_precisions(wildcards)) + policy_inputs(wildcards) + data_input(wildcards)


def kl_models(wildcards):
    return built_models(wildcards, ["bf16", wildcards.quant])


def seed_runs(benchmark, model, quant, policy):
    return [f"{run_dir(benchmark, model, quant, policy, f'seed{s}')}/episodes.parquet" for s in config["evaluate"]["seeds"]]


def cell_routes(benchmark, model):
    for c in config["cells"]:
        if c["benchmark"] == benchmark and c["model"] == model:
            return c.get("route", c.get("quants", []))
    return []


def table_methods(wildcards):
    """Methods of a cell's main table: Full; per scheme the always-quantized baseline, then for the
    routed schemes DMR at each budget and the matched baselines (`NAME@K`)."""
    b, m = wildcards.benchmark, wildcards.model
    methods = {"Full": seed_runs(b, m, "bf16", "full")}
    route = route_cfg()
    routed = cell_routes(b, m)
    for q in cell_quants(b, m):
        methods[f"{q}/Quant"] = seed_runs(b, m, q, "quant")
        if q not in routed:
            continue
        for k in route.get("budgets", []):
            methods[f"{q}/DMR@{k:g}"] = seed_runs(b, m, q, f"dmr-k{k:g}")
        for base in route.get("baselines", []):
            for k in route.get("baseline_budgets", []):
                methods[f"{q}/{base.capitalize()}@{k:g}"] = seed_runs(b, m, q, f"{base}-k{k:g}")
    return methods


def table_inputs(wildcards):
    return [p for paths in table_methods(wildcards).values() for p in paths]


def table_args(wildcards):
    return " ".join(f"--method {name} {' '.join(paths)}" for name, paths in table_methods(wildcards).items())


def calibration_input(wildcards):
    source = model_cfg(wildcards).get("quantize", {}).get("calibration", {}).get("source", "expert")
    return rules.expert_data.output[0].format(**wildcards) if source == "expert" else source


def calibration_arg(wildcards):
    source = model_cfg(wildcards).get("quantize", {}).get("calibration", {}).get("source", "expert")
    path = calibration_input(wildcards)
    return f"expert:{path}" if source == "expert" else path


def route_targets(benchmark, model):
    """The KL-ST figures and the AO/AS label tables of a cell's routed schemes (the table pulls in
    everything else)."""
    return [f"{RESULTS}/{benchmark}/{model}/figures/{name}_{q}.png"
            for q in cell_routes(benchmark, model) for name in ("kl_hist", "router_scores")] + [
            f"{RESULTS}/{benchmark}/{model}/{q}/kl/labels.parquet" for q in cell_routes(benchmark, model)]


def all_targets():
    return [t for c in config["cells"] for t in
            [f"{RESULTS}/{c['benchmark']}/{c['model']}/tables/main.md"] + route_targets(c["benchmark"], c["model"])]
