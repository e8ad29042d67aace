"""One training run per matrix cell; checkpoints live outside the declared output so restarts resume."""


rule train:
    input:
        model=start_weights,
        data=layout.DATASET_WILDCARDS,
        reference=train_reference,
    output:
        directory(layout.TRAIN_WILDCARDS),
    log:
        layout.TRAIN_LOG_WILDCARDS,
    conda:
        "../envs/train.yaml"
    threads: JOB_THREADS
    resources:
        gpu=train_resource("gpu"),
        nodes=train_resource("nodes"),
        cpus_per_task=train_resource("cpus_per_task"),
        mem_mb=train_resource("mem_mb"),
        runtime=train_resource("runtime"),
        tasks=train_resource("tasks"),
        mpi=train_resource("mpi"),
        tasks_per_gpu=train_resource("tasks_per_gpu"),
    params:
        spec=train_params,
        checkpoints=train_checkpoints,
        reference=reference_option,
    shell:
        "asft train --model {input.model} --data {input.data} --spec {params.spec:q}"
        " --out {output} --checkpoints {params.checkpoints} {params.reference} > {log} 2>&1"


# One per (model, dataset, reference settings): every run with training.reference: cached and that spec reads it.
rule reference:
    input:
        model=layout.MODEL_WILDCARDS,
        data=layout.DATASET_WILDCARDS,
    output:
        directory(layout.REFERENCE_WILDCARDS),
    log:
        layout.REFERENCE_LOG_WILDCARDS,
    conda:
        "../envs/train.yaml"
    threads: JOB_THREADS
    resources:
        gpu=reference_resource("gpu"),
        nodes=reference_resource("nodes"),
        cpus_per_task=reference_resource("cpus_per_task"),
        mem_mb=reference_resource("mem_mb"),
        runtime=reference_resource("runtime"),
    params:
        spec=reference_params,
    shell:
        "asft reference --model {input.model} --data {input.data} --spec {params.spec:q}"
        " --out {output} > {log} 2>&1"
