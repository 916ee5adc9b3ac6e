# Low-precision copies of a cell's bf16 model (llmcompressor oneshot, paper App. E).


rule quantize:
    input:
        model=lambda w: flags.built_models(w, "bf16"),
        calibration=lambda w: flags.calibration(w)[0],
    output:
        directory(cell("{quant}/model")),
    log:
        cell("logs/quantize_{quant}.log"),
    benchmark:
        cell("benchmarks/quantize/quantize_{quant}.tsv")
    wildcard_constraints:
        quant=SCHEME,
    conda:
        "../../envs/cpu.yaml"
    threads: config["threads"]
    resources:
        **flags.resources("quantize", config["threads"]),
    params:
        bf16=flags.model_dir,
        calibration=lambda w: flags.calibration(w)[1],
        sizes=lambda w: cli_flags(
            {k: flags.model_cfg(w)["quantize"]["calibration"][k] for k in ("samples", "max_seq_length")}
        ),
        prompt=lambda w: as_json(flags.bench(w)["prompt"]),
    shell:
        "python -m dmr.quantize --model {params.bf16} --scheme {wildcards.quant} "
        "--calibration {params.calibration} {params.sizes} "
        "--prompt {params.prompt} --out {output} > {log} 2>&1"
