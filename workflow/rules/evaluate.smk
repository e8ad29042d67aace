"""Every run, its snapshots and every base model on every benchmark of its experiment."""


rule evaluate_run:
    input:
        model=evaluated_model,
        adapter=evaluated_adapter,
        benchmark=layout.BENCHMARK_WILDCARDS,
    output:
        metrics=f"{layout.EVAL_WILDCARDS}/{layout.METRICS}",
        samples=f"{layout.EVAL_WILDCARDS}/{layout.SAMPLES}",
    log:
        layout.EVAL_LOG_WILDCARDS,
    conda:
        "../envs/eval.yaml"
    threads: JOB_THREADS
    resources:
        gpu=evaluate_resource("gpu"),
        nodes=evaluate_resource("nodes"),
        cpus_per_task=evaluate_resource("cpus_per_task"),
        mem_mb=evaluate_resource("mem_mb"),
        runtime=evaluate_resource("runtime"),
    params:
        spec=eval_params,
        run=run_identity_params,
        out_dir=eval_out_dir,
        adapter=adapter_option,
    shell:
        "asft evaluate --model {input.model} {params.adapter} --benchmark {input.benchmark} --spec {params.spec:q}"
        " --run {params.run:q} --out-dir {params.out_dir} > {log} 2>&1"


rule evaluate_snapshot:
    input:
        trained=snapshot_train_dir,
        base=snapshot_base_model,
        benchmark=layout.BENCHMARK_WILDCARDS,
    output:
        metrics=f"{layout.SNAPSHOT_EVAL_WILDCARDS}/{layout.METRICS}",
        samples=f"{layout.SNAPSHOT_EVAL_WILDCARDS}/{layout.SAMPLES}",
    log:
        layout.SNAPSHOT_EVAL_LOG_WILDCARDS,
    conda:
        "../envs/eval.yaml"
    threads: JOB_THREADS
    resources:
        gpu=evaluate_resource("gpu"),
        nodes=evaluate_resource("nodes"),
        cpus_per_task=evaluate_resource("cpus_per_task"),
        mem_mb=evaluate_resource("mem_mb"),
        runtime=evaluate_resource("runtime"),
    params:
        spec=eval_params,
        run=snapshot_identity_params,
        out_dir=eval_out_dir,
        model=snapshot_model_option,
        adapter=snapshot_adapter_option,
    shell:
        "asft evaluate --model {params.model} {params.adapter} --benchmark {input.benchmark} --spec {params.spec:q}"
        " --run {params.run:q} --out-dir {params.out_dir} > {log} 2>&1"


rule evaluate_base:
    input:
        model=layout.MODEL_WILDCARDS,
        benchmark=layout.BENCHMARK_WILDCARDS,
    output:
        metrics=f"{layout.BASE_EVAL_WILDCARDS}/{layout.METRICS}",
        samples=f"{layout.BASE_EVAL_WILDCARDS}/{layout.SAMPLES}",
    log:
        layout.BASE_EVAL_LOG_WILDCARDS,
    conda:
        "../envs/eval.yaml"
    threads: JOB_THREADS
    resources:
        gpu=evaluate_resource("gpu"),
        nodes=evaluate_resource("nodes"),
        cpus_per_task=evaluate_resource("cpus_per_task"),
        mem_mb=evaluate_resource("mem_mb"),
        runtime=evaluate_resource("runtime"),
    params:
        spec=eval_params,
        run=base_identity_params,
        out_dir=eval_out_dir,
    shell:
        "asft evaluate --model {input.model} --benchmark {input.benchmark} --spec {params.spec:q}"
        " --run {params.run:q} --out-dir {params.out_dir} > {log} 2>&1"
