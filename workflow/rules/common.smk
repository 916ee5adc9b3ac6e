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


def router_arch(arch):
    """route.router as the --arch of dmr.klst and dmr.latency: encoder_quant only when not none, so
    the commands of fp32-encoder routers are what they were before the option existed."""
    return {k: v for k, v in arch.items() if (k, v) != ("encoder_quant", "none")}


THREADS = config["threads"]
ROUTE = config["route"]
GRPO_LAMBDA = f"{config['grpo']['lambda']:g}" if "grpo" in config else "none"
SHARDS = config["evaluate"]["shards"]
BACKEND = f"--backend {config['backend']['name']} --backend-kwargs {as_json(config['backend']['kwargs'])}"
BUDGETS = " ".join(f"{k:g}" for k in ROUTE["budgets"])
GRPO_KEYS = ("tasks", "group_size", "iterations", "lr", "clip", "kl_coef", "epochs", "advantage", "seed")
GRPO_FLAGS = cli_flags({k: config["grpo"][k] for k in GRPO_KEYS if k in config.get("grpo", {})})
# Router ablations (Sec. 5.4, 5.5, Table 5): KL-ST routers with one setting changed, under
# {quant}/ablation/{variant}/router, trained on route.train with ablation.train over it.
ABLATION = ROUTE["ablation"]
ABLATION_VARIANTS = [f"depth{L}" for L in ABLATION["depths"]] + [f"tau-{t}" for t in ABLATION["taus"]]
ABLATION_VARIANTS += ["steps-ao", "steps-as"] * ABLATION["all_steps"] + [f"encoder-{e}" for e in ABLATION["encoders"]]
ABLATION_TRAIN = ROUTE["train"] | ABLATION["train"]

# Paths, written once: a rule's output is cell(PATH), the pattern results/{benchmark}/{model}/PATH; an
# input function's is cell(PATH, w, **values), with wildcards (or a cells entry) and values filled in.
# A rollout directory is RUN, policies named by dmr.policy_name: run seedN plays test tasks, train the
# bf16 KL pool, calib the calibration pool, probe seed 0's tasks measuring each step's KL, dagger route.dagger.
RESULTS = "results"
CELL = f"{RESULTS}/{{benchmark}}/{{model}}"
RUN = "{quant}/rollouts/{policy}/{run}"


def cell(path, w=None, **values):
    path = f"{CELL}/{path}"
    return path.format(**{**(w or {}), **values}) if w or values else path


def seed_runs(w, quant, policy):
    runs = [cell(RUN, w, quant=quant, policy=policy, run=f"seed{s}") for s in config["evaluate"]["seeds"]]
    return [f"{r}/episodes.parquet" for r in runs]


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
        if extra := sorted(set(cell_cfg(c)["route"]) - set(c["quants"])):
            raise ValueError(f"cells: {c['benchmark']}/{c['model']} routes {extra}, which are not in its quants")
    for name, at in ((n, m.get("select", {}).get("at", [])) for n, m in config["models"].items()):
        if len({f"p{f:.2f}" for f in at} - {"p1.00"}) != len(at):
            raise ValueError(
                f"models.{name}.select.at {at}: snapshots are named by two decimals (p0.60), "
                "so the fractions must differ there and stay below 0.995"
            )
    if "grpo" in config and config["grpo"]["lambda"] not in config["grpo"]["lambdas"]:
        raise ValueError(f"grpo.lambda {config['grpo']['lambda']} is not in grpo.lambdas {config['grpo']['lambdas']}")
    if ROUTE["router"]["encoder"] == "proposal" and config["backend"]["name"] != "hf":
        raise ValueError(
            f"route.router.encoder 'proposal' reads the low model's hidden states in-process: it needs backend.name "
            f"'hf', not {config['backend']['name']!r} (set route.router.encoder: text, the paper's router)"
        )
    if missing := sorted(set(ROUTE["baseline_budgets"]) - set(ROUTE["budgets"])):
        raise ValueError(f"route.baseline_budgets {missing} are not in route.budgets: baselines match a DMR run")
    for name in sorted({c["model"] for c in config["cells"]}):
        r = ROUTE["router"] | config["models"][name].get("router", {})
        if "d_model" in r and "heads" in r and r["d_model"] % r["heads"]:
            raise ValueError(
                f"the router of model {name!r} (route.router, models.{name}.router): d_model {r['d_model']} "
                f"is not a multiple of heads {r['heads']}"
            )


_check_config()


def local_path(path):
    """A checkpoint of the config: as given where it exists, else from this checkout (the shipped agents/)."""
    shipped = os.path.join(workflow.basedir, path)
    return shipped if not (os.path.isabs(path) or os.path.exists(path)) and os.path.exists(shipped) else path


def on_start():
    """On start of a real run (not -n, --lint, --touch): a missing local file of the config fails here, not in
    a job hours later; then dmr.progress reports the rollouts in flight every `progress_every` seconds."""
    paths, used = {}, {c["model"] for c in config["cells"]}
    for name, m in ((n, m) for n, m in config["models"].items() if n in used):
        paths[f"models.{name}.path"] = local_path(m["path"]) if m["source"] == "path" else None
        paths[f"models.{name}.quantize.calibration.source"] = m["quantize"]["calibration"]["source"]
    missing = {k: p for k, p in paths.items() if p not in (None, "expert") and not os.path.exists(p)}
    if missing and not workflow.touch:
        raise WorkflowError(
            "missing local files named in the config: " + "; ".join(f"{k} = {p!r}" for k, p in missing.items())
        )
    if not config["progress_every"] or workflow.touch:
        return
    env = {**os.environ, "PYTHONPATH": f"{workflow.basedir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--results", RESULTS, "--every", str(config["progress_every"]), "--pid", str(os.getpid())]
    subprocess.Popen([sys.executable, "-m", "dmr.progress", *args], env=env, stdout=sys.stderr, stderr=sys.stderr)


# Job resources: Slurm requests, and local limits where `--resources` caps them (gpu). The defaults
# (MB, minutes) fit the embedded CPU run; the config's `resources:` overrides them (`default`: every
# rule; a rule's name: that rule), which is how the paper profile gives rollout, kl and quantize a GPU.
MEMORY_RUNTIME = {"default": (2000, 30), "train_agent": (4000, 60), "latency": (4000, 30), "grpo": (8000, 240)}
MEMORY_RUNTIME |= dict.fromkeys(["quantize", "kl", "klst", "klst_variant"], (8000, 60))
MEMORY_RUNTIME |= dict.fromkeys(["rollout", "select_rollout"], (8000, 120))


def rule_resources(rule, threads=1):
    mem_mb, runtime = MEMORY_RUNTIME.get(rule, MEMORY_RUNTIME["default"])
    own = {"cpus_per_task": threads, "gpu": 0, "mem_mb": mem_mb, "runtime": runtime}
    return own | config["resources"].get("default", {}) | config["resources"].get(rule, {})


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
    """--env and --env-kwargs; a relative data path is the repository's (for snakemake --directory)."""
    kwargs = dict(bench(w)["env_kwargs"])
    if kwargs.get("data") and not os.path.isabs(os.path.expanduser(kwargs["data"])):
        kwargs["data"] = os.path.normpath(os.path.join(workflow.basedir, kwargs["data"]))
    return f"--env {bench(w)['env']} --env-kwargs {as_json(kwargs)}"


def engine_args(w):
    """Backend, decoding and concurrency of the rules that play episodes (rollout, select_rollout, grpo)."""
    d = bench(w)["decoding"]
    args = [BACKEND, cli_flags({k: d[k] for k in ("max_new_tokens", "temperature", "top_p")})]
    args += [f"--prompt {as_json(bench(w)['prompt'])}"] + ["--constrained"] * d["constrained"]
    return " ".join(args + [f"--shards {SHARDS}"])


def data_input(w):
    """The benchmark's data manifest, for environments that read downloaded game files (alfworld)."""
    return [rules.data.output[0].format(**w)] if bench(w)["env"] == "alfworld" else []


def data_need(w):
    """--need of the data check: the tasks of each protocol split this config plays."""
    b, routed = bench(w), any(cell_cfg(c)["route"] for c in config["cells"] if c["benchmark"] == w.benchmark)
    seeds = max(config["evaluate"]["seeds"]) + 1 if b["tasks_per_seed"] == "distinct" else 1
    test = b["tasks"]["test"]
    # Agent selection (models trained here) plays calibration tasks too.
    cells = [c for c in config["cells"] if c["benchmark"] == w.benchmark]
    models = [config["models"][c["model"]] for c in cells]
    select = [m.get("select", {}).get("tasks", 0) for m in models if m["source"] == "train"]
    calib = max([b["tasks"]["calib"], *select])
    need = {"calib": calib, "test": test if test == "all" else test * seeds}
    need |= {"train": ROUTE["kl_tasks"]} if routed else {}
    return " ".join(f"{k}={v}" for k, v in need.items())


def model_dir(w, quant="bf16"):
    """HF checkpoint of a cell at one precision: built here, or a local path from the config."""
    if quant == "bf16" and model_cfg(w)["source"] == "path":
        return local_path(model_cfg(w)["path"])
    return cell("{quant}/model", w, quant=quant)


def built_models(w, *precisions):
    """The checkpoints of `precisions` that this workflow builds (local paths are not rule outputs)."""
    return [p for p in (model_dir(w, q) for q in precisions) if p.startswith(f"{RESULTS}/")]


def candidates(w):
    """The trained agent's candidates for selection (dmr.select): snapshots, then the final p1.00."""
    return [f"p{f:.2f}" for f in sorted(model_cfg(w).get("select", {}).get("at", []))] + ["p1.00"]


def agent_cards(w):
    """Cards of the agents this config trains (`make agents`); none where every model is a path."""
    cards = [cell("card", c) for c in config["cells"] if config["models"][c["model"]]["source"] == "train"]
    if not cards:
        raise WorkflowError("no agent to build: every model is a local path (`make agents` adds config/agents.yaml)")
    return list(dict.fromkeys(cards))


def calibration(w):
    """Quantization's calibration text as (inputs, flag): the cell's expert episodes, or the config's
    local file, an input once it exists (a change reruns quantization)."""
    source, expert = model_cfg(w)["quantize"]["calibration"]["source"], rules.expert_data.output[0].format(**w)
    return ([expert], f"expert:{expert}") if source == "expert" else ([source] * os.path.exists(source), source)


def run_tasks(w):
    """--split, --n, --offset of a run: seed s of a generated pool plays test tasks [s*n, (s+1)*n)."""
    b, kl_tasks, seed = bench(w), ROUTE["kl_tasks"], int(w.run[4:]) if w.run.startswith("seed") else 0
    n = b["tasks"]["test"]  # `all` only with tasks_per_seed: same (checked at load)
    test = ("test", n, 0 if n == "all" else seed * n * (b["tasks_per_seed"] == "distinct"))
    split, n, offset = {
        "train": ("train", kl_tasks, 0),
        "dagger": ("train", ROUTE["dagger"]["tasks"], kl_tasks),  # the training tasks after the KL pool's
        "calib": ("calib", b["tasks"]["calib"], 0),
    }.get(w.run, test)
    return f"--split {split} --n {n} --offset {offset}"


def routed_steps(w, kind="dmr"):
    """Step types a router decides, the others run at bf16 (App. C.1); GRPO's default to KL-ST's."""
    steps = bench(w)["router_steps"]
    return " ".join(bench(w).get("grpo_router_steps", steps) if kind == "grpo" else steps)


def router_dir(w, kind="dmr"):
    """The KL-ST router (dmr0: of round 0), or the GRPO router of `grpo.lambda` (a directory per lambda)."""
    if kind == "grpo":
        return cell("{quant}/grpo/lam{lam}/router", w, lam=GRPO_LAMBDA)
    return cell("{quant}/router0" if kind == "dmr0" else "{quant}/router", w)


def routed_run(w, kind, mode, value, **values):
    """The steps of a routed run of the cell (policy KIND-MODE VALUE), e.g. the calibration pool's."""
    return f"{cell(RUN, w, policy=format_policy(kind, mode, value), **values)}/steps.parquet"


def regime_schemes(w):
    return cell_cfg(w).get("regime") or cell_cfg(w)["quants"]


def regime_inputs(w):
    """What dmr.regime reads per scheme: its KL pool and threshold, Full and Quant at every seed, and
    the oracle at K = 0.4 where the scheme is routed and the oracle runs there."""
    oracle = "oracle" in ROUTE["baselines"] and 0.4 in ROUTE["baseline_budgets"]
    ins = {"full": seed_runs(w, "bf16", "full")}
    for q in regime_schemes(w):
        ins[q] = [cell(f"{q}/kl/{f}", w) for f in ("steps.parquet", "threshold.json")] + seed_runs(w, q, "quant")
        if oracle and q in cell_cfg(w)["route"]:
            ins[q] += seed_runs(w, q, format_policy("oracle", "k", 0.4))
    return ins


def rollout_spec(w):
    """A rollout's models and policy as (inputs, dmr.agent flags). The models: those the policy routes
    to, high first. The policy: a learned router (and its calibration at a budget K), a baseline with
    the dmr-kK run it matches (and the KL pool of oracle and uncertainty), or dmr.agent's own (full, quant)."""
    kind, mode, value = parse_policy(w.policy)
    precisions = {"full": ["bf16"], "quant": [w.quant]}.get(w.policy, ["bf16", w.quant])
    # --router-steps only where they differ from the default [action], so those commands stay as they were.
    steps = "" if routed_steps(w, kind) == "action" else f" --router-steps {routed_steps(w, kind)}"
    rd = router_dir(w, kind) if kind in ROUTERS else None
    if not mode:
        inputs, args = [], f"--policy {w.policy}"
    elif not rd:
        match = f"{cell(RUN, w, policy=format_policy('dmr', 'k', value))}/episodes.parquet"
        kl = [rules.kl.output[0].format(**w)] if kind in ("oracle", "uncertainty") else []
        inputs, args = [match, *kl], f"--policy {kind} --match {match}{''.join(f' --kl {p}' for p in kl)}{steps}"
    elif mode == "t":
        inputs, args = [f"{rd}/router.json"], f"--policy dmr --router {rd} --threshold {value}{steps}"
    else:
        # route.pace: each episode's bf16 steps held to the budget K with `burst` steps ahead of it. The
        # probe run measures each step's true KL (dmr.diagnose); the DAgger run on training tasks.
        pace = f" --pace {value} --burst {ROUTE['pace']['burst']:g}" if ROUTE["pace"] else ""
        probe = " --probe-kl" if w.run in ("probe", "dagger") else ""
        # The probe's KL on the pool's block; --kl-block only where it differs from dmr.agent's default.
        probe += f" --kl-block {ROUTE['kl_block']}" if probe and ROUTE["kl_block"] != "action" else ""
        inputs = [f"{rd}/router.json", f"{rd}/calibration.json"]
        args = f"--policy dmr --router {rd} --calibration {rd}/calibration.json --budget {value}{pace}{steps}{probe}"
    models = " ".join(f"--model {q}={model_dir(w, q)}" for q in precisions)
    return built_models(w, *precisions) + inputs + data_input(w), f"{models} {args}"


def table_methods(w):
    """A cell's main table: Full; per scheme Quant, where routed DMR, GRPO and the baselines (`NAME@K`)."""
    methods = {"Full": seed_runs(w, "bf16", "full")}
    points = [("dmr", "DMR", ROUTE["budgets"])] + [("grpo", "GRPO", ROUTE["budgets"])] * ("grpo" in config)
    points += [(base, base.capitalize(), ROUTE["baseline_budgets"]) for base in ROUTE["baselines"]]
    for q in cell_cfg(w)["quants"]:
        methods[f"{q}/Quant"] = seed_runs(w, q, "quant")
        for kind, name, ks in points * (q in cell_cfg(w)["route"]):
            methods |= {f"{q}/{name}@{k:g}": seed_runs(w, q, format_policy(kind, "k", k)) for k in ks}
    return methods


def latency(w):
    """dmr.latency as (inputs, flags): its pool is the single-precision runs, bf16 Full and each Quant."""
    cfg, seeds = config["latency"], [f"seed{s}" for s in config["evaluate"]["seeds"]]
    high = [cell(RUN, w, quant="bf16", policy="full", run=s) for s in seeds]
    runs = {q: [cell(RUN, w, quant=q, policy="quant", run=s) for s in seeds] for q in cell_cfg(w)["quants"]}
    inputs = [f"{d}/{f}.parquet" for d in high + sum(runs.values(), []) for f in ("steps", "episodes")]
    args = [f"--high {' '.join(high)}"] + [f"--low {q} {' '.join(r)}" for q, r in runs.items()]
    # latency.coefficients: one set for every cell, or one per cell keyed "benchmark/model" (Table 3).
    coeffs, key = cfg.get("coefficients"), f"{w.benchmark}/{w.model}"
    if coeffs and any(isinstance(v, dict) for v in coeffs.values()):
        if key not in coeffs:
            raise ValueError(f"latency.coefficients has per-cell entries but none for {key!r}: {sorted(coeffs)}")
        coeffs = coeffs[key]
    args += [f"--source {cfg['source']}"] + [f"--coefficients {as_json(coeffs)}"] * bool(coeffs)
    args += ["--no-w3-projection"] * (not cfg["w3_projection"]) + [f"--replay {cfg['replay_episodes']}"]
    arch = as_json(router_arch(router_cfg(w)))
    args += [f"--router-steps {routed_steps(w)}", f"--arch {arch}", f"--shards {SHARDS}"]
    return inputs, " ".join(args)


def router_cfg(w):
    """route.router of a cell: its model's `router` width (models.NAME.router) over route.router."""
    return ROUTE["router"] | model_cfg(w).get("router", {})


def ablation_router(w, variant):
    """A variant's router: with the cell's own setting the cell's router, unless `ablation.train` differs:
    then the variant `base`, trained once more on that budget, so every point had the same training."""
    r = router_cfg(w)
    # An encoder variant has its own window (text 50, proposal 1): the cell's router only where they agree.
    same = r["window"] == (50 if r["encoder"] == "text" else 1)
    if variant in (f"depth{r['layers']}", "tau-auto", "steps-ao") or (same and variant == f"encoder-{r['encoder']}"):
        if ABLATION_TRAIN == ROUTE["train"]:
            return router_dir(w)
        variant = "base"
    return cell("{quant}/ablation/{variant}/router", w, variant=variant)


def klst_args(w):
    """dmr.klst's router options: the cell's, or an ablation variant's with its one change."""
    variant, arch, steps = w.get("variant") or "", router_arch(router_cfg(w)), routed_steps(w)
    extra = [f"--tau-point {variant[len('tau-'):]}" if variant.startswith("tau-") else ""] * bool(variant)
    if variant.startswith("depth"):
        arch["layers"] = int(variant[len("depth") :])
    elif variant == "steps-as":
        steps = f"all --labels-summary {rules.labels.output.summary.format(**w)} --label-set as"
    elif variant.startswith("encoder-"):
        # The paper's router reads the last 50 step texts; the proposal router the current step.
        arch["encoder"] = variant[len("encoder-") :]
        arch["window"] = 50 if arch["encoder"] == "text" else 1
    train = ABLATION_TRAIN if variant else ROUTE["train"]
    return " ".join([f"--step-types {steps}", f"--arch {as_json(arch)}", *extra, cli_flags(train)])


def cell_targets(w=None):
    """Each cell's main table (which pulls in the runs), the KL-ST figures, labels and diagnosis of its
    routed schemes, and with GRPO its curves, average ranks (none without a routed scheme) and latency."""
    targets = []
    for c, routed in ((c, cell_cfg(c)["route"]) for c in config["cells"]):
        figures = [f"figures/{n}_{q}.png" for q in routed for n in ("kl_hist", "router_scores", "kl_step_types")]
        paths = ["tables/main.md"] + figures + [f"{q}/kl/labels.parquet" for q in routed]
        paths += [f"tables/diagnose_{q}.md" for q in routed]
        if "grpo" in config:
            paths += [f"figures/grpo_curve_{q}_lam{GRPO_LAMBDA}.png" for q in routed]
            paths += ["tables/rank.md"] * bool(routed) + ["tables/latency.md"]
        targets += [cell(p, c) for p in paths]
    return targets


def all_targets():
    """The default target (once all rules are included): every cell's, then the summary, written last."""
    if unknown := set(config["resources"]) - {"default"} - {r.name for r in workflow.rules}:
        names = sorted(r.name for r in workflow.rules)
        raise ValueError(f"resources: {sorted(unknown)} are not rules of this workflow; its rules are {names}")
    return cell_targets() + [f"{RESULTS}/summary.md"]
