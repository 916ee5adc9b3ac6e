# Rollouts of one precision policy (test seeds, the KL pool, the calibration pool), and the tables.


rule rollout:
    input:
        lambda w: flags.rollout_spec(w)[0],
    output:
        episodes=cell(f"{RUN}/episodes.parquet"),
        steps=cell(f"{RUN}/steps.parquet"),
    log:
        cell("logs/rollout_{quant}_{policy}_{run}.log"),
    benchmark:
        cell("benchmarks/rollout/rollout_{quant}_{policy}_{run}.tsv")
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("rollout", config["threads"]),
    params:
        env=flags.env_args,
        tasks=flags.run_tasks,
        policy=lambda w: flags.rollout_spec(w)[1],
        engine=flags.engine_args,
        seed=lambda w: run_seed(w.run),
        out=lambda w, output: os.path.dirname(output.episodes),
    shell:
        # The JSONL in the run directory is not a declared output, so a killed job keeps it and resumes.
        "python -m dmr.agent {params.env} {params.tasks} {params.policy} "
        "{params.engine} --seed {params.seed} --out {params.out} > {log} 2>&1"


rule evaluate:
    input:
        runs=lambda w: [p for paths in flags.table_methods(w).values() for p in paths],
        # Eq. 9 counts each episode's router calls from its steps (dmr.latency.router_calls).
        steps=lambda w: [
            p.replace("episodes.parquet", "steps.parquet") for paths in flags.table_methods(w).values() for p in paths
        ],
        latency=lambda w: rules.latency.output.coefficients.format(**w),
    output:
        table=cell("tables/main.parquet"),
        markdown=cell("tables/main.md"),
        latex=cell("tables/main.tex"),
        # Measured wall time, out of Table 1 so that two runs of the same episodes write it byte for byte.
        wall_time=cell("tables/wall_time.parquet"),
        wall_time_md=cell("tables/wall_time.md"),
        html=report_cell("tables/main.html", "table.rst", "Table 1", result="Table 1"),
        pareto=report_cell("figures/pareto.png", "pareto.rst", "Table 1", result="Pareto"),
    log:
        cell("logs/evaluate.log"),
    benchmark:
        cell("benchmarks/evaluate/evaluate.tsv")
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("evaluate"),
    params:
        methods=lambda w: " ".join(
            f"--method {name} {' '.join(paths)}" for name, paths in flags.table_methods(w).items()
        ),
    shell:
        "python -m dmr.evaluate --cell {wildcards.benchmark}/{wildcards.model} {params.methods} "
        "--out {output.table} --markdown {output.markdown} --latex {output.latex} --html {output.html} "
        "--pareto {output.pareto} --wall-time {output.wall_time} --latency {input.latency} > {log} 2>&1"


rule summary:
    # What the README quotes: the claim per cell, Table 1, figure links and per-rule timing.
    input:
        tables=flags.cell_targets,
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
        **flags.resources("summary"),
    params:
        cells=" ".join(f"--cell {c['benchmark']}/{c['model']}" for c in config["cells"]),
        results=lambda w, output: os.path.dirname(output.markdown),
        # Snakemake's provenance records of the working directory: the DAG and each job's times.
        metadata=os.path.join(".snakemake", "metadata"),
    shell:
        "python -m dmr.summary --results {params.results} {params.cells} --out {output.markdown} "
        "--timing {output.timing} --metadata {params.metadata} > {log} 2>&1"
