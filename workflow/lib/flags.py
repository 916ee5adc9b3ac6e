"""A validated config as the paths and command-line flags of the workflow's jobs.

common.smk builds one `Flags` from the config after schema validation (which fills in the defaults);
the rules' params and input functions call its methods with their wildcards. Nothing here needs
Snakemake, so tests/test_workflow_flags.py calls it with a known config and reads known flags back.

Paths, written once: a rule's output is cell(PATH), the pattern results/{benchmark}/{model}/PATH; an
input function's is cell(PATH, w, **values), with wildcards (or a cells entry) and values filled in.
A rollout directory is RUN, policies named by dmr.policy_name: run seedN plays test tasks, train the
bf16 KL pool, calib the calibration pool, probe seed 0's tasks measuring each step's KL, dagger
route.dagger; an ablation variant's runs are ABLATION_RUN, beside its router. Wildcards are read by
name (w["quant"]), so a dict stands in for Snakemake's.
"""

import json
import os
import shlex

from dmr.policy_name import ROUTERS, format_policy, parse_policy
from dmr.policy_name import is_ladder as ladder
from dmr.policy_name import scheme_lows as lows

RESULTS = "results"
CELL = f"{RESULTS}/{{benchmark}}/{{model}}"
RUN = "{quant}/rollouts/{policy}/{run}"
# An ablation variant's router and its routed runs (calibration pool, test seeds), under `make ablations`.
ABLATION = "{quant}/ablation/{variant}"
ABLATION_RUN = f"{ABLATION}/rollouts/{{policy}}/{{run}}"
# Outputs that input functions here name too: rules data, expert_data, kl and labels write them.
DATA = f"{RESULTS}/{{benchmark}}/data.json"
EXPERT, KL, LABELS = "bc/episodes.jsonl", "{quant}/kl/steps.parquet", "{quant}/kl/labels.json"
LATENCY = "latency/coefficients.json"  # rule latency's (calibration of a ladder scheme reads it first)

# Job resources: Slurm requests, and local limits where `--resources` caps them (gpu). The defaults
# (MB, minutes) fit the embedded CPU run; the config's `resources:` overrides them (`default`: every
# rule; a rule's name: that rule), which is how the paper profile gives rollout, kl and quantize a GPU.
MEMORY_RUNTIME = {"default": (2000, 30), "train_agent": (4000, 60), "latency": (4000, 30), "grpo": (8000, 240)}
MEMORY_RUNTIME |= dict.fromkeys(["quantize", "kl", "klst", "klst_variant"], (8000, 60))
MEMORY_RUNTIME |= dict.fromkeys(["rollout", "select_rollout"], (8000, 120))


def cli_flags(mapping):
    """Config keys as entry-point flags: {"max_minutes": 4} -> "--max-minutes 4"."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in mapping.items())


def as_json(obj):
    """A config mapping as one shell-quoted JSON argument."""
    return shlex.quote(json.dumps(obj))


def cell(path, w=None, **values):
    path = f"{CELL}/{path}"
    return path.format(**{**(w or {}), **values}) if w or values else path


def run_seed(run):
    """The seed of a rollout directory: N of seedN, 0 for the pools."""
    return int(run[4:]) if run.startswith("seed") else 0


class Flags:
    """The paths and flags of a validated config's jobs; the constructor checks what the schema cannot say."""

    def __init__(self, config, basedir):
        self.config, self.basedir, self.route = config, basedir, config["route"]
        # The first training task after the KL pool's: the DAgger probe's and GRPO's.
        self.kl_end = self.route["kl_offset"] + self.route["kl_tasks"]
        self.check()
        self.backend = f"--backend {config['backend']['name']} --backend-kwargs {as_json(config['backend']['kwargs'])}"
        self.budgets = " ".join(f"{k:g}" for k in self.route["budgets"])
        self.cost_budgets = " ".join(f"{k:g}" for k in self.route["cost_budgets"])
        grpo = config.get("grpo")
        self.grpo_lambda = f"{grpo['lambda']:g}" if grpo else "none"
        # GRPO's hyperparameters in a fixed order, that of its commands so far (lambda is a wildcard).
        keys = ("tasks", "group_size", "iterations", "lr", "clip", "kl_coef", "epochs", "advantage", "seed")
        self.grpo_flags = cli_flags({k: grpo[k] for k in keys if k in grpo}) if grpo else ""
        # Router ablations (Sec. 5.4, 5.5, Table 5): KL-ST routers with one setting changed, under
        # {quant}/ablation/{variant}/router, trained on route.train with ablation.train over it.
        ab = self.route["ablation"]
        self.ablation_variants = [f"depth{L}" for L in ab["depths"]] + [f"tau-{t}" for t in ab["taus"]]
        self.ablation_variants += ["steps-ao", "steps-as"] * ab["all_steps"] + [f"encoder-{e}" for e in ab["encoders"]]
        self.ablation_train = self.route["train"] | ab["train"]
        # Online, as the paper judges them: routed runs of each variant at these budgets and evaluation seeds.
        online, seeds = ab["online"], config["evaluate"]["seeds"]
        self.ablation_seeds = seeds if online["seeds"] is None else seeds[: online["seeds"]]
        self.ablation_budgets = self.route["budgets"] if online["budgets"] is None else online["budgets"]

    def check(self):
        """What the schema cannot say."""
        config = self.config
        for c in config["cells"]:
            for key in ("benchmark", "model"):
                if c[key] not in config[f"{key}s"]:
                    raise ValueError(f"cells: unknown {key} {c[key]!r}; defined: {sorted(config[f'{key}s'])}")
            routed = self.cell_cfg(c)["route"]
            if extra := sorted({q for r in routed for q in lows(r)} - set(c["quants"])):
                raise ValueError(f"cells: {c['benchmark']}/{c['model']} routes {extra}, which are not in its quants")
            for r in (r for r in routed if ladder(r) and len(set(lows(r))) != len(lows(r))):
                raise ValueError(f"cells: {c['benchmark']}/{c['model']} routes {r!r}: each low precision once")
        for name, m in config["models"].items():
            if len(set(self.candidates({"model": name}))) != len(m.get("select", {}).get("at", [])) + 1:
                raise ValueError(
                    f"models.{name}.select.at {m['select']['at']}: snapshots are named by two decimals (p0.60), "
                    "so the fractions must differ there and stay below 0.995"
                )
        if "grpo" in config and config["grpo"]["lambda"] not in config["grpo"]["lambdas"]:
            raise ValueError(f"grpo.lambda {config['grpo']['lambda']} is not in grpo.lambdas {config['grpo']['lambdas']}")
        if self.route["router"]["encoder"] == "proposal" and config["backend"]["name"] != "hf":
            raise ValueError(
                f"route.router.encoder 'proposal' reads the low model's hidden states in-process: it needs backend.name "
                f"'hf', not {config['backend']['name']!r} (set route.router.encoder: text, the paper's router)"
            )
        if missing := sorted(set(self.route["baseline_budgets"]) - set(self.route["budgets"])):
            raise ValueError(f"route.baseline_budgets {missing} are not in route.budgets: baselines match a DMR run")
        online = self.route["ablation"]["online"]
        if online["seeds"] is not None and online["seeds"] > len(config["evaluate"]["seeds"]):
            raise ValueError(
                f"route.ablation.online.seeds {online['seeds']}: more than the {len(config['evaluate']['seeds'])} "
                "evaluation seeds (evaluate.seeds); a variant is paired with the cell's DMR runs of the same seeds"
            )
        if missing := sorted(set(online["budgets"] or []) - set(self.route["budgets"])):
            raise ValueError(
                f"route.ablation.online.budgets {missing} are not in route.budgets: a variant at K is paired with "
                "the cell's DMR@K and calibrated for route.budgets"
            )
        for name in sorted({c["model"] for c in config["cells"]}):
            r = self.router_cfg({"model": name})
            if "d_model" in r and "heads" in r and r["d_model"] % r["heads"]:
                raise ValueError(
                    f"the router of model {name!r} (route.router, models.{name}.router): d_model {r['d_model']} "
                    f"is not a multiple of heads {r['heads']}"
                )

    def resources(self, rule, threads=1):
        mem_mb, runtime = MEMORY_RUNTIME.get(rule, MEMORY_RUNTIME["default"])
        own = {"cpus_per_task": threads, "gpu": 0, "mem_mb": mem_mb, "runtime": runtime}
        return own | self.config["resources"].get("default", {}) | self.config["resources"].get(rule, {})

    def bench(self, w):
        return self.config["benchmarks"][w["benchmark"]]

    def model_cfg(self, w):
        return self.config["models"][w["model"]]

    def cell_cfg(self, w):
        """The config's entry of a cell; `route` defaults to all its quants."""
        key = (w["benchmark"], w["model"])
        c = next((c for c in self.config["cells"] if (c["benchmark"], c["model"]) == key), {})
        return {"quants": [], **c, "route": c.get("route", c.get("quants", []))}

    def router_cfg(self, w):
        """route.router of a cell: its model's `router` width (models.NAME.router) over route.router."""
        return self.route["router"] | self.model_cfg(w)["router"]

    def local_path(self, path):
        """A checkpoint of the config: as given where it exists, else from this checkout (the shipped agents/)."""
        shipped = os.path.join(self.basedir, path)
        return shipped if not (os.path.isabs(path) or os.path.exists(path)) and os.path.exists(shipped) else path

    def local_files(self):
        """The local files the config names for its cells' models, by config key (for a check at start)."""
        used, files = {c["model"] for c in self.config["cells"]}, {}
        for name, m in ((n, m) for n, m in self.config["models"].items() if n in used):
            if m["source"] == "path":
                files[f"models.{name}.path"] = self.local_path(m["path"])
            if (source := m["quantize"]["calibration"]["source"]) != "expert":
                files[f"models.{name}.quantize.calibration.source"] = source
        return files

    def seed_dirs(self, w, quant, policy):
        return [cell(RUN, w, quant=quant, policy=policy, run=f"seed{s}") for s in self.config["evaluate"]["seeds"]]

    def seed_runs(self, w, quant, policy):
        return [f"{d}/episodes.parquet" for d in self.seed_dirs(w, quant, policy)]

    def env_args(self, w):
        """--env and --env-kwargs; a relative data path is the repository's (for snakemake --directory)."""
        kwargs = dict(self.bench(w)["env_kwargs"])
        if kwargs.get("data") and not os.path.isabs(os.path.expanduser(kwargs["data"])):
            kwargs["data"] = os.path.normpath(os.path.join(self.basedir, kwargs["data"]))
        return f"--env {self.bench(w)['env']} --env-kwargs {as_json(kwargs)}"

    def engine_args(self, w):
        """Backend, decoding and concurrency of the rules that play episodes (rollout, select_rollout, grpo)."""
        d = self.bench(w)["decoding"]
        args = [self.backend, cli_flags({k: d[k] for k in ("max_new_tokens", "temperature", "top_p")})]
        args += [f"--prompt {as_json(self.bench(w)['prompt'])}"] + ["--constrained"] * d["constrained"]
        return " ".join(args + [f"--shards {self.config['evaluate']['shards']}"])

    def data_input(self, w):
        """The benchmark's data manifest, for environments that read downloaded game files (alfworld)."""
        return [DATA.format(**w)] if self.bench(w)["env"] == "alfworld" else []

    def data_need(self, w):
        """--need of the data check: the tasks of each protocol split this config plays."""
        b, cells = self.bench(w), [c for c in self.config["cells"] if c["benchmark"] == w["benchmark"]]
        seeds = max(self.config["evaluate"]["seeds"]) + 1 if b["tasks_per_seed"] == "distinct" else 1
        test, models = b["tasks"]["test"], [self.model_cfg(c) for c in cells]
        # Agent selection (models trained here) plays calibration tasks too.
        select = [m["select"]["tasks"] for m in models if m["source"] == "train" and "select" in m]
        need = {"calib": max([b["tasks"]["calib"], *select]), "test": test if test == "all" else test * seeds}
        need |= {"train": self.kl_end} if any(self.cell_cfg(c)["route"] for c in cells) else {}
        return " ".join(f"{k}={v}" for k, v in need.items())

    def model_dir(self, w, quant="bf16"):
        """HF checkpoint of a cell at one precision: built here, or a local path from the config."""
        if quant == "bf16" and self.model_cfg(w)["source"] == "path":
            return self.local_path(self.model_cfg(w)["path"])
        return cell("{quant}/model", w, quant=quant)

    def built_models(self, w, *precisions):
        """The checkpoints of `precisions` that this workflow builds (local paths are not rule outputs)."""
        return [p for p in (self.model_dir(w, q) for q in precisions) if p.startswith(f"{RESULTS}/")]

    def routed_models(self, w):
        """The built checkpoints a routed scheme's jobs load: bf16 (where built here) and its low precisions."""
        return self.built_models(w, "bf16", *lows(w["quant"]))

    def scheme_budgets(self, w):
        """dmr.calibrate's --budgets: a ladder scheme's are cost shares (route.cost_budgets)."""
        return self.cost_budgets if ladder(w["quant"]) else self.budgets

    def cost_coefficients(self, w):
        """Rule latency's coefficients, where a calibration needs them: a ladder scheme's budgets are shares
        of bf16's modelled cost (dmr.calibrate --coefficients); none for a two-precision router."""
        return [cell(LATENCY, w)] if ladder(w["quant"]) else []

    def model_flags(self, w, *precisions):
        return " ".join(f"--model {q}={self.model_dir(w, q)}" for q in precisions)

    def candidates(self, w):
        """A trained agent's candidates for selection (dmr.select): its snapshots, then the final p1.00."""
        return [f"p{f:.2f}" for f in sorted(self.model_cfg(w).get("select", {}).get("at", []))] + ["p1.00"]

    def expert_episodes(self, w):
        """Episodes of the expert data: the benchmark's tasks.train, the data of an agent trained here; a
        shipped agent's feed only quantization's calibration, which may ask for fewer."""
        m = self.model_cfg(w)
        fewer = m["quantize"]["calibration"].get("episodes") if m["source"] == "path" else None
        return fewer or self.bench(w)["tasks"]["train"]

    def calibration(self, w):
        """Quantization's calibration text as (inputs, flag): the cell's expert episodes, or the config's
        local file, an input once it exists (a change reruns quantization)."""
        source, expert = self.model_cfg(w)["quantize"]["calibration"]["source"], cell(EXPERT, w)
        return ([expert], f"expert:{expert}") if source == "expert" else ([source] * os.path.exists(source), source)

    def run_tasks(self, w):
        """--split, --n, --offset of a run: seed s of a generated pool plays test tasks [s*n, (s+1)*n)."""
        b, seed = self.bench(w), run_seed(w["run"])
        n = b["tasks"]["test"]  # `all` only with tasks_per_seed: same (checked at load)
        test = ("test", n, 0 if n == "all" else seed * n * (b["tasks_per_seed"] == "distinct"))
        split, n, offset = {
            "train": ("train", self.route["kl_tasks"], self.route["kl_offset"]),
            "dagger": ("train", self.route["dagger"]["tasks"], self.kl_end),  # the training tasks after the KL pool's
            "calib": ("calib", b["tasks"]["calib"], 0),
        }.get(w["run"], test)
        return f"--split {split} --n {n} --offset {offset}"

    def routed_steps(self, w, kind="dmr"):
        """Step types a router decides, the others run at bf16 (App. C.1); GRPO's default to KL-ST's."""
        steps = self.bench(w)["router_steps"]
        return " ".join(self.bench(w).get("grpo_router_steps", steps) if kind == "grpo" else steps)

    def router_steps_flag(self, w, kind, default):
        """--router-steps of router KIND only where they differ from the entry point's default, so the
        commands of the other cells stay as they were."""
        steps = self.routed_steps(w, kind)
        return "" if steps == default else f" --router-steps {steps}"

    def router_dir(self, w, kind="dmr"):
        """The KL-ST router (dmr0: of round 0), or the GRPO router of `grpo.lambda` (a directory per lambda)."""
        if kind == "grpo":
            return cell("{quant}/grpo/lam{lam}/router", w, lam=self.grpo_lambda)
        return cell("{quant}/router0" if kind == "dmr0" else "{quant}/router", w)

    def routed_run(self, w, kind, mode, value, pattern=RUN, **values):
        """The steps of a routed run of the cell (policy KIND-MODE VALUE), e.g. the calibration pool's; with
        pattern ABLATION_RUN, that of an ablation variant's router."""
        return f"{cell(pattern, w, policy=format_policy(kind, mode, value), **values)}/steps.parquet"

    def regime_schemes(self, w):
        return self.cell_cfg(w).get("regime") or self.cell_cfg(w)["quants"]

    def regime_inputs(self, w):
        """What dmr.regime reads per scheme: its KL pool and threshold, Full and Quant at every seed, and
        the oracle at K = 0.4 where the scheme is routed and the oracle runs there."""
        oracle = "oracle" in self.route["baselines"] and 0.4 in self.route["baseline_budgets"]
        ins = {"full": self.seed_runs(w, "bf16", "full")}
        for q in self.regime_schemes(w):
            ins[q] = [cell(f"{q}/kl/{f}", w) for f in ("steps.parquet", "threshold.json")] + self.seed_runs(w, q, "quant")
            if oracle and q in self.cell_cfg(w)["route"]:
                ins[q] += self.seed_runs(w, q, format_policy("oracle", "k", 0.4))
        return ins

    def rollout_spec(self, w):
        """A rollout's models and policy as (inputs, dmr.agent flags). The models: those the policy routes
        to, high first. The policy: a learned router (and its calibration at a budget K), a baseline with
        the dmr-kK run it matches (and the KL pool of oracle and uncertainty), or dmr.agent's own (full, quant)."""
        policy, route = w["policy"], self.route
        kind, mode, value = parse_policy(policy)
        precisions = {"full": ["bf16"], "quant": [w["quant"]]}.get(policy, ["bf16", *lows(w["quant"])])
        if ladder(w["quant"]) and (policy in ("quant", "forced") or kind in ("oracle", "uncertainty")):
            raise ValueError(f"{w['quant']}/{policy}: a scheme of several low precisions has DMR, GRPO and random "
                             "routing; Quant and the signal baselines are its schemes' own")
        steps = self.router_steps_flag(w, kind, "action")  # dmr.agent's default
        rd = self.router_dir(w, kind) if kind in ROUTERS else None
        if w.get("variant"):
            # An ablation variant's runs (rule rollout_variant): its own KL-ST router, as the cell's dmr runs.
            if kind != "dmr" or not mode:
                raise ValueError(f"ablation run {w['variant']}/{policy}: a variant plays its KL-ST router, dmr-kK or dmr-tT")
            rd = cell(f"{ABLATION}/router", w)
        if policy == "forced":
            # Only the steps no router decides at bf16 (App. C.1's forced steps): what the rule alone recovers.
            inputs, args = [], f"--policy random:0 --router-steps {self.routed_steps(w)}"
        elif not mode:
            inputs, args = [], f"--policy {policy}"
        elif not rd:
            match = f"{cell(RUN, w, policy=format_policy('dmr', 'k', value))}/episodes.parquet"
            kl = [cell(KL, w)] if kind in ("oracle", "uncertainty") else []
            inputs, args = [match, *kl], f"--policy {kind} --match {match}{''.join(f' --kl {p}' for p in kl)}{steps}"
        elif mode == "t":
            inputs, args = [f"{rd}/router.json"], f"--policy dmr --router {rd} --threshold {value}{steps}"
        elif mode == "c":
            # A two-precision router at a cost budget (dmr.calibrate --by-cost), met by a ladder scheme's
            # routers at the same K; unpaced: the pace holds a share of bf16 steps, not of cost.
            cal = f"{rd}/calibration_cost.json"
            inputs, args = [f"{rd}/router.json", cal], f"--policy dmr --router {rd} --calibration {cal} --budget {value}{steps}"
        else:
            # route.pace: each episode's bf16 steps held to the budget K with `burst` steps ahead of it. The
            # probe run measures each step's true KL (dmr.diagnose); the DAgger run on training tasks.
            # Unpaced for a ladder scheme: its K is a share of bf16's cost, the pace a share of bf16 steps.
            pace = f" --pace {value} --burst {route['pace']['burst']:g}" if route["pace"] and not ladder(w["quant"]) else ""
            probe = " --probe-kl" if w["run"] in ("probe", "dagger") else ""
            # The probe's KL on the pool's block; --kl-block only where it differs from dmr.agent's default.
            probe += f" --kl-block {route['kl_block']}" if probe and route["kl_block"] != "action" else ""
            inputs = [f"{rd}/router.json", f"{rd}/calibration.json"]
            args = f"--policy dmr --router {rd} --calibration {rd}/calibration.json --budget {value}{pace}{steps}{probe}"
        inputs = self.built_models(w, *precisions) + inputs + self.data_input(w)
        return inputs, f"{self.model_flags(w, *precisions)} {args}"

    def table_methods(self, w):
        """A cell's main table: Full; per scheme Quant, where routed DMR, GRPO and the baselines (`NAME@K`),
        and Forced where the benchmark's routers decide only some steps (router_steps other than action):
        every decided step at the scheme, the others at bf16, as the rule alone would play them."""
        route, methods = self.route, {"Full": self.seed_runs(w, "bf16", "full")}
        points = [("dmr", "DMR", route["budgets"])] + [("grpo", "GRPO", route["budgets"])] * ("grpo" in self.config)
        points += [(base, base.capitalize(), route["baseline_budgets"]) for base in route["baselines"]]
        routed = self.cell_cfg(w)["route"]
        for q in self.cell_cfg(w)["quants"]:
            methods[f"{q}/Quant"] = self.seed_runs(w, q, "quant")
            if q in routed and not ladder(q) and self.routed_steps(w) != "action":
                methods[f"{q}/Forced"] = self.seed_runs(w, q, "forced")
            for kind, name, ks in points * (q in routed):
                methods |= {f"{q}/{name}@{k:g}": self.seed_runs(w, q, format_policy(kind, "k", k)) for k in ks}
        # A ladder scheme A+B: its router, GRPO and matched random at each cost budget K, and beside them
        # each two-precision router bf16-A, bf16-B calibrated to the same cost budget (DMR-A@K).
        for q in filter(ladder, routed):
            for kind, name in (p[:2] for p in points if p[0] in ("dmr", "grpo", "random")):
                methods |= {f"{q}/{name}@{k:g}": self.seed_runs(w, q, format_policy(kind, "k", k))
                            for k in route["cost_budgets"]}
            for low in lows(q):
                methods |= {f"{q}/DMR-{low}@{k:g}": self.seed_runs(w, low, format_policy("dmr", "c", k))
                            for k in route["cost_budgets"]}
        return methods

    def latency(self, w):
        """dmr.latency as (inputs, flags): its pool is the single-precision runs, bf16 Full and each Quant."""
        cfg, high = self.config["latency"], self.seed_dirs(w, "bf16", "full")
        runs = {q: self.seed_dirs(w, q, "quant") for q in self.cell_cfg(w)["quants"]}
        inputs = [f"{d}/{f}.parquet" for d in high + sum(runs.values(), []) for f in ("steps", "episodes")]
        args = [f"--high {' '.join(high)}"] + [f"--low {q} {' '.join(r)}" for q, r in runs.items()]
        # latency.coefficients: one set for every cell, or one per cell keyed "benchmark/model" (Table 3).
        coeffs, key = cfg.get("coefficients"), f"{w['benchmark']}/{w['model']}"
        if coeffs and any(isinstance(v, dict) for v in coeffs.values()):
            if key not in coeffs:
                raise ValueError(f"latency.coefficients has per-cell entries but none for {key!r}: {sorted(coeffs)}")
            coeffs = coeffs[key]
        args += [f"--source {cfg['source']}"] + [f"--coefficients {as_json(coeffs)}"] * bool(coeffs)
        args += ["--no-w3-projection"] * (not cfg["w3_projection"]) + [f"--replay {cfg['replay_episodes']}"]
        args += [f"--router-steps {self.routed_steps(w)}", f"--arch {as_json(self.router_arch(w))}"]
        return inputs, " ".join(args + [f"--shards {self.config['evaluate']['shards']}"])

    def router_arch(self, w):
        """The cell's router as the --arch of dmr.klst and dmr.latency: encoder_quant only when not none, so
        the commands of fp32-encoder routers are what they were before the option existed."""
        return {k: v for k, v in self.router_cfg(w).items() if (k, v) != ("encoder_quant", "none")}

    def ablation_router(self, w, variant):
        """A variant's router: with the cell's own setting the cell's router, unless `ablation.train` differs:
        then the variant `base`, trained once more on that budget, so every point had the same training."""
        r = self.router_cfg(w)
        # An encoder variant has its own window (text 50, proposal 1): the cell's router only where they agree.
        same = r["window"] == (50 if r["encoder"] == "text" else 1)
        if variant in (f"depth{r['layers']}", "tau-auto", "steps-ao") or (same and variant == f"encoder-{r['encoder']}"):
            if self.ablation_train == self.route["train"]:
                return self.router_dir(w)
            variant = "base"
        return cell("{quant}/ablation/{variant}/router", w, variant=variant)

    def ablation_online(self, w):
        """dmr.ablation's online runs as (inputs, flags): at each budget K of route.ablation.online, the cell's
        DMR@K (`--reference K RUN...`) and each variant's routed runs on the same seeds and tasks
        (`--online VARIANT K RUN...`), beside the variant's router; a variant that is the cell's router plays
        the cell's own DMR runs. None with online.seeds 0 (offline only)."""
        inputs, args = [], []
        for k in self.ablation_budgets * bool(self.ablation_seeds):
            policy, runs = format_policy("dmr", "k", k), {}
            for name, router in [(None, self.router_dir(w))] + [(v, self.ablation_router(w, v)) for v in self.ablation_variants]:
                runs[name] = [f"{os.path.dirname(router)}/rollouts/{policy}/seed{s}" for s in self.ablation_seeds]
                inputs += [f"{d}/episodes.parquet" for d in runs[name]]
            args += [f"--reference {k:g} {' '.join(runs.pop(None))}"]
            args += [f"--online {v} {k:g} {' '.join(dirs)}" for v, dirs in runs.items()]
        return list(dict.fromkeys(inputs)), " ".join(args)

    def klst_args(self, w):
        """dmr.klst's router options: the cell's, or an ablation variant's with its one change."""
        variant, arch, steps = w.get("variant") or "", self.router_arch(w), self.routed_steps(w)
        extra = [f"--tau-point {variant[len('tau-'):]}" if variant.startswith("tau-") else ""] * bool(variant)
        if variant.startswith("depth"):
            arch["layers"] = int(variant[len("depth") :])
        elif variant == "steps-as":
            steps = f"all --labels-summary {cell(LABELS, w)} --label-set as"
        elif variant.startswith("encoder-"):
            # The paper's router reads the last 50 step texts; the proposal router the current step.
            arch["encoder"] = variant[len("encoder-") :]
            arch["window"] = 50 if arch["encoder"] == "text" else 1
        train = self.ablation_train if variant else self.route["train"]
        return " ".join([f"--step-types {steps}", f"--arch {as_json(arch)}", *extra, cli_flags(train)])

    def cell_targets(self, w=None):
        """Each cell's main table (which pulls in the runs), the KL-ST figures, labels and diagnosis of its
        routed schemes, and with GRPO its curves, average ranks (none without a routed scheme) and latency."""
        targets = []
        for c, routed in ((c, self.cell_cfg(c)["route"]) for c in self.config["cells"]):
            # A ladder scheme's KL pools, labels and diagnosis are those of its low precisions.
            single = [q for q in routed if not ladder(q)]
            names = {False: ("kl_hist", "router_scores", "kl_step_types"), True: ("router_scores",)}
            figures = [f"figures/{n}_{q}.png" for q in routed for n in names[ladder(q)]]
            paths = ["tables/main.md"] + figures + [f"{q}/kl/labels.parquet" for q in single]
            paths += [f"tables/diagnose_{q}.md" for q in single]
            if "grpo" in self.config:
                paths += [f"figures/grpo_curve_{q}_lam{self.grpo_lambda}.png" for q in routed]
                paths += ["tables/rank.md"] * bool(routed) + ["tables/latency.md"]
            targets += [cell(p, c) for p in paths]
        return targets
