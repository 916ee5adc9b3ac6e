import json
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


_check_cells()

wildcard_constraints:
    benchmark="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_.-]+",
    quant="[A-Za-z0-9_]+",
    policy="[A-Za-z0-9_.:-]+",
    seed=r"\d+",


def bench(wildcards):
    return config["benchmarks"][wildcards.benchmark]


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
    path = model_dir(wildcards.benchmark, wildcards.model, "bf16")
    return [path] if path.startswith(f"{RESULTS}/") else []


def task_offset(wildcards):
    b = bench(wildcards)
    n = b["tasks"]["test"]
    return int(wildcards.seed) * n if b.get("tasks_per_seed", "distinct") == "distinct" else 0


def decoding_args(wildcards):
    d = bench(wildcards)["decoding"]
    args = [f"--max-new-tokens {d.get('max_new_tokens', 32)}", f"--temperature {d.get('temperature', 0.0)}",
            f"--top-p {d.get('top_p', 1.0)}", f"--prompt {as_json(bench(wildcards)['prompt'])}"]
    if d.get("constrained", False):
        args.append("--constrained")
    return " ".join(args)


def run_dir(benchmark, model, quant, policy, seed):
    return f"{RESULTS}/{benchmark}/{model}/{quant}/rollouts/{policy}/seed{seed}"


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


def rollout_inputs(wildcards):
    paths = [model_dir(wildcards.benchmark, wildcards.model, q) for q in rollout_precisions(wildcards)]
    return [p for p in paths if p.startswith(f"{RESULTS}/")]


def seed_runs(benchmark, model, quant, policy):
    return [f"{run_dir(benchmark, model, quant, policy, s)}/episodes.parquet" for s in config["evaluate"]["seeds"]]


def table_methods(wildcards):
    """Methods of a cell's main table: Full, then the always-quantized baseline of each scheme."""
    methods = {"Full": seed_runs(wildcards.benchmark, wildcards.model, "bf16", "full")}
    for q in cell_quants(wildcards.benchmark, wildcards.model):
        methods[f"{q}/Quant"] = seed_runs(wildcards.benchmark, wildcards.model, q, "quant")
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


def all_targets():
    return [f"{RESULTS}/{c['benchmark']}/{c['model']}/tables/main.md" for c in config["cells"]]
