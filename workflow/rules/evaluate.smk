# Rollouts of one precision policy, and the evaluation tables.


rule rollout:
    input:
        rollout_inputs,
    output:
        episodes=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/rollouts/{{policy}}/seed{{seed}}/episodes.parquet",
        steps=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/rollouts/{{policy}}/seed{{seed}}/steps.parquet",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/rollout_{{quant}}_{{policy}}_seed{{seed}}.log",
    params:
        env=lambda w: bench(w)["env"],
        env_kwargs=lambda w: as_json(bench(w).get("env_kwargs")),
        n=lambda w: bench(w)["tasks"]["test"],
        offset=task_offset,
        models=rollout_models,
        backend=config["backend"]["name"],
        backend_kwargs=as_json(config["backend"].get("kwargs")),
        decoding=decoding_args,
        shards=config["evaluate"].get("shards", 16),
        out=lambda w: run_dir(w.benchmark, w.model, w.quant, w.policy, w.seed),
    threads: THREADS
    conda:
        "../../envs/cpu.yaml"
    shell:
        # The JSONL in the run directory is not a declared output, so a killed job keeps it and resumes.
        "python -m dmr.agent --env {params.env} --env-kwargs {params.env_kwargs} --split test "
        "--n {params.n} --offset {params.offset} {params.models} "
        "--policy {wildcards.policy} --backend {params.backend} --backend-kwargs {params.backend_kwargs} "
        "{params.decoding} --shards {params.shards} --seed {wildcards.seed} --out {params.out} > {log} 2>&1"


rule evaluate:
    input:
        table_inputs,
    output:
        table=f"{RESULTS}/{{benchmark}}/{{model}}/tables/main.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/tables/main.md",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/evaluate.log",
    params:
        methods=table_args,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m dmr.evaluate --cell {wildcards.benchmark}/{wildcards.model} {params.methods} "
        "--out {output.table} --markdown {output.markdown} > {log} 2>&1"
