# Rollouts of one precision policy (test seeds, the KL pool, the calibration pool), and the tables.


rule rollout:
    input:
        rollout_inputs,
    output:
        episodes=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/rollouts/{{policy}}/{{run}}/episodes.parquet",
        steps=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/rollouts/{{policy}}/{{run}}/steps.parquet",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/rollout_{{quant}}_{{policy}}_{{run}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/rollout/rollout_{{quant}}_{{policy}}_{{run}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("rollout", THREADS),
    params:
        env=lambda w: bench(w)["env"],
        env_kwargs=lambda w: as_json(env_kwargs(w)),
        split=run_split,
        n=run_n,
        offset=run_offset,
        seed=run_seed,
        models=rollout_models,
        policy=policy_args,
        backend=config["backend"]["name"],
        backend_kwargs=as_json(config["backend"].get("kwargs")),
        decoding=decoding_args,
        shards=config["evaluate"].get("shards", 16),
        out=lambda w: run_dir(w.benchmark, w.model, w.quant, w.policy, w.run),
    shell:
        # The JSONL in the run directory is not a declared output, so a killed job keeps it and resumes.
        "python -m dmr.agent --env {params.env} --env-kwargs {params.env_kwargs} --split {params.split} "
        "--n {params.n} --offset {params.offset} {params.models} {params.policy} "
        "--backend {params.backend} --backend-kwargs {params.backend_kwargs} "
        "{params.decoding} --shards {params.shards} --seed {params.seed} --out {params.out} > {log} 2>&1"


rule evaluate:
    input:
        runs=table_inputs,
        latency=coefficients,
    output:
        table=f"{RESULTS}/{{benchmark}}/{{model}}/tables/main.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/tables/main.md",
        latex=f"{RESULTS}/{{benchmark}}/{{model}}/tables/main.tex",
        html=report(
            f"{RESULTS}/{{benchmark}}/{{model}}/tables/main.html",
            caption="../report/table.rst",
            category="Table 1",
            subcategory="{benchmark}/{model}",
            labels={"result": "Table 1"},
        ),
        pareto=report(
            f"{RESULTS}/{{benchmark}}/{{model}}/figures/pareto.png",
            caption="../report/pareto.rst",
            category="Table 1",
            subcategory="{benchmark}/{model}",
            labels={"result": "Pareto"},
        ),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/evaluate.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/evaluate/evaluate.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("evaluate"),
    params:
        methods=table_args,
    shell:
        "python -m dmr.evaluate --cell {wildcards.benchmark}/{wildcards.model} {params.methods} "
        "--out {output.table} --markdown {output.markdown} --latex {output.latex} --html {output.html} "
        "--pareto {output.pareto} --latency {input.latency} > {log} 2>&1"


rule summary:
    # What the README quotes: the claim per cell, Table 1, figure links and per-rule timing.
    input:
        tables=summary_inputs,
    output:
        markdown=f"{RESULTS}/summary.md",
        timing=f"{RESULTS}/timing.parquet",
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/summary/summary.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("summary"),
    params:
        cells=" ".join(f"--cell {c['benchmark']}/{c['model']}" for c in config["cells"]),
        results=lambda w, output: os.path.dirname(output.markdown),
        # Snakemake's provenance records of the working directory: the DAG and each job's times.
        metadata=os.path.join(".snakemake", "metadata"),
    shell:
        "python -m dmr.summary --results {params.results} {params.cells} --out {output.markdown} "
        "--timing {output.timing} --metadata {params.metadata} > {log} 2>&1"
