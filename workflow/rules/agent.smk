# The tiny agent of the embedded default: expert data -> tokenizer -> behaviour cloning.


rule expert_data:
    input:
        flags.data_input,
    output:
        cell(EXPERT),
    log:
        cell("logs/expert_data.log"),
    benchmark:
        cell("benchmarks/expert_data/expert_data.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("expert_data", config["threads"]),
    params:
        env=flags.env_args,
        n=flags.expert_episodes,
        # noise and clean_fraction first, then repeat and invalid where set, so commands stay as they were.
        expert=lambda w: cli_flags(dict.fromkeys(["noise", "clean_fraction"]) | flags.model_cfg(w)["expert"]),
        # blocks are played on the rule's threads; one stream (no block) plays in one process
        workers=lambda w, threads: f" --workers {threads}" if "block" in flags.model_cfg(w)["expert"] else "",
    shell:
        "python -m dmr.expert {params.env} --episodes {params.n} "
        "{params.expert}{params.workers} --out {output} > {log} 2>&1"


rule tokenizer:
    input:
        rules.expert_data.output,
    output:
        directory(cell("tokenizer")),
    log:
        cell("logs/tokenizer.log"),
    benchmark:
        cell("benchmarks/tokenizer/tokenizer.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("tokenizer"),
    params:
        prompt=lambda w: as_json(flags.bench(w)["prompt"]),
        tokenizer=lambda w: cli_flags(flags.model_cfg(w)["tokenizer"]),
    shell:
        "python -m dmr.tokenizer --episodes {input} --prompt {params.prompt} {params.tokenizer} "
        "--out {output} > {log} 2>&1"


rule train_agent:
    input:
        episodes=rules.expert_data.output,
        tokenizer=rules.tokenizer.output,
    output:
        # p1.00 is the final model; p0.XX the snapshots that agent selection compares with it.
        directory(cell("train")),
    log:
        cell("logs/train_agent.log"),
    benchmark:
        cell("benchmarks/train_agent/train_agent.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("train_agent", config["threads"]),
    params:
        prompt=lambda w: as_json(flags.bench(w)["prompt"]),
        arch=lambda w: as_json(flags.model_cfg(w)["arch"]),
        train=lambda w: cli_flags(flags.model_cfg(w)["train"]),
        # Snapshot flags only with selection, so the commands of configs without it stay as they were.
        snapshots=lambda w, output: (
            f" --snapshot-at {','.join(map(str, sorted(flags.model_cfg(w)['select']['at'])))} --snapshots {output[0]}"
            if "select" in flags.model_cfg(w)
            else ""
        ),
    shell:
        "python -m dmr.tiny_agent --episodes {input.episodes} --tokenizer {input.tokenizer} "
        "--prompt {params.prompt} --arch {params.arch} {params.train} --threads {threads}{params.snapshots} "
        "--out {output}/p1.00 > {log} 2>&1"


# A candidate's run of the calibration tasks (selection never sees the test split): rule rollout with
# the candidate's checkpoint at full precision, seed 0.
use rule rollout as select_rollout with:
    input:
        train=rules.train_agent.output,
        data=flags.data_input,
    output:
        episodes=cell("select/{candidate}/episodes.parquet"),
    log:
        cell("logs/select_rollout_{candidate}.log"),
    benchmark:
        cell("benchmarks/select_rollout/select_rollout_{candidate}.tsv")
    resources:
        **flags.resources("select_rollout", config["threads"]),
    params:
        tasks=lambda w: f"--split calib --n {flags.model_cfg(w)['select']['tasks']} --offset 0",
        policy=lambda w, input: f"--model bf16={input.train}/{w.candidate} --policy full",
        seed=0,


rule select_agent:
    input:
        train=rules.train_agent.output,
        # Calibration runs of the candidates; one candidate needs none.
        runs=lambda w: [rules.select_rollout.output[0].format(**w, candidate=c) for c in flags.candidates(w)]
        * (len(flags.candidates(w)) > 1),
    output:
        model=directory(cell("bf16/model")),
        table=cell("tables/select.parquet"),
        markdown=cell("tables/select.md"),
    log:
        cell("logs/select_agent.log"),
    benchmark:
        cell("benchmarks/select_agent/select_agent.tsv")
    # Compares tables and copies a small checkpoint: no cluster job for that.
    localrule: True
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("select_agent"),
    params:
        candidates=lambda w, input: " ".join(f"--candidate {c}={input.train}/{c}" for c in flags.candidates(w)),
        runs=lambda w, input: " ".join(f"--run {os.path.basename(d)}={d}" for d in map(os.path.dirname, input.runs)),
    shell:
        "python -m dmr.select {params.candidates} {params.runs} --out {output.model} "
        "--table {output.table} > {log} 2>&1"


rule agent_card:
    # The selected agent as a shippable artefact (dmr.card): weights, tokenizer and model card.
    input:
        model=rules.select_agent.output.model,
        train=rules.train_agent.output,
        select=rules.select_agent.output.table,
        full=lambda w: flags.seed_runs(w, "bf16", "full"),
    output:
        directory(cell("card")),
    log:
        cell("logs/agent_card.log"),
    benchmark:
        cell("benchmarks/agent_card/agent_card.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("agent_card"),
    params:
        recipe=lambda w: as_json({k: WRITTEN[f"{k}s"][w[k]] for k in ("model", "benchmark")}),
        configs=" ".join(CONFIGFILES),
    shell:
        "python -m dmr.card build --name {wildcards.model} --benchmark {wildcards.benchmark} "
        "--model {input.model} --train-metrics {input.train}/p1.00/train_metrics.json "
        "--select-table {input.select} --full {input.full} --recipe {params.recipe} --configs {params.configs} "
        "--out {output} > {log} 2>&1"


rule agents:
    input:
        agent_cards,
    log:
        f"{RESULTS}/logs/agents.log",
    benchmark:
        f"{RESULTS}/benchmarks/agents/agents.tsv"
    # `make agents`: rebuild every trained agent of the config and install its card under agents/.
    localrule: True
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m dmr.card install {input} --to agents > {log} 2>&1"
