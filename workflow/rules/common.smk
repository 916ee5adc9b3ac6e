import copy
import json
import os
import shlex
import subprocess
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from dmr.policy_name import ROUTERS, format_policy, parse_policy

# Defaults live in the schema: validation fills them in. An agent card's recipe is the config as written.
WRITTEN = copy.deepcopy(config)
validate(config, schema="../schemas/config.schema.yaml")

# Jobs run `python -m dmr.<stage>` from this checkout, with or without an installed package,
# locally and on cluster nodes alike.
shell.prefix(f'export PYTHONPATH="{workflow.basedir}:$PYTHONPATH"; ')


def cli_flags(mapping):
    """Config keys as entry-point flags: {"max_minutes": 4} -> "--max-minutes 4"."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (mapping or {}).items())


def as_json(obj):
    """A config mapping as one shell-quoted JSON argument."""
    return shlex.quote(json.dumps(obj or {}))


THREADS = config["threads"]
ROUTE = config["route"]
GRPO_LAMBDA = f"{config['grpo']['lambda']:g}" if "grpo" in config else "none"
SHARDS = config["evaluate"]["shards"]
BACKEND = f"--backend {config['backend']['name']} --backend-kwargs {as_json(config['backend']['kwargs'])}"
BUDGETS = " ".join(f"{k:g}" for k in ROUTE["budgets"])

# Paths, written once: a rule's output is the pattern cell(PATH), results/{benchmark}/{model}/PATH;
# an input function's path is cell(PATH, w, **values), the same with wildcards (or a cells entry) and
# values filled in. A rollout directory is RUN; its policy names follow dmr.policy_name, and its run
# is `seedN` (test tasks), `train` (the bf16 KL pool), `calib` (the router's calibration pool),
# `probe` (seed 0's tasks routed with each step's true KL measured) or `dagger` (route.dagger).
RESULTS = "results"
CELL = f"{RESULTS}/{{benchmark}}/{{model}}"
RUN = "{quant}/rollouts/{policy}/{run}"
KL_POOL = {"quant": "bf16", "policy": "full", "run": "train"}


def cell(path, w=None, **values):
    path = f"{CELL}/{path}"
    return path.format(**{**(w or {}), **values}) if w or values else path


def cell_log(name):
    return cell(f"logs/{name}.log")


def cell_benchmark(rule, name=None):
    return cell(f"benchmarks/{rule}/{name or rule}.tsv")


def seed_runs(w, quant, policy):
    return [
        f"{cell(RUN, w, quant=quant, policy=policy, run=f'seed{s}')}/episodes.parquet"
        for s in config["evaluate"]["seeds"]
    ]


def cell_cfg(w):
    """The config's entry of a cell; `route` defaults to all its quants."""
    c = next((c for c in config["cells"] if (c["benchmark"], c["model"]) == (w["benchmark"], w["model"])), {})
    return {"quants": [], **c, "route": c.get("route", c.get("quants", []))}


def _check_config():
    """What the schema cannot say."""
    for c in config["cells"]:
        for key in ("benchmark", "model"):
            if c[key] not in config[f"{key}s"]:
                raise ValueError(f"cells: unknown {key} {c[key]!r}; defined: {sorted(config[f'{key}s'])}")
        if set(cell_cfg(c)["route"]) - set(c["quants"]):
            extra = sorted(set(cell_cfg(c)["route"]) - set(c["quants"]))
            raise ValueError(f"cells: {c['benchmark']}/{c['model']} routes {extra}, which are not in its quants")
    for name, model in config["models"].items():
        names = [f"p{f:.2f}" for f in model.get("select", {}).get("at", [])]
        if len(set(names)) != len(names) or "p1.00" in names:
            raise ValueError(
                f"models.{name}.select.at {model['select']['at']}: snapshots are named by two decimals (p0.60), "
                "so the fractions must differ there and stay below 0.995"
            )
    if "grpo" in config and config["grpo"]["lambda"] not in config["grpo"]["lambdas"]:
        raise ValueError(f"grpo.lambda {config['grpo']['lambda']} is not in grpo.lambdas {config['grpo']['lambdas']}")
    if ROUTE["router"]["encoder"] == "proposal" and config["backend"]["name"] != "hf":
        raise ValueError(
            f"route.router.encoder 'proposal' reads the low model's hidden states in-process: it needs backend.name "
            f"'hf', not {config['backend']['name']!r} (set route.router.encoder: text, the paper's router)"
        )
    if set(ROUTE["baseline_budgets"]) - set(ROUTE["budgets"]):
        missing = sorted(set(ROUTE["baseline_budgets"]) - set(ROUTE["budgets"]))
        raise ValueError(f"route.baseline_budgets {missing} are not in route.budgets: baselines match a DMR run")


_check_config()


def local_path(path):
    """A checkpoint path of the config: as given when it exists from the working directory (or is
    absolute), else from this checkout, where the shipped agents/ live."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    shipped = os.path.join(workflow.basedir, path)
    return shipped if os.path.exists(shipped) else path


def external_paths():
    """Local files the config points at (checkpoints, calibration text) for the models its cells
    use: not rule outputs, so a dry-run plans without them; a real run checks them on start."""
    paths, used = {}, {c["model"] for c in config["cells"]}
    for name, m in ((n, m) for n, m in config["models"].items() if n in used):
        if m["source"] == "path":
            paths[f"models.{name}.path"] = local_path(m["path"])
        if m["quantize"]["calibration"]["source"] != "expert":
            paths[f"models.{name}.quantize.calibration.source"] = m["quantize"]["calibration"]["source"]
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
    if not config["progress_every"] or workflow.touch:
        return
    env = {**os.environ, "PYTHONPATH": f"{workflow.basedir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--results", RESULTS, "--every", str(config["progress_every"]), "--pid", str(os.getpid())]
    subprocess.Popen([sys.executable, "-m", "dmr.progress", *args], env=env, stdout=sys.stderr, stderr=sys.stderr)


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
    cfg = config["resources"]
    return (
        {"cpus_per_task": threads}
        | RESOURCES["default"]
        | RESOURCES.get(rule, {})
        | cfg.get("default", {})
        | cfg.get(rule, {})
    )


wildcard_constraints:
    benchmark="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_.-]+",
    quant="[A-Za-z0-9_]+",
    candidate="p[0-9][.][0-9]+",
    policy="[A-Za-z0-9_.:-]+",
    run=r"seed\d+|train|calib|probe|dagger",
    stage=r"router0?",
    variant=r"base|depth\d+|tau-[a-z-]+|steps-(ao|as)|encoder-(text|proposal)",
    lam=r"[0-9.]+",


def bench(w):
    return config["benchmarks"][w.benchmark]


def model_cfg(w):
    return config["models"][w.model]


def env_args(w):
    """--env and --env-kwargs; a relative data path is relative to the repository, so a run in
    another working directory (snakemake --directory) finds the same files."""
    kwargs = dict(bench(w)["env_kwargs"])
    if kwargs.get("data") and not os.path.isabs(os.path.expanduser(kwargs["data"])):
        kwargs["data"] = os.path.normpath(os.path.join(workflow.basedir, kwargs["data"]))
    return f"--env {bench(w)['env']} --env-kwargs {as_json(kwargs)}"


def engine_args(w):
    """Backend, decoding and concurrency of the rules that play episodes (rollout, select_rollout, grpo)."""
    d = bench(w)["decoding"]
    args = [BACKEND, f"--max-new-tokens {d['max_new_tokens']} --temperature {d['temperature']} --top-p {d['top_p']}"]
    args += [f"--prompt {as_json(bench(w)['prompt'])}"] + ["--constrained"] * d["constrained"]
    return " ".join(args + [f"--shards {SHARDS}"])


def model_dir(w, quant="bf16"):
    """HF checkpoint of a cell at one precision: built here, or a local path from the config."""
    if quant == "bf16" and model_cfg(w)["source"] == "path":
        return local_path(model_cfg(w)["path"])
    return cell("{quant}/model", w, quant=quant)


def built_models(w, *precisions):
    """The checkpoints of `precisions` that this workflow builds (local paths are not rule outputs)."""
    return [p for p in (model_dir(w, q) for q in precisions) if p.startswith(f"{RESULTS}/")]


def models_arg(w, precisions):
    return " ".join(f"--model {q}={model_dir(w, q)}" for q in precisions)


def routed_steps(w, kind="dmr"):
    """Step types a router decides; the others run at bf16 (paper App. C.1). The GRPO router's
    (`grpo_router_steps`) default to the KL-ST router's (`router_steps`)."""
    steps = bench(w)["router_steps"]
    return " ".join(bench(w).get("grpo_router_steps", steps) if kind == "grpo" else steps)


def router_dir(w, kind="dmr"):
    """The KL-ST router (dmr0: of round 0), or the GRPO router of `grpo.lambda` (a directory per lambda)."""
    if kind == "grpo":
        return cell("{quant}/grpo/lam{lam}/router", w, lam=GRPO_LAMBDA)
    return cell("{quant}/router0" if kind == "dmr0" else "{quant}/router", w)


def data_input(w):
    """The benchmark's data manifest, for environments that read downloaded game files (alfworld)."""
    return [rules.data.output[0].format(**w)] if bench(w)["env"] == "alfworld" else []


def data_need(w):
    """--need of the data check: the tasks of each protocol split this config plays."""
    b, seeds = bench(w), max(config["evaluate"]["seeds"]) + 1
    need = {
        "calib": b["tasks"]["calib"],
        "test": b["tasks"]["test"] * (seeds if b["tasks_per_seed"] == "distinct" else 1),
    }
    routed = any(cell_cfg(c)["route"] for c in config["cells"] if c["benchmark"] == w.benchmark)
    return " ".join(f"{k}={v}" for k, v in (need | ({"train": ROUTE["kl_tasks"]} if routed else {})).items())


def candidates(w):
    """The trained agent's candidates for selection (dmr.select): snapshots, then the final p1.00."""
    return [f"p{f:.2f}" for f in sorted(model_cfg(w).get("select", {}).get("at", []))] + ["p1.00"]


def agent_cards(w):
    """Cards of the agents this config trains (`make agents`); none where every model is a path."""
    cards = [cell("card", c) for c in config["cells"] if config["models"][c["model"]]["source"] == "train"]
    if not cards:
        raise WorkflowError(
            "no agent to build: every model in this config is a local path; `make agents` "
            "adds config/agents.yaml, which trains them"
        )
    return list(dict.fromkeys(cards))


def calibration_input(w):
    """Quantization's calibration text: the cell's expert episodes, or a local file of the config, an
    input once it exists (a change reruns quantization); a real run checks it on start."""
    source = model_cfg(w)["quantize"]["calibration"]["source"]
    return [rules.expert_data.output[0].format(**w)] if source == "expert" else [source] * os.path.exists(source)


def run_tasks(w):
    """--split, --n and --offset of a rollout run. Seed s of a generated pool evaluates its own test
    tasks [s*n, (s+1)*n); the DAgger run routes the training tasks after the KL pool's."""
    b, kl_tasks, seed = bench(w), ROUTE["kl_tasks"], int(w.run[4:]) if w.run.startswith("seed") else 0
    split, n, offset = {
        "train": ("train", kl_tasks, 0),
        "dagger": ("train", ROUTE["dagger"]["tasks"], kl_tasks),
        "calib": ("calib", b["tasks"]["calib"], 0),
    }.get(w.run, ("test", b["tasks"]["test"], seed * b["tasks"]["test"] * (b["tasks_per_seed"] == "distinct")))
    return f"--split {split} --n {n} --offset {offset}"


def rollout_precisions(w):
    """The precisions a rollout's policy can route to, high first."""
    return {"full": ["bf16"], "quant": [w.quant]}.get(w.policy, ["bf16", w.quant])


def policy_inputs(w):
    """Files a routed policy needs besides the models: its router (and calibration at a budget K), or
    the dmr-kK run a baseline matches (and the KL pool of oracle and uncertainty)."""
    kind, mode, value = parse_policy(w.policy)
    if kind in ROUTERS:
        return [f"{router_dir(w, kind)}/{f}.json" for f in ("router", "calibration")[: 1 + (mode == "k")]]
    match = [f"{cell(RUN, w, policy=format_policy('dmr', 'k', value))}/episodes.parquet"] if mode else []
    return match + ([rules.kl.output[0].format(**w)] if kind in ("oracle", "uncertainty") else [])


def policy_args(w):
    kind, mode, value = parse_policy(w.policy)
    if not mode:
        return f"--policy {w.policy}"
    # --router-steps only where they differ from the default [action], so those commands stay as they were.
    steps = "" if routed_steps(w, kind) == "action" else f" --router-steps {routed_steps(w, kind)}"
    if kind not in ROUTERS:
        match, *kl = policy_inputs(w)
        return f"--policy {kind} --match {match}{''.join(f' --kl {p}' for p in kl)}{steps}"
    rd = router_dir(w, kind)
    if mode == "t":
        return f"--policy dmr --router {rd} --threshold {value}{steps}"
    # route.pace: each episode's bf16 steps held to the budget K with `burst` steps ahead of it. The
    # probe run measures each step's true KL (dmr.diagnose); the DAgger run on training tasks.
    pace = f" --pace {value} --burst {ROUTE['pace']['burst']:g}" if ROUTE["pace"] else ""
    probe = " --probe-kl" if w.run in ("probe", "dagger") else ""
    return f"--policy dmr --router {rd} --calibration {rd}/calibration.json --budget {value}{pace}{steps}{probe}"


def calibration_arg(w, input):
    source = model_cfg(w)["quantize"]["calibration"]["source"]
    return f"expert:{input.calibration[0]}" if source == "expert" else source


def dagger_runs(w):
    """The final router's extra data (route.dagger): the round-0 router's routed run of training tasks."""
    d = ROUTE["dagger"]
    if w.stage != "router" or not d["tasks"]:
        return []
    return [f"{cell(RUN, w, policy=format_policy('dmr0', 'k', d['budget']), run='dagger')}/steps.parquet"]


def probe_run(w):
    """The online probe run of dmr.diagnose, at the middle budget (0.4 in the paper's sweep)."""
    k = ROUTE["budgets"][len(ROUTE["budgets"]) // 2]
    return f"{cell(RUN, w, policy=format_policy('dmr', 'k', k), run='probe')}/steps.parquet"


def calib_run(w):
    """The calibration pool's routed run of a router (stage router0/router, else GRPO) at threshold 0.5."""
    kind = {"router": "dmr", "router0": "dmr0"}.get(w.get("stage"), "grpo")
    return f"{cell(RUN, w, policy=format_policy(kind, 't', 0.5), run='calib')}/steps.parquet"


def table_methods(w):
    """Methods of a cell's main table: Full; per scheme the always-quantized baseline, then for the
    routed schemes DMR (and GRPO) at each budget and the matched baselines (`NAME@K`)."""
    methods = {"Full": seed_runs(w, "bf16", "full")}
    points = [("dmr", "DMR", ROUTE["budgets"])] + [("grpo", "GRPO", ROUTE["budgets"])] * ("grpo" in config)
    points += [(base, base.capitalize(), ROUTE["baseline_budgets"]) for base in ROUTE["baselines"]]
    for q in cell_cfg(w)["quants"]:
        methods[f"{q}/Quant"] = seed_runs(w, q, "quant")
        if q in cell_cfg(w)["route"]:
            for kind, name, ks in points:
                methods |= {f"{q}/{name}@{k:g}": seed_runs(w, q, format_policy(kind, "k", k)) for k in ks}
    return methods


def latency_runs(w):
    """The single-precision runs the coefficients pool, per seed: bf16 Full, then each scheme's Quant."""
    seeds = [f"seed{s}" for s in config["evaluate"]["seeds"]]
    runs = {q: [cell(RUN, w, quant=q, policy="quant", run=s) for s in seeds] for q in cell_cfg(w)["quants"]}
    return {"bf16": [cell(RUN, w, quant="bf16", policy="full", run=s) for s in seeds]} | runs


def latency_args(w):
    cfg, runs = config["latency"], latency_runs(w)
    args = [f"--high {' '.join(runs.pop('bf16'))}"] + [f"--low {q} {' '.join(r)}" for q, r in runs.items()]
    args.append(f"--source {cfg['source']}")
    # latency.coefficients: one set for every cell, or one per cell keyed "benchmark/model" (Table 3).
    coeffs, key = cfg.get("coefficients"), f"{w.benchmark}/{w.model}"
    if coeffs and any(isinstance(v, dict) for v in coeffs.values()):
        if key not in coeffs:
            raise ValueError(f"latency.coefficients has per-cell entries but none for {key!r}: {sorted(coeffs)}")
        coeffs = coeffs[key]
    args += [f"--coefficients {as_json(coeffs)}"] * bool(coeffs)
    args += ["--no-w3-projection"] * (not cfg["w3_projection"]) + [f"--replay {cfg['replay_episodes']}"]
    return " ".join(
        args + [f"--router-steps {routed_steps(w)}", f"--arch {as_json(ROUTE['router'])}", f"--shards {SHARDS}"]
    )


def grpo_args(w):
    """GRPO options; lambda from the path, so any lambda of a sweep can be trained. --router-steps only
    where GRPO decides other step types than KL-ST, so other cells keep their commands."""
    g, steps = config["grpo"], routed_steps(w, "grpo")
    keys = ("tasks", "group_size", "iterations", "lr", "clip", "kl_coef", "epochs", "seed")
    extra = [] if steps == routed_steps(w) else [f"--router-steps {steps}"]
    return " ".join([f"--lam {w.lam}", cli_flags({k: g[k] for k in keys if k in g})] + extra)


# Router ablations (Sec. 5.4, 5.5, Table 5): KL-ST routers with one setting changed, under
# {quant}/ablation/{variant}/router; the variant equal to the cell's own router reuses it.
def ablation_variants():
    a = ROUTE["ablation"]
    taus, encoders = [f"tau-{t}" for t in a["taus"]], [f"encoder-{e}" for e in a["encoders"]]
    return [f"depth{L}" for L in a["depths"]] + taus + ["steps-ao", "steps-as"] * a["all_steps"] + encoders


def ablation_router(w, variant):
    """A variant's router directory. The cell's own setting is the cell's router, unless
    `ablation.train` trains the variants on another budget: then it is trained once more on that
    budget (variant `base`), so every point of a curve had the same training."""
    r = ROUTE["router"]
    # An encoder variant has its own window (text 50, proposal 1): the cell's router only where they agree.
    same = r["window"] == (50 if r["encoder"] == "text" else 1)
    if variant in (f"depth{r['layers']}", "tau-auto", "steps-ao") or (same and variant == f"encoder-{r['encoder']}"):
        if ablation_train() == ROUTE["train"]:
            return router_dir(w)
        variant = "base"
    return cell("{quant}/ablation/{variant}/router", w, variant=variant)


def ablation_train():
    return ROUTE["train"] | ROUTE["ablation"]["train"]


def klst_args(w):
    """dmr.klst's router options: the cell's, or an ablation variant's with its one change."""
    variant, arch, steps = w.get("variant") or "", dict(ROUTE["router"]), routed_steps(w)
    extra = [f"--tau-point {variant[len('tau-'):]}" if variant.startswith("tau-") else ""] * bool(variant)
    if variant.startswith("depth"):
        arch["layers"] = int(variant[len("depth") :])
    elif variant == "steps-as":
        steps = f"all --labels-summary {rules.labels.output.summary.format(**w)} --label-set as"
    elif variant.startswith("encoder-"):
        # The paper's router reads the last 50 step texts; the proposal router the current step.
        arch["encoder"] = variant[len("encoder-") :]
        arch["window"] = 50 if arch["encoder"] == "text" else 1
    train = ablation_train() if variant else ROUTE["train"]
    return " ".join([f"--step-types {steps}", f"--arch {as_json(arch)}", *extra, cli_flags(train)])


def targets(c):
    """A cell's targets: the main table (which pulls in the runs), the KL-ST figures, labels and
    diagnosis of its routed schemes, and with GRPO its curves, average ranks and latency."""
    routed = cell_cfg(c)["route"]
    paths = ["tables/main.md"] + [
        f"figures/{n}_{q}.png" for q in routed for n in ("kl_hist", "router_scores", "kl_step_types")
    ]
    paths += [f"{q}/kl/labels.parquet" for q in routed] + [f"tables/diagnose_{q}.md" for q in routed]
    if "grpo" in config:
        # The rank analysis compares router points: a cell without a routed scheme has none.
        paths += [f"figures/grpo_curve_{q}_lam{GRPO_LAMBDA}.png" for q in routed]
        paths += ["tables/rank.md"] * bool(routed) + ["tables/latency.md"]
    return [cell(p, c) for p in paths]


def cell_targets(w=None):
    return [t for c in config["cells"] for t in targets(c)]


def ablation_targets(w=None):
    """`make ablations`: the router ablation tables of every routed cell, a target of their own
    (the default run leaves them out to stay within its time)."""
    cells = config["cells"] if ablation_variants() else []
    return [cell(f"tables/ablation_{q}.md", c) for c in cells for q in cell_cfg(c)["route"]]


def all_targets():
    """The default target: every cell's, then the summary, written last so that its timing table
    covers the whole run."""
    # Called from rule all, once every rule file is included.
    unknown = set(config["resources"]) - {"default"} - {r.name for r in workflow.rules}
    if unknown:
        names = sorted(r.name for r in workflow.rules)
        raise ValueError(f"resources: {sorted(unknown)} are not rules of this workflow; its rules are {names}")
    return cell_targets() + [f"{RESULTS}/summary.md"]
