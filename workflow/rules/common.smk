import copy
import json
import os
import shlex
import subprocess
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from dmr.policy_name import ROUTERS, format_policy, parse_policy

# An agent card's recipe is the config as written; validation fills in the schema's defaults.
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

# Paths, written once. A cell's results live under CELL; a rule's output is the pattern cell(PATH)
# and an input function's path the same with wildcards and values filled in, cell(PATH, w, ...).
# A rollout directory is RUN: run `seedN` evaluates test tasks, `train` is the bf16 KL pool of the
# training split, `calib` the router's calibration pool, `probe` seed 0's test tasks routed by DMR
# with each step's true KL measured (dmr.diagnose, online), `dagger` the round-0 router's routed run
# of training tasks; policy names follow dmr.policy_name.
RESULTS = "results"
CELL = f"{RESULTS}/{{benchmark}}/{{model}}"
RUN = "{quant}/rollouts/{policy}/{run}"
KL_POOL = {"quant": "bf16", "policy": "full", "run": "train"}


def cell(path, w=None, **values):
    """results/{benchmark}/{model}/PATH; with wildcards `w` (or a cells entry) and `values` over
    them, the concrete path."""
    path = f"{CELL}/{path}"
    return path.format(**{**(w or {}), **values}) if w or values else path


def cell_log(name):
    return cell(f"logs/{name}.log")


def cell_benchmark(rule, name=None):
    return cell(f"benchmarks/{rule}/{name or rule}.tsv")


def run_dir(w, **values):
    """A rollout directory of the cell: the wildcards' quant, policy and run unless `values` name them."""
    return cell(RUN, w, **values)


def cell_cfg(w):
    """The config's entry of a cell; `route` defaults to all its quants."""
    for c in config["cells"]:
        if c["benchmark"] == w["benchmark"] and c["model"] == w["model"]:
            return {**c, "route": c.get("route", c["quants"])}
    return {"quants": [], "route": []}


def _check_cells():
    for c in config["cells"]:
        name = f"{c['benchmark']}/{c['model']}"
        for key in ("benchmark", "model"):
            if c[key] not in config[f"{key}s"]:
                raise ValueError(f"cells: unknown {key} {c[key]!r}; defined: {sorted(config[f'{key}s'])}")
        quants, extra = cell_cfg(c)["quants"], set(cell_cfg(c)["route"]) - set(cell_cfg(c)["quants"])
        if len(set(quants)) != len(quants):
            raise ValueError(f"cells: {name} lists a quant scheme twice")
        if config["models"][c["model"]]["source"] == "path" and not config["models"][c["model"]].get("path"):
            raise ValueError(f"models.{c['model']}: source 'path' needs a 'path'")
        if extra:
            raise ValueError(f"cells: {name} routes {sorted(extra)}, which are not in its quants")
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
    if ROUTE["router"]["encoder"] == "proposal" and config["backend"]["name"] != "hf":
        raise ValueError(
            f"route.router.encoder 'proposal' reads the low model's hidden states in-process: it needs backend.name "
            f"'hf', not {config['backend']['name']!r} (set route.router.encoder: text, the paper's router)"
        )
    missing = set(ROUTE["baseline_budgets"]) - set(ROUTE["budgets"])
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
    paths, used = {}, {c["model"] for c in config["cells"]}
    for name, m in config["models"].items():
        if name not in used:
            continue
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
    every = config["progress_every"]
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
    cfg = config["resources"]
    return {
        "cpus_per_task": threads,
        **RESOURCES["default"],
        **RESOURCES.get(rule, {}),
        **cfg.get("default", {}),
        **cfg.get(rule, {}),
    }


def _check_resources():
    unknown = set(config["resources"]) - {"default"} - {r.name for r in workflow.rules}
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
    args = [
        BACKEND,
        f"--max-new-tokens {d['max_new_tokens']}",
        f"--temperature {d['temperature']}",
        f"--top-p {d['top_p']}",
        f"--prompt {as_json(bench(w)['prompt'])}",
    ]
    return " ".join(args + (["--constrained"] if d["constrained"] else []) + [f"--shards {SHARDS}"])


def data_input(w):
    """The benchmark's data manifest, for environments that read downloaded game files (alfworld)."""
    return [rules.data.output[0].format(**w)] if bench(w)["env"] == "alfworld" else []


def data_need(w):
    """--need of the data check: the tasks of each protocol split this config plays."""
    b = bench(w)
    need = {"calib": b["tasks"]["calib"], "test": b["tasks"]["test"]}
    if any(cell_cfg(c)["route"] for c in config["cells"] if c["benchmark"] == w.benchmark):
        need["train"] = ROUTE["kl_tasks"]
    if b["tasks_per_seed"] == "distinct":
        need["test"] *= max(config["evaluate"]["seeds"]) + 1
    return " ".join(f"{k}={v}" for k, v in need.items())


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


def candidates(w):
    """The trained agent's candidates for selection (dmr.select): snapshots, then the final p1.00."""
    sel = model_cfg(w).get("select")
    return [f"p{f:.2f}" for f in sorted(sel["at"])] + ["p1.00"] if sel else ["p1.00"]


def select_runs(w):
    """Calibration runs of the candidates; one candidate needs none."""
    c = candidates(w)
    return [rules.select_rollout.output[0].format(**w, candidate=n) for n in c] if len(c) > 1 else []


def snapshot_args(w, output):
    """Snapshot flags of dmr.tiny_agent; none without selection, so those commands stay as they were."""
    sel = model_cfg(w).get("select")
    return f" --snapshot-at {','.join(str(f) for f in sorted(sel['at']))} --snapshots {output[0]}" if sel else ""


def agent_cards(w):
    """Cards of the agents this config trains (`make agents`); none where every model is a path."""
    cards = [cell("card", c) for c in config["cells"] if config["models"][c["model"]]["source"] == "train"]
    if not cards:
        raise WorkflowError(
            "no agent to build: every model in this config is a local path; `make agents` "
            "adds config/agents.yaml, which trains them"
        )
    return list(dict.fromkeys(cards))


def run_tasks(w):
    """--split, --n and --offset of a rollout run. Seed s of a generated pool evaluates its own test
    tasks [s*n, (s+1)*n); the DAgger run routes the training tasks after the KL pool's."""
    b, kl_tasks = bench(w), ROUTE["kl_tasks"]
    split, offset = {"train": "train", "calib": "calib", "dagger": "train"}.get(w.run, "test"), 0
    if w.run == "train":
        n = kl_tasks
    elif w.run == "dagger":
        n, offset = ROUTE["dagger"]["tasks"], kl_tasks
    elif w.run == "calib":
        n = b["tasks"]["calib"]
    else:
        n = b["tasks"]["test"]
        offset = run_seed(w) * n if b["tasks_per_seed"] == "distinct" else 0
    return f"--split {split} --n {n} --offset {offset}"


def run_seed(w):
    return int(w.run[4:]) if w.run.startswith("seed") else 0


def routed_steps(w, kind="dmr"):
    """Step types a router decides; the others run at bf16 (paper App. C.1). The GRPO router's
    (`grpo_router_steps`) default to the KL-ST router's (`router_steps`)."""
    steps = bench(w)["router_steps"]
    return " ".join(bench(w).get("grpo_router_steps", steps) if kind == "grpo" else steps)


def rollout_precisions(w):
    """The precisions a rollout's policy can route to, high first."""
    return {"full": ["bf16"], "quant": [w.quant]}.get(w.policy, ["bf16", w.quant])


def router_dir(w, kind="dmr"):
    """The KL-ST router (dmr0: round 0), or the GRPO router of `grpo.lambda` (a directory per lambda)."""
    if kind == "grpo":
        return cell("{quant}/grpo/lam{lam}/router", w, lam=GRPO_LAMBDA)
    return cell("{quant}/router0" if kind == "dmr0" else "{quant}/router", w)


def calib_run(w):
    """The calibration pool's routed run of a router (stage router0/router, else GRPO) at threshold 0.5."""
    kind = {"router": "dmr", "router0": "dmr0"}.get(w.get("stage"), "grpo")
    return f"{run_dir(w, policy=format_policy(kind, 't', 0.5), run='calib')}/steps.parquet"


def dagger_runs(w):
    """The final router's extra data (route.dagger): the round-0 router's routed run of training tasks."""
    d = ROUTE["dagger"]
    if w.stage != "router" or not d["tasks"]:
        return []
    return [f"{run_dir(w, policy=format_policy('dmr0', 'k', d['budget']), run='dagger')}/steps.parquet"]


def probe_run(w):
    """The online probe run of dmr.diagnose, at the middle budget (0.4 in the paper's sweep)."""
    budgets = ROUTE["budgets"]
    return f"{run_dir(w, policy=format_policy('dmr', 'k', budgets[len(budgets) // 2]), run='probe')}/steps.parquet"


def policy_inputs(w):
    """Files a routed policy needs besides the models: its router (and calibration at a budget K), or
    the dmr-kK run a baseline matches (and the KL pool of oracle and uncertainty)."""
    kind, mode, value = parse_policy(w.policy)
    if not mode:
        return []
    if kind in ROUTERS:
        rd = router_dir(w, kind)
        return [f"{rd}/router.json"] + ([f"{rd}/calibration.json"] if mode == "k" else [])
    match = f"{run_dir(w, policy=format_policy('dmr', 'k', value))}/episodes.parquet"
    return [match] + ([rules.kl.output[0].format(**w)] if kind in ("oracle", "uncertainty") else [])


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


def seed_runs(w, quant, policy):
    return [
        f"{run_dir(w, quant=quant, policy=policy, run=f'seed{s}')}/episodes.parquet"
        for s in config["evaluate"]["seeds"]
    ]


def table_methods(w):
    """Methods of a cell's main table: Full; per scheme the always-quantized baseline, then for the
    routed schemes DMR (and GRPO) at each budget and the matched baselines (`NAME@K`)."""
    methods = {"Full": seed_runs(w, "bf16", "full")}
    budgets, matched = ROUTE["budgets"], ROUTE["baseline_budgets"]
    points = [("dmr", "DMR", budgets)] + ([("grpo", "GRPO", budgets)] if "grpo" in config else [])
    points += [(base, base.capitalize(), matched) for base in ROUTE["baselines"]]
    for q in cell_cfg(w)["quants"]:
        methods[f"{q}/Quant"] = seed_runs(w, q, "quant")
        if q not in cell_cfg(w)["route"]:
            continue
        for kind, name, ks in points:
            methods.update({f"{q}/{name}@{k:g}": seed_runs(w, q, format_policy(kind, "k", k)) for k in ks})
    return methods


def latency_runs(w):
    """The single-precision runs the coefficients pool, per seed: bf16 Full, then each scheme's Quant."""
    return {
        q: [
            run_dir(w, quant=q, policy="full" if q == "bf16" else "quant", run=f"seed{s}")
            for s in config["evaluate"]["seeds"]
        ]
        for q in ["bf16", *cell_cfg(w)["quants"]]
    }


def latency_args(w):
    cfg, runs = config["latency"], latency_runs(w)
    args = [f"--high {' '.join(runs.pop('bf16'))}"] + [f"--low {q} {' '.join(r)}" for q, r in runs.items()]
    args.append(f"--source {cfg['source']}")
    if cfg.get("coefficients"):
        # One set for every cell, or one per cell keyed "benchmark/model" (the paper's Table 3).
        coeffs, key = cfg["coefficients"], f"{w.benchmark}/{w.model}"
        if any(isinstance(v, dict) for v in coeffs.values()):
            if key not in coeffs:
                raise ValueError(f"latency.coefficients has per-cell entries but none for {key!r}: {sorted(coeffs)}")
            coeffs = coeffs[key]
        args.append(f"--coefficients {as_json(coeffs)}")
    if not cfg["w3_projection"]:
        args.append("--no-w3-projection")
    args += [f"--replay {cfg['replay_episodes']}", f"--router-steps {routed_steps(w)}"]
    return " ".join(args + [f"--arch {as_json(ROUTE['router'])}", f"--shards {SHARDS}"])


def grpo_args(w):
    """GRPO options; lambda from the path, so any lambda of a sweep can be trained."""
    g = config["grpo"]
    keys = ("tasks", "group_size", "iterations", "lr", "clip", "kl_coef", "epochs", "seed")
    # Only where GRPO decides other step types than KL-ST, so other cells keep their commands.
    steps = routed_steps(w, "grpo")
    extra = [] if steps == routed_steps(w) else [f"--router-steps {steps}"]
    return " ".join([f"--lam {w.lam}", cli_flags({k: g[k] for k in keys if k in g})] + extra)


def calibration_input(w):
    """Quantization's calibration text: the cell's expert episodes, or a local file of the config, an
    input once it exists (a change reruns quantization); a real run checks it on start."""
    source = model_cfg(w)["quantize"]["calibration"]["source"]
    return [rules.expert_data.output[0].format(**w)] if source == "expert" else [source] * os.path.exists(source)


def calibration_arg(w, input):
    source = model_cfg(w)["quantize"]["calibration"]["source"]
    return f"expert:{input.calibration[0]}" if source == "expert" else source


# Router ablations (Sec. 5.4, 5.5, Table 5): KL-ST routers with one setting changed, under
# {quant}/ablation/{variant}/router; the variant equal to the cell's own router reuses it.
def ablation_variants():
    cfg = ROUTE["ablation"]
    return (
        [f"depth{L}" for L in cfg["depths"]]
        + [f"tau-{t}" for t in cfg["taus"]]
        + (["steps-ao", "steps-as"] if cfg["all_steps"] else [])
        + [f"encoder-{e}" for e in cfg["encoders"]]
    )


def ablation_train():
    return {**ROUTE["train"], **ROUTE["ablation"]["train"]}


def ablation_router(w, variant):
    """A variant's router directory. The cell's own setting is the cell's router, unless
    `ablation.train` trains the variants on another budget: then it is trained once more on that
    budget (variant `base`), so every point of a curve had the same training."""
    r = ROUTE["router"]
    encoder = r["encoder"]
    # An encoder variant has its own window (text 50, proposal 1): the cell's router only where they agree.
    same = r["window"] == (50 if encoder == "text" else 1)
    if variant in (f"depth{r['layers']}", "tau-auto", "steps-ao") or (same and variant == f"encoder-{encoder}"):
        if ablation_train() == ROUTE["train"]:
            return router_dir(w)
        variant = "base"
    return cell("{quant}/ablation/{variant}/router", w, variant=variant)


def klst_args(w):
    """dmr.klst's router options: the cell's, or an ablation variant's with its one change."""
    variant, arch, steps, extra = w.get("variant"), dict(ROUTE["router"]), routed_steps(w), []
    if variant:
        extra = [f"--tau-point {variant[len('tau-'):]}" if variant.startswith("tau-") else ""]
    if variant and variant.startswith("depth"):
        arch["layers"] = int(variant[len("depth") :])
    elif variant == "steps-as":
        steps = f"all --labels-summary {rules.labels.output.summary.format(**w)} --label-set as"
    elif variant and variant.startswith("encoder-"):
        # The paper's router reads the last 50 step texts; the proposal router the current step.
        arch["encoder"] = variant[len("encoder-") :]
        arch["window"] = 50 if arch["encoder"] == "text" else 1
    train = ablation_train() if variant else ROUTE["train"]
    return " ".join([f"--step-types {steps}", f"--arch {as_json(arch)}", *extra, cli_flags(train)])


def targets(c):
    """A cell's targets: the main table (which pulls in the runs), the KL-ST figures, labels and
    diagnosis of its routed schemes, and with GRPO its curves, average ranks and latency."""
    routed = cell_cfg(c)["route"]
    figures = [f"figures/{name}_{q}.png" for q in routed for name in ("kl_hist", "router_scores", "kl_step_types")]
    paths = ["tables/main.md"] + figures + [f"{q}/kl/labels.parquet" for q in routed]
    paths += [f"tables/diagnose_{q}.md" for q in routed]
    if "grpo" in config:
        # The rank analysis compares router points: a cell without a routed scheme has none.
        paths += [f"figures/grpo_curve_{q}_lam{GRPO_LAMBDA}.png" for q in routed]
        paths += ["tables/rank.md"] * bool(routed) + ["tables/latency.md"]
    return [cell(p, c) for p in paths]


def ablation_targets(w=None):
    """`make ablations`: the router ablation tables of every routed cell, a target of their own
    (the default run leaves them out to stay within its time)."""
    cells = config["cells"] if ablation_variants() else []
    return [cell(f"tables/ablation_{q}.md", c) for c in cells for q in cell_cfg(c)["route"]]


def cell_targets(w=None):
    return [t for c in config["cells"] for t in targets(c)]


def all_targets():
    """The default target: every cell's, and the summary, written last so that its timing table
    covers the whole run."""
    _check_resources()  # called from rule all, once every rule file is included
    return cell_targets() + [f"{RESULTS}/summary.md"]
