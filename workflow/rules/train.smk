"""One training run per matrix cell; checkpoints live outside the declared output so restarts resume."""


rule train:
    input:
        model=layout.MODEL_WILDCARDS,
        data=layout.DATASET_WILDCARDS,
    output:
        directory(layout.TRAIN_WILDCARDS),
    log:
        layout.TRAIN_LOG_WILDCARDS,
    conda:
        "../envs/train.yaml"
    threads: JOB_THREADS
    resources:
        mem_mb=32000,
        runtime=720,
    params:
        spec=train_params,
        checkpoints=train_checkpoints,
    shell:
        "asft train --model {input.model} --data {input.data} --spec {params.spec:q}"
        " --out {output} --checkpoints {params.checkpoints} > {log} 2>&1"
