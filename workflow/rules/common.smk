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


def model_input(wildcards):
    """Rule input for a checkpoint: only results we build are Snakemake inputs."""
    path = model_dir(wildcards.benchmark, wildcards.model, wildcards.get("quant", "bf16"))
    return [path] if path.startswith(f"{RESULTS}/") else []


def task_offset(wildcards):
    b = bench(wildcards)
    n = b["tasks"]["test"]
    return int(wildcards.seed) * n if b.get("tasks_per_seed", "distinct") == "distinct" else 0


def decoding_args(wildcards):
    d = bench(wildcards)["decoding"]
    args = [f"--max-new-tokens {d.get('max_new_tokens', 32)}", f"--temperature {d.get('temperature', 0.0)}",
            f"--top-p {d.get('top_p', 1.0)}", f"--window {bench(wildcards)['prompt']['window']}"]
    if d.get("constrained", False):
        args.append("--constrained")
    return " ".join(args)


def run_dir(benchmark, model, quant, policy, seed):
    return f"{RESULTS}/{benchmark}/{model}/{quant}/rollouts/{policy}/seed{seed}"


def full_runs(wildcards):
    return [f"{run_dir(wildcards.benchmark, wildcards.model, 'bf16', 'full', s)}/episodes.parquet"
            for s in config["evaluate"]["seeds"]]


def all_targets():
    return [f"{RESULTS}/{c['benchmark']}/{c['model']}/tables/full.md" for c in config["cells"]]
