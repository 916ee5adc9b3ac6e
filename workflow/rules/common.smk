import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from dmr.policy_name import format_policy, parse_policy

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
            raise ValueError(
                f"cells: {cell['benchmark']}/{cell['model']} routes {sorted(extra)}, which are not in its quants"
            )
    for name, model in config["models"].items():
        at = model.get("select", {}).get("at", [])
        names = [f"p{f:.2f}" for f in at]
        if len(set(names)) != len(names) or "p1.00" in names:
            raise ValueError(
                f"models.{name}.select.at {at}: snapshots are named by two decimals (p0.60), "
                "so the fractions must differ there and stay below 0.995"
            )
    grpo = config.get("grpo")
    if grpo and grpo["lambda"] not in grpo["lambdas"]:
        raise ValueError(f"grpo.lambda {grpo['lambda']} is not in grpo.lambdas {grpo['lambdas']}")
    route = config.get("route", {})
    if route.get("router", {}).get("encoder") == "proposal" and config["backend"]["name"] != "hf":
        raise ValueError(
            f"route.router.encoder 'proposal' reads the low model's hidden states in-process: it needs backend.name "
            f"'hf', not {config['backend']['name']!r} (set route.router.encoder: text, the paper's router)"
        )
    missing = set(route.get("baseline_budgets", [])) - set(route.get("budgets", []))
    if missing:
        raise ValueError(
            f"route.baseline_budgets {sorted(missing)} are not in route.budgets: baselines match a DMR run"
        )


_check_cells()


def local_path(path):
    """A checkpoint path of the config: as given when it exists from the working directory (or is
    absolute), else from this checkout, where the shipped agents/ live."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    shipped = os.path.join(workflow.basedir, path)
    return shipped if os.path.exists(shipped) else path


def external_paths():
    """Local files the config points at (checkpoints, calibration text) for the models its cells
    use: not rule outputs, so a dry-run plans without them; a real run checks them before any job
    starts."""
    paths = {}
    used = {c["model"] for c in config["cells"]}
    for name, m in config["models"].items():
        if name not in used:
            continue
        if m["source"] == "path":
            paths[f"models.{name}.path"] = local_path(m["path"])
        source = m.get("quantize", {}).get("calibration", {}).get("source", "expert")
        if source != "expert":
            paths[f"models.{name}.quantize.calibration.source"] = source
    return paths


def check_external_paths():
    """Called on start of a real run (not -n, --lint or --touch): a missing checkpoint fails here,
    naming its config key, instead of in a job hours later."""
    missing = {k: p for k, p in external_paths().items() if not os.path.exists(p)}
    if missing and not workflow.touch:
        raise WorkflowError(
            "missing local files named in the config: " + "; ".join(f"{k} = {p!r}" for k, p in missing.items())
        )


def start_progress():
    """Called on start of a real run: a reporter (dmr.progress) that prints every rollout in flight
    and its episodes done, every `progress_every` seconds, and ends with this Snakemake process."""
    every = config.get("progress_every", 60)
    if not every or workflow.touch:
        return
    env = {**os.environ, "PYTHONPATH": f"{workflow.basedir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.Popen(
        [sys.executable, "-m", "dmr.progress", "--results", RESULTS, "--every", str(every), "--pid", str(os.getpid())],
        env=env,
        stdout=sys.stderr,
        stderr=sys.stderr,
    )


# Job resources: Slurm requests, and local limits where `--resources` caps them (gpu). The defaults
# fit the embedded CPU run; the config's `resources:` overrides them (`default`: every rule; a rule's
# name: that rule), which is how the paper profile gives rollout, kl and quantize a GPU. Minutes, MB.
RESOURCES = {
    "default": {"gpu": 0, "mem_mb": 2000, "runtime": 30},
    "train_agent": {"mem_mb": 4000, "runtime": 60},
    "quantize": {"mem_mb": 8000, "runtime": 60},
    "rollout": {"mem_mb": 8000, "runtime": 120},
    "select_rollout": {"mem_mb": 8000, "runtime": 120},
    "kl": {"mem_mb": 8000, "runtime": 60},
    "klst": {"mem_mb": 8000, "runtime": 60},
    "klst_variant": {"mem_mb": 8000, "runtime": 60},
    "grpo": {"mem_mb": 8000, "runtime": 240},
    "latency": {"mem_mb": 4000, "runtime": 30},
}


def rule_resources(rule, threads=1):
    cfg = config.get("resources", {})
    return {
        "cpus_per_task": threads,
        **RESOURCES["default"],
        **RESOURCES.get(rule, {}),
        **cfg.get("default", {}),
        **cfg.get(rule, {}),
    }


def _check_resources():
    unknown = set(config.get("resources", {})) - {"default"} - {r.name for r in workflow.rules}
    if unknown:
        raise ValueError(
            f"resources: {sorted(unknown)} are not rules of this workflow; "
            f"its rules are {sorted(r.name for r in workflow.rules)}"
        )


wildcard_constraints:
    benchmark="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_.-]+",
    quant="[A-Za-z0-9_]+",
    candidate="p[0-9][.][0-9]+",
    policy="[A-Za-z0-9_.:-]+",
    seed=r"\d+",
    run=r"seed\d+|train|calib|probe|dagger",
    stage=r"router0?",
    variant=r"base|depth\d+|tau-[a-z-]+|steps-(ao|as)|encoder-(text|proposal)",
    lam=r"[0-9.]+",


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
    if any(
        cell_routes(wildcards.benchmark, c["model"]) for c in config["cells"] if c["benchmark"] == wildcards.benchmark
    ):
        need["train"] = route_cfg().get("kl_tasks", 1000)
    if b.get("tasks_per_seed", "distinct") == "distinct":
        need["test"] *= max(config["evaluate"]["seeds"]) + 1
    return " ".join(f"{k}={v}" for k, v in need.items())


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def cli_flags(mapping):
    """Config keys as entry-point flags: {"max_minutes": 4} -> "--max-minutes 4"."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (mapping or {}).items())


def as_json(obj):
    """A config mapping as one shell-quoted JSON argument."""
    return shlex.quote(json.dumps(obj or {}))


def model_dir(benchmark, model, quant="bf16"):
    """HF checkpoint of a cell at one precision: trained here, or a local path from the config."""
    cfg = config["models"][model]
    if quant == "bf16" and cfg["source"] == "path":
        return local_path(cfg["path"])
    return f"{RESULTS}/{benchmark}/{model}/{quant}/model"


def candidates(wildcards):
    """The trained agent's candidates for selection (dmr.select): snapshots, then the final p1.00."""
    sel = model_cfg(wildcards).get("select")
    return [f"p{f:.2f}" for f in sorted(sel["at"])] + ["p1.00"] if sel else ["p1.00"]


def snapshot_args(wildcards):
    """Snapshot flags of dmr.tiny_agent; none without selection, so those commands stay as they were."""
    sel = model_cfg(wildcards).get("select")
    if not sel:
        return ""
    out = f"{RESULTS}/{wildcards.benchmark}/{wildcards.model}/train"
    return f" --snapshot-at {','.join(str(f) for f in sorted(sel['at']))} --snapshots {out}"


def select_runs(wildcards):
    """Calibration runs of the candidates; one candidate needs none."""
    c = candidates(wildcards)
    return (
        [f"{RESULTS}/{wildcards.benchmark}/{wildcards.model}/select/{n}/episodes.parquet" for n in c]
        if len(c) > 1
        else []
    )


def agent_cards(wildcards):
    """Cards of the agents this config trains (`make agents`); none where every model is a path."""
    cards = [
        f"{RESULTS}/{c['benchmark']}/{c['model']}/card"
        for c in config["cells"]
        if config["models"][c["model"]]["source"] == "train"
    ]
    if not cards:
        raise WorkflowError(
            "no agent to build: every model in this config is a local path; `make agents` "
            "adds config/agents.yaml, which trains them"
        )
    return list(dict.fromkeys(cards))


def bf16_input(wildcards):
    """The bf16 checkpoint as a rule input, when it is one we build (not a local path)."""
    return built_models(wildcards, ["bf16"])


def route_cfg():
    return config.get("route", {})


# A rollout directory is {quant}/rollouts/{policy}/{run}: run `seedN` evaluates test tasks, `train`
# is the bf16 KL pool of the training split, `calib` the router's calibration pool, `probe` seed 0's
# test tasks routed by DMR with each step's true KL measured (dmr.diagnose, online).
def probe_budget():
    """The budget of the online probe run (dmr.diagnose): the middle one, 0.4 in the paper's sweep."""
    budgets = route_cfg().get("budgets", [0.4])
    return budgets[len(budgets) // 2]


def probe_run(w):
    return f"{run_dir(w.benchmark, w.model, w.quant, format_policy('dmr', 'k', probe_budget()), 'probe')}/steps.parquet"


def run_split(wildcards):
    return {"train": "train", "calib": "calib", "dagger": "train"}.get(wildcards.run, "test")


def run_seed(wildcards):
    return int(wildcards.run[4:]) if wildcards.run.startswith("seed") else 0


def run_n(wildcards):
    if wildcards.run == "train":
        return route_cfg().get("kl_tasks", 1000)
    if wildcards.run == "dagger":
        return dagger_cfg()["tasks"]
    return bench(wildcards)["tasks"]["calib" if wildcards.run == "calib" else "test"]


def run_offset(wildcards):
    """Seed s of a generated pool evaluates its own test tasks [s*n, (s+1)*n); the DAgger run routes
    the training tasks after the KL pool's."""
    if wildcards.run == "dagger":
        return route_cfg().get("kl_tasks", 1000)
    if run_split(wildcards) != "test" or bench(wildcards).get("tasks_per_seed", "distinct") != "distinct":
        return 0
    return run_seed(wildcards) * bench(wildcards)["tasks"]["test"]


def routed_steps(wildcards, kind="dmr"):
    """Step types a router decides; the others run at bf16 (paper App. C.1). The GRPO router's
    (`grpo_router_steps`) default to the KL-ST router's (`router_steps`)."""
    steps = bench(wildcards).get("router_steps", ["action"])
    return bench(wildcards).get("grpo_router_steps", steps) if kind == "grpo" else steps


def router_steps_arg(wildcards, kind="dmr"):
    """--router-steps of a routed policy. Omitted for the default [action], where the learned
    router already decides every action step, so existing runs keep their commands."""
    steps = routed_steps(wildcards, kind)
    return "" if steps == ["action"] else " --router-steps " + " ".join(steps)


def decoding_args(wildcards):
    d = bench(wildcards)["decoding"]
    args = [
        f"--max-new-tokens {d.get('max_new_tokens', 32)}",
        f"--temperature {d.get('temperature', 0.0)}",
        f"--top-p {d.get('top_p', 1.0)}",
        f"--prompt {as_json(bench(wildcards)['prompt'])}",
    ]
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
    return " ".join(
        f"--model {q}={model_dir(wildcards.benchmark, wildcards.model, q)}" for q in rollout_precisions(wildcards)
    )


def cell_dir(w):
    return f"{RESULTS}/{w.benchmark}/{w.model}"


def router_dir(w, kind="dmr"):
    if kind == "grpo":
        return grpo_router_dir(w)
    return f"{cell_dir(w)}/{w.quant}/{'router0' if kind == 'dmr0' else 'router'}"


def pace_arg(budget):
    """route.pace: each episode's bf16 steps held to the budget K (dmr.router.Router.pace) with
    `burst` steps ahead of it; the calibrated threshold is then capped at the router's boundary."""
    pace = route_cfg().get("pace")
    return f" --pace {budget} --burst {pace['burst']:g}" if pace else ""


def dagger_cfg():
    """route.dagger: {tasks, budget} (the schema's defaults); tasks 0 trains on the bf16 pool alone."""
    return route_cfg()["dagger"]


def dagger_runs(w):
    """The final router's extra data: the round-0 router's routed probe run of training tasks."""
    d = dagger_cfg()
    if w.stage != "router" or not d["tasks"]:
        return []
    policy = format_policy("dmr0", "k", d["budget"])
    return [f"{run_dir(w.benchmark, w.model, w.quant, policy, 'dagger')}/steps.parquet"]


def calib_policy(w):
    """The calibration pool's routed run of a KL-ST stage: its router at the fixed threshold 0.5."""
    return format_policy("dmr0" if w.stage == "router0" else "dmr", "t", 0.5)


def dagger_arg(w, input):
    runs = [os.path.dirname(p) for p in input.dagger]
    return f" --dagger {' '.join(runs)}" if runs else ""


def kl_steps(w):
    return f"{cell_dir(w)}/{w.quant}/kl/steps.parquet"


def policy_inputs(wildcards):
    """Files a routed policy needs besides the models."""
    kind, mode, value = parse_policy(wildcards.policy)
    if not mode:
        return []
    if kind in ("dmr", "dmr0", "grpo"):
        rd = router_dir(wildcards, kind)
        return [f"{rd}/router.json"] + ([f"{rd}/calibration.json"] if mode == "k" else [])
    match = f"{run_dir(wildcards.benchmark, wildcards.model, wildcards.quant, format_policy('dmr', 'k', value), wildcards.run)}/episodes.parquet"
    return [match] + ([kl_steps(wildcards)] if kind in ("oracle", "uncertainty") else [])


def policy_args(wildcards):
    kind, mode, value = parse_policy(wildcards.policy)
    if not mode:
        return f"--policy {wildcards.policy}"
    steps = router_steps_arg(wildcards, "grpo" if kind == "grpo" else "dmr")
    if kind in ("dmr", "dmr0", "grpo"):
        rd = router_dir(wildcards, kind)
        if mode == "t":
            return f"--policy dmr --router {rd} --threshold {value}{steps}"
        # The probe run: seed 0's test tasks again, with each step's true KL measured (dmr.diagnose);
        # the DAgger run measures it on training tasks (the final router's extra labels).
        probe = " --probe-kl" if wildcards.run in ("probe", "dagger") else ""
        return f"--policy dmr --router {rd} --calibration {rd}/calibration.json --budget {value}{pace_arg(value)}{steps}{probe}"
    match, *rest = policy_inputs(wildcards)
    kl_arg = f" --kl {rest[0]}" if rest else ""
    return f"--policy {kind} --match {match}{kl_arg}{steps}"


def built_models(wildcards, precisions):
    """The checkpoints of `precisions` that this workflow builds (local paths are not rule outputs)."""
    paths = [model_dir(wildcards.benchmark, wildcards.model, q) for q in precisions]
    return [p for p in paths if p.startswith(f"{RESULTS}/")]


def rollout_inputs(wildcards):
    return built_models(wildcards, rollout_precisions(wildcards)) + policy_inputs(wildcards) + data_input(wildcards)


def kl_models(wildcards):
    return built_models(wildcards, ["bf16", wildcards.quant])


def seed_runs(benchmark, model, quant, policy):
    return [
        f"{run_dir(benchmark, model, quant, policy, f'seed{s}')}/episodes.parquet" for s in config["evaluate"]["seeds"]
    ]


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
            methods[f"{q}/DMR@{k:g}"] = seed_runs(b, m, q, format_policy("dmr", "k", k))
        for k in route.get("budgets", []) if "grpo" in config else []:
            methods[f"{q}/GRPO@{k:g}"] = seed_runs(b, m, q, format_policy("grpo", "k", k))
        for base in route.get("baselines", []):
            for k in route.get("baseline_budgets", []):
                methods[f"{q}/{base.capitalize()}@{k:g}"] = seed_runs(b, m, q, format_policy(base, "k", k))
    return methods


def table_inputs(wildcards):
    return [p for paths in table_methods(wildcards).values() for p in paths]


def table_args(wildcards):
    return " ".join(f"--method {name} {' '.join(paths)}" for name, paths in table_methods(wildcards).items())


# Latency (App. A) and GRPO (Sec. 4.3).
def latency_cfg():
    return config.get("latency", {})


def grpo_cfg():
    return config.get("grpo", {})


GRPO_LAMBDA = f"{config['grpo']['lambda']:g}" if "grpo" in config else "none"


def grpo_router_dir(w):
    """The GRPO router of `grpo.lambda`; one directory per lambda keeps a lambda sweep possible."""
    return f"{cell_dir(w)}/{w.quant}/grpo/lam{GRPO_LAMBDA}/router"


def latency_runs(wildcards):
    """The single-precision baseline runs the coefficients pool: bf16 Full and each scheme's Quant."""
    b, m = wildcards.benchmark, wildcards.model
    runs = {"bf16": [run_dir(b, m, "bf16", "full", f"seed{s}") for s in config["evaluate"]["seeds"]]}
    for q in cell_quants(b, m):
        runs[q] = [run_dir(b, m, q, "quant", f"seed{s}") for s in config["evaluate"]["seeds"]]
    return runs


def latency_inputs(wildcards):
    return [
        f"{d}/{f}.parquet" for runs in latency_runs(wildcards).values() for d in runs for f in ("steps", "episodes")
    ]


def latency_args(wildcards):
    runs = latency_runs(wildcards)
    cfg = latency_cfg()
    args = [f"--high {' '.join(runs.pop('bf16'))}"] + [f"--low {q} {' '.join(r)}" for q, r in runs.items()]
    args.append(f"--source {cfg.get('source', 'measured')}")
    if cfg.get("coefficients"):
        args.append(f"--coefficients {as_json(cell_coefficients(wildcards))}")
    if not cfg.get("w3_projection", True):
        args.append("--no-w3-projection")
    args.append(f"--replay {cfg.get('replay_episodes', 16)}")
    args.append(f"--router-steps {' '.join(routed_steps(wildcards))}")
    return " ".join(
        args + [f"--arch {as_json(route_cfg().get('router'))}", f"--shards {config['evaluate'].get('shards', 16)}"]
    )


def cell_coefficients(wildcards):
    """latency.coefficients: one set for every cell, or one per cell keyed "benchmark/model"
    (the paper's Table 3 has a row per model and benchmark)."""
    coeffs = latency_cfg()["coefficients"]
    if not any(isinstance(v, dict) for v in coeffs.values()):
        return coeffs
    key = f"{wildcards.benchmark}/{wildcards.model}"
    if key not in coeffs:
        raise ValueError(f"latency.coefficients has per-cell entries but none for {key!r}: {sorted(coeffs)}")
    return coeffs[key]


def coefficients(wildcards):
    return f"{cell_dir(wildcards)}/latency/coefficients.json"


def grpo_args(wildcards):
    """GRPO options; lambda from the path, so any lambda of a sweep can be trained."""
    g = grpo_cfg()
    keys = ("tasks", "group_size", "iterations", "lr", "clip", "kl_coef", "epochs", "seed")
    steps = routed_steps(wildcards, "grpo")
    # Only where GRPO decides other step types than KL-ST, so other cells keep their commands.
    extra = [] if steps == routed_steps(wildcards) else [f"--router-steps {' '.join(steps)}"]
    return " ".join([f"--lam {wildcards.lam}", cli_flags({k: g[k] for k in keys if k in g})] + extra)


def grpo_targets(benchmark, model):
    """Per routed scheme the GRPO training curve; per cell the average-rank table."""
    if "grpo" not in config:
        return []
    routed = cell_routes(benchmark, model)
    # The rank analysis compares router points: a cell without a routed scheme has none.
    return (
        [f"{RESULTS}/{benchmark}/{model}/figures/grpo_curve_{q}_lam{GRPO_LAMBDA}.png" for q in routed]
        + ([f"{RESULTS}/{benchmark}/{model}/tables/rank.md"] if routed else [])
        + [f"{RESULTS}/{benchmark}/{model}/tables/latency.md"]
    )


def calibration_input(wildcards):
    """The expert episodes when quantization calibrates on them. A local file is an input once it exists
    (a change reruns quantization); a dry-run plans without it, and a real run checks it on start."""
    source = model_cfg(wildcards).get("quantize", {}).get("calibration", {}).get("source", "expert")
    if source == "expert":
        return [rules.expert_data.output[0].format(**wildcards)]
    return [source] if os.path.exists(source) else []


def calibration_arg(wildcards):
    source = model_cfg(wildcards).get("quantize", {}).get("calibration", {}).get("source", "expert")
    return f"expert:{rules.expert_data.output[0].format(**wildcards)}" if source == "expert" else source


def route_targets(benchmark, model):
    """The KL-ST figures and the AO/AS label tables of a cell's routed schemes (the table pulls in
    everything else)."""
    return (
        [
            f"{RESULTS}/{benchmark}/{model}/figures/{name}_{q}.png"
            for q in cell_routes(benchmark, model)
            for name in ("kl_hist", "router_scores", "kl_step_types")
        ]
        + [f"{RESULTS}/{benchmark}/{model}/{q}/kl/labels.parquet" for q in cell_routes(benchmark, model)]
        + [f"{RESULTS}/{benchmark}/{model}/tables/diagnose_{q}.md" for q in cell_routes(benchmark, model)]
    )


# Router ablations (Sec. 5.4, 5.5, Table 5): KL-ST routers with one setting changed, under
# {quant}/ablation/{variant}/router; the variant equal to the cell's own router reuses it.
def ablation_cfg():
    return route_cfg().get("ablation", {})


def ablation_variants():
    cfg = ablation_cfg()
    return (
        [f"depth{L}" for L in cfg.get("depths", [])]
        + [f"tau-{t}" for t in cfg.get("taus", [])]
        + (["steps-ao", "steps-as"] if cfg.get("all_steps") else [])
        + [f"encoder-{e}" for e in cfg.get("encoders", [])]
    )


def is_cell_router(variant):
    r = route_cfg().get("router", {})
    encoder = r.get("encoder", "text")
    # An encoder variant has its own window (text 50, proposal 1): the cell's router only where they agree.
    same = r.get("window", 50) == (50 if encoder == "text" else 1)
    return variant in (f"depth{r.get('layers', 8)}", "tau-auto", "steps-ao") or (
        same and variant == f"encoder-{encoder}"
    )


def ablation_router(w, variant):
    """A variant's router directory. The cell's own setting is the cell's router, unless
    `ablation.train` trains the variants on another budget: then it is trained once more on that
    budget (variant `base`), so every point of a curve had the same training."""
    if is_cell_router(variant):
        if ablation_train() != route_cfg().get("train", {}):
            variant = "base"
        else:
            return router_dir(w)
    return f"{cell_dir(w)}/{w.quant}/ablation/{variant}/router"


def ablation_inputs(w):
    return [f"{ablation_router(w, v)}/metrics.json" for v in ablation_variants()]


def ablation_args(w):
    return " ".join(f"--router {v} {ablation_router(w, v)}" for v in ablation_variants())


def ablation_train():
    return {**route_cfg().get("train", {}), **ablation_cfg().get("train", {})}


def variant_labels(w):
    """The all-step variant is labelled with the all-step tau of dmr.labels; the others need nothing."""
    return [f"{cell_dir(w)}/{w.quant}/kl/labels.json"] if w.variant == "steps-as" else []


def variant_klst_args(w):
    """dmr.klst options of a variant: the cell's, with the variant's one change."""
    v = w.variant
    arch = dict(route_cfg().get("router", {}))
    steps = " ".join(routed_steps(w))
    extra = ""
    if v.startswith("depth"):
        arch["layers"] = int(v[len("depth") :])
    elif v.startswith("tau-"):
        extra = f"--tau-point {v[len('tau-'):]}"
    elif v == "steps-as":
        steps = f"all --labels-summary {cell_dir(w)}/{w.quant}/kl/labels.json --label-set as"
    elif v.startswith("encoder-"):
        # The paper's router reads the last 50 step texts; the proposal router the current step.
        arch["encoder"] = v[len("encoder-") :]
        arch["window"] = 50 if arch["encoder"] == "text" else 1
    train = ablation_train()
    return " ".join([f"--step-types {steps}", f"--arch {as_json(arch)}", extra, cli_flags(train)])


def ablation_targets(benchmark, model):
    if not ablation_variants():
        return []
    return [f"{RESULTS}/{benchmark}/{model}/tables/ablation_{q}.md" for q in cell_routes(benchmark, model)]


def cell_targets():
    return [
        t
        for c in config["cells"]
        for t in [f"{RESULTS}/{c['benchmark']}/{c['model']}/tables/main.md"]
        + route_targets(c["benchmark"], c["model"])
        + grpo_targets(c["benchmark"], c["model"])
    ]


def all_ablation_targets(wildcards=None):
    """`make ablations`: the router ablation tables of every routed cell, a target of their own
    (the default run leaves them out to stay within its time)."""
    return [t for c in config["cells"] for t in ablation_targets(c["benchmark"], c["model"])]


def summary_inputs(wildcards):
    """Everything else the default target builds: the summary is written last, so its timing table
    covers the whole run."""
    return cell_targets()


def all_targets():
    _check_resources()  # called from rule all, once every rule file is included
    return cell_targets() + [f"{RESULTS}/summary.md"]
