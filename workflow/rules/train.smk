"""One training run per matrix cell; checkpoints live outside the declared output so restarts resume."""


rule train:
    input:
        model="resources/models/{model}",
        data="resources/datasets/{dataset}.jsonl",
    output:
        directory("results/{experiment}/runs/{model}/{dataset}/{mode}/seed{seed}/train"),
    log:
        "logs/{experiment}/train/{model}/{dataset}/{mode}/seed{seed}.log",
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=32000,
        runtime=720,
    params:
        spec=lambda w: canonical_json(train_spec(CONFIG, run_of(w))),
        checkpoints=lambda w: f"{run_dir(w)}/checkpoints",
    shell:
        "asft train --model {input.model} --data {input.data} --spec {params.spec:q}"
        " --out {output} --checkpoints {params.checkpoints} > {log} 2>&1"
