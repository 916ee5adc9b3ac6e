# KL-ST (paper Sec. 4.2): step KL on bf16 rollouts of the training pool -> threshold tau -> router
# trained on 1[KL > tau] -> deployment thresholds calibrated on the calibration pool.


rule kl:
    input:
        pool=f"{RESULTS}/{{benchmark}}/{{model}}/bf16/rollouts/full/train/steps.parquet",
        models=kl_models,
    output:
        f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/kl/steps.parquet",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/kl_{{quant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/kl/kl_{{quant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("kl", THREADS),
    params:
        pool=lambda w: run_dir(w.benchmark, w.model, "bf16", "full", "train"),
        high=lambda w: model_dir(w.benchmark, w.model, "bf16"),
        low=lambda w: model_dir(w.benchmark, w.model, w.quant),
        backend=config["backend"]["name"],
        backend_kwargs=as_json(config["backend"].get("kwargs")),
        batch=config["evaluate"].get("shards", 16),
    shell:
        "python -m dmr.kl --rollout {params.pool} --high {params.high} --low {params.low} --quant {wildcards.quant} "
        "--backend {params.backend} --backend-kwargs {params.backend_kwargs} --batch {params.batch} "
        "--out {output} > {log} 2>&1"


rule threshold:
    input:
        rules.kl.output,
    output:
        threshold=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/kl/threshold.json",
        sweep=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/kl/sweep.parquet",
        figure=report(
            f"{RESULTS}/{{benchmark}}/{{model}}/figures/kl_hist_{{quant}}.png",
            caption="../report/kl_hist.rst",
            category="KL-ST",
            subcategory="{benchmark}/{model}",
            labels={"result": "KL histogram", "scheme": "{quant}"},
        ),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/threshold_{{quant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/threshold/threshold_{{quant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("threshold"),
    params:
        steps=lambda w: " ".join(routed_steps(w)),
        rule=lambda w: cli_flags(route_cfg().get("threshold")),
    shell:
        "python -m dmr.threshold --kl {input} --step-types {params.steps} {params.rule} "
        "--out {output.threshold} --sweep {output.sweep} --figure {output.figure} > {log} 2>&1"


rule labels:
    input:
        rules.kl.output,
    output:
        labels=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/kl/labels.parquet",
        summary=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/kl/labels.json",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/labels_{{quant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/labels/labels_{{quant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("labels"),
    params:
        rule=lambda w: cli_flags(route_cfg().get("threshold")),
        steps=lambda w: " ".join(routed_steps(w)),
    shell:
        "python -m dmr.labels --kl {input} --action-types {params.steps} {params.rule} --out {output.labels} --summary {output.summary} > {log} 2>&1"


rule klst:
    # stage `router` is the cell's router; `router0` the round-0 router whose routed run of training
    # tasks gives the states `router` adds to its data when route.dagger.tasks > 0 (dmr.klst --dagger).
    input:
        kl=rules.kl.output,
        threshold=rules.threshold.output.threshold,
        llm=bf16_input,
        # The proposal encoder replays the KL pool's rollout with the low model.
        pool=rules.kl.input.pool,
        models=kl_models,
        dagger=dagger_runs,
    output:
        router=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/{{stage}}/router.json",
        weights=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/{{stage}}/router.pt",
        metrics=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/{{stage}}/metrics.json",
        scores=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/{{stage}}/train_scores.parquet",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/klst_{{quant}}_{{stage}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/klst/klst_{{quant}}_{{stage}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: THREADS
    resources:
        **rule_resources("klst", THREADS),
    params:
        steps=lambda w: " ".join(routed_steps(w)),
        llm=lambda w: model_dir(w.benchmark, w.model, "bf16"),
        arch=as_json(route_cfg().get("router")),
        train=cli_flags(route_cfg().get("train")),
        pool=lambda w: run_dir(w.benchmark, w.model, "bf16", "full", "train"),
        low=lambda w: model_dir(w.benchmark, w.model, w.quant),
        dagger=dagger_arg,
        out=lambda w, output: os.path.dirname(output.router),
    shell:
        "python -m dmr.klst --kl {input.kl} --threshold {input.threshold} --precisions bf16 {wildcards.quant} "
        "--llm {params.llm} --step-types {params.steps} --arch {params.arch} {params.train} "
        "--rollout {params.pool} --low {params.low}{params.dagger} --out {params.out} > {log} 2>&1"


rule calibrate:
    input:
        run=lambda w: f"{run_dir(w.benchmark, w.model, w.quant, calib_policy(w), 'calib')}/steps.parquet",
        scores=rules.klst.output.scores,
    output:
        calibration=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/{{stage}}/calibration.json",
        figure=report(
            f"{RESULTS}/{{benchmark}}/{{model}}/figures/{{stage}}_scores_{{quant}}.png",
            caption="../report/router_scores.rst",
            category="KL-ST",
            subcategory="{benchmark}/{model}",
            labels={"result": "{stage} scores", "scheme": "{quant}"},
        ),
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/calibrate_{{quant}}_{{stage}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/calibrate/calibrate_{{quant}}_{{stage}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("calibrate"),
    params:
        run=lambda w, input: os.path.dirname(input.run),
        budgets=" ".join(f"{k:g}" for k in route_cfg().get("budgets", [0.2, 0.4, 0.7])),
    shell:
        "python -m dmr.calibrate --run {params.run} --train-scores {input.scores} --budgets {params.budgets} "
        "--out {output.calibration} --figure {output.figure} > {log} 2>&1"


rule step_types:
    input:
        kl=rules.kl.output,
        threshold=rules.threshold.output.threshold,
    output:
        table=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/kl/step_types.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/kl/step_types.md",
        figure=f"{RESULTS}/{{benchmark}}/{{model}}/figures/kl_step_types_{{quant}}.png",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/step_types_{{quant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/step_types/step_types_{{quant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("step_types"),
    params:
        title=lambda w: shlex.quote(f"{w.benchmark}/{w.model} {w.quant}"),
    shell:
        "python -m dmr.step_types --kl {input.kl} --threshold {input.threshold} --title {params.title} "
        "--out {output.table} --markdown {output.markdown} --figure {output.figure} > {log} 2>&1"


rule diagnose:
    # Where the routing signal is: the router against trivial rankers and the low model's own
    # uncertainty, offline on the KL pool's held-out episodes (dmr.diagnose).
    input:
        kl=rules.kl.output,
        threshold=rules.threshold.output.threshold,
        scores=f"{RESULTS}/{{benchmark}}/{{model}}/{{quant}}/router/train_scores.parquet",
        probe=probe_run,
    output:
        table=f"{RESULTS}/{{benchmark}}/{{model}}/tables/diagnose_{{quant}}.parquet",
        markdown=f"{RESULTS}/{{benchmark}}/{{model}}/tables/diagnose_{{quant}}.md",
    log:
        f"{RESULTS}/{{benchmark}}/{{model}}/logs/diagnose_{{quant}}.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/{{model}}/benchmarks/diagnose/diagnose_{{quant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **rule_resources("diagnose"),
    params:
        router=lambda w, input: os.path.dirname(input.scores),
        budgets=" ".join(f"{k:g}" for k in route_cfg().get("budgets", [0.2, 0.4, 0.7])),
        steps=lambda w: " ".join(routed_steps(w)),
    shell:
        "python -m dmr.diagnose --kl {input.kl} --router {params.router} --threshold {input.threshold} "
        "--budgets {params.budgets} --online {input.probe} --step-types {params.steps} "
        "--title '{wildcards.benchmark}/{wildcards.model} {wildcards.quant}: routing signal' "
        "--out {output.table} > {log} 2>&1"
