"""LoRA runs only: fold the adapter into the base weights (full fine-tunes are evaluated directly)."""


rule merge:
    input:
        base="resources/models/{model}",
        adapter="results/{experiment}/runs/{model}/{dataset}/{mode}/seed{seed}/train",
    output:
        directory(
            "results/{experiment}/runs/{model}/{dataset}/{mode}/seed{seed}/merged"
        ),
    log:
        "logs/{experiment}/merge/{model}/{dataset}/{mode}/seed{seed}.log",
    conda:
        "../envs/asft.yaml"
    resources:
        mem_mb=32000,
        runtime=60,
    shell:
        "asft merge --base {input.base} --adapter {input.adapter} --out {output} > {log} 2>&1"
