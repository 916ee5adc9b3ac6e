# The tiny agent of the embedded default: expert data -> tokenizer -> behaviour cloning.


rule expert_data:
    input:
        data_input,
    output:
        f"{RESULTS}/{{benchmark}}/{{model}}/bc/episodes.jsonl",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/expert_data.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/expert_data/expert_data.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("expert_data"),
    params:
        env=lambda w: bench(w)["env"],
        env_kwargs=lambda w: as_json(env_kwargs(w)),
        n=lambda w: bench(w)["tasks"]["train"],
        noise=lambda w: model_cfg(w).get("expert", {}).get("noise", 0.2),
        clean=lambda w: model_cfg(w).get("expert", {}).get("clean_fraction", 0.5),
        # Only when set, so the commands of configs without it stay as they were.
        repeat=lambda w: "".join(
            f" --{k} {v}" for k, v in model_cfg(w).get("expert", {}).items() if k in ("repeat", "invalid")
        ),
    shell:
        "python -m dmr.expert --env {params.env} --env-kwargs {params.env_kwargs} --episodes {params.n} "
        "--noise {params.noise} --clean-fraction {params.clean}{params.repeat} --out {output} > {log} 2>&1"


rule tokenizer:
    input:
        rules.expert_data.output,
    output:
        directory(f"{RESULTS}/{{benchmark}}/{{model}}/tokenizer"),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/tokenizer.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/tokenizer/tokenizer.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("tokenizer"),
    params:
        prompt=lambda w: as_json(bench(w)["prompt"]),
        vocab=lambda w: model_cfg(w).get("tokenizer", {}).get("vocab_size", 1024),
    shell:
        "python -m dmr.tokenizer --episodes {input} --prompt {params.prompt} --vocab-size {params.vocab} "
        "--out {output} > {log} 2>&1"


rule train_agent:
    input:
        episodes=rules.expert_data.output,
        tokenizer=rules.tokenizer.output,
    output:
        # p1.00 is the final model; p0.XX the snapshots that agent selection compares with it.
        directory(f"{RESULTS}/{{benchmark}}/{{model}}/train"),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/train_agent.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/train_agent/train_agent.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("train_agent", THREADS),
    params:
        prompt=lambda w: as_json(bench(w)["prompt"]),
        arch=lambda w: as_json(model_cfg(w).get("arch")),
        train=lambda w: cli_flags(model_cfg(w).get("train")),
        snapshots=snapshot_args,
    shell:
        "python -m dmr.tiny_agent --episodes {input.episodes} --tokenizer {input.tokenizer} "
        "--prompt {params.prompt} --arch {params.arch} {params.train} --threads {threads}{params.snapshots} "
        "--out {output}/p1.00 > {log} 2>&1"


rule select_rollout:
    input:
        train=rules.train_agent.output,
        data=data_input,
    output:
        f"{RESULTS}/{{benchmark}}/{{model}}/select/{{candidate}}/episodes.parquet",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/select_rollout_{{candidate}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/select_rollout/select_rollout_{{candidate}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("select_rollout", THREADS),
    params:
        env=lambda w: bench(w)["env"],
        env_kwargs=lambda w: as_json(env_kwargs(w)),
        n=lambda w: model_cfg(w)["select"]["tasks"],
        backend=config["backend"]["name"],
        backend_kwargs=as_json(config["backend"].get("kwargs")),
        decoding=decoding_args,
        shards=config["evaluate"].get("shards", 16),
        out=lambda w: f"{RESULTS}/{w.benchmark}/{w.model}/select/{w.candidate}",
    shell:
        # Calibration tasks only: selection never sees the test split.
        "python -m dmr.agent --env {params.env} --env-kwargs {params.env_kwargs} --split calib "
        "--n {params.n} --offset 0 --model bf16={input.train}/{wildcards.candidate} --policy full "
        "--backend {params.backend} --backend-kwargs {params.backend_kwargs} "
        "{params.decoding} --shards {params.shards} --seed 0 --out {params.out} > {log} 2>&1"


rule select_agent:
    input:
        train=rules.train_agent.output,
        runs=select_runs,
    output:
        model=directory(f"{RESULTS}/{{benchmark}}/{{model}}/bf16/model"),
        table=f"{RESULTS}/{{benchmark}}/{{model}}/tables/select.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/tables/select.md",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/select_agent.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/select_agent/select_agent.tsv"
    # Compares tables and copies a small checkpoint: no cluster job for that.
    localrule: True
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("select_agent"),
    params:
        candidates=lambda w: " ".join(
            f"--candidate {c}={RESULTS}/{w.benchmark}/{w.model}/train/{c}" for c in candidates(w)
        ),
        runs=lambda w, input: " ".join(f"--run {Path(r).parent.name}={Path(r).parent}" for r in input.runs),
    shell:
        "python -m dmr.select {params.candidates} {params.runs} --out {output.model} "
        "--table {output.table} > {log} 2>&1"


rule agent_card:
    # The selected agent as a shippable artefact (dmr.card): weights, tokenizer and model card.
    input:
        model=rules.select_agent.output.model,
        train=rules.train_agent.output,
        select=rules.select_agent.output.table,
        full=lambda w: seed_runs(w.benchmark, w.model, "bf16", "full"),
    output:
        directory(f"{RESULTS}/{{benchmark}}/{{model}}/card"),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/agent_card.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/agent_card/agent_card.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("agent_card"),
    params:
        recipe=lambda w: as_json({"model": model_cfg(w), "benchmark": bench(w)}),
    shell:
        "python -m dmr.card build --name {wildcards.model} --benchmark {wildcards.benchmark} "
        "--model {input.model} --train-metrics {input.train}/p1.00/train_metrics.json "
        "--select-table {input.select} --full {input.full} --recipe {params.recipe} --out {output} > {log} 2>&1"


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
