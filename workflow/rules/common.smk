import copy
import os
import shlex
import subprocess
import sys

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# The config as job paths and flags: a plain module (workflow/lib/flags.py), tested without Snakemake.
sys.path.insert(0, os.path.join(workflow.basedir, "workflow", "lib"))
from flags import (
    ABLATION,
    ABLATION_RUN,
    DATA,
    EXPERT,
    KL,
    LABELS,
    LATENCY,
    RESULTS,
    RUN,
    Flags,
    as_json,
    cell,
    cli_flags,
    ladder,
    lows,
    run_seed,
)

# Defaults live in the schema: validation fills them in. An agent card's recipe is the config as written.
WRITTEN = copy.deepcopy(config)
# The config files of this run as given (the Snakefile's own default without --configfile), named on cards.
CONFIGFILES = [
    f if (r := os.path.relpath(f)).startswith("..") else r
    for f in map(str, workflow.overwrite_configfiles or ["config/config.yaml"])
]
SCHEMA = os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
validate(config, schema=SCHEMA)
# A quantization scheme's name, as the schema spells it (quantize.smk's wildcard constraint).
with open(SCHEMA) as f:
    SCHEME = yaml.safe_load(f)["$defs"]["scheme"]["pattern"].strip("^$")
# The rules' paths and flags (flags.METHOD); it checks what the schema cannot say.
flags = Flags(config, workflow.basedir)

# Jobs run `python -m dmr.<stage>` from this checkout, with or without an installed package,
# locally and on cluster nodes alike.
shell.prefix(f'export PYTHONPATH="{workflow.basedir}:$PYTHONPATH"; ')


def on_start():
    """On start of a real run (not -n, --lint, --touch): a missing local file of the config fails here, not in
    a job hours later; then dmr.progress reports the rollouts in flight every `progress_every` seconds."""
    missing = {k: p for k, p in flags.local_files().items() if not os.path.exists(p)}
    if missing and not workflow.touch:
        raise WorkflowError(
            "missing local files named in the config: " + "; ".join(f"{k} = {p!r}" for k, p in missing.items())
        )
    if not config["progress_every"] or workflow.touch:
        return
    env = {**os.environ, "PYTHONPATH": f"{workflow.basedir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--results", RESULTS, "--every", str(config["progress_every"]), "--pid", str(os.getpid())]
    subprocess.Popen([sys.executable, "-m", "dmr.progress", *args], env=env, stdout=sys.stderr, stderr=sys.stderr)


wildcard_constraints:
    benchmark="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_.-]+",
    # A scheme, or a ladder of schemes A+B routed by one router (flags.lows).
    quant=r"[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*",
    candidate="p[0-9][.][0-9]+",
    policy="[A-Za-z0-9_.:-]+",
    run=r"seed\d+|train|calib|probe|dagger",
    stage=r"router0?",
    variant=r"base|depth\d+|tau-[a-z-]+|steps-(ao|as)|encoder-(text|proposal)",
    lam=r"[0-9.]+",


def report_cell(path, caption, category, **labels):
    """A cell's output shown in the HTML report (`snakemake --report`): under its category, one
    subcategory per cell, with its caption (workflow/report/CAPTION) and labels."""
    return report(
        cell(path),
        caption=f"../report/{caption}",
        category=category,
        subcategory="{benchmark}/{model}",
        labels=labels,
    )


def agent_cards(w):
    """Cards of the agents this config trains (`make agents`); none where every model is a path."""
    cards = [cell("card", c) for c in config["cells"] if config["models"][c["model"]]["source"] == "train"]
    if not cards:
        raise WorkflowError("no agent to build: every model is a local path (`make agents` adds config/agents.yaml)")
    return list(dict.fromkeys(cards))


def all_targets():
    """The default target (once all rules are included): every cell's, then the summary, written last."""
    if unknown := set(config["resources"]) - {"default"} - {r.name for r in workflow.rules}:
        names = sorted(r.name for r in workflow.rules)
        raise ValueError(f"resources: {sorted(unknown)} are not rules of this workflow; its rules are {names}")
    return flags.cell_targets() + [f"{RESULTS}/summary.md"]
