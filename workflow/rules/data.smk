# Benchmark data (ALFWorld game files): checked where present, fetched with alfworld-download where
# the internet is reachable, else a clear error that says how to provide them. data.json records
# the data root, the games per split and the package versions the results are computed with.


rule data:
    output:
        DATA,
    log:
        f"{RESULTS}/{{benchmark}}/logs/data.log",
    benchmark:
        f"{RESULTS}/{{benchmark}}/benchmarks/data/data.tsv"
    conda:
        "../../envs/cpu.yaml"
    resources:
        **flags.resources("data"),
    params:
        env=flags.env_args,
        need=flags.data_need,
    shell:
        "python -m dmr.data {params.env} --need {params.need} --out {output} > {log} 2>&1"
