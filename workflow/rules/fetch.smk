"""Obtain every model, dataset and benchmark as a local artefact (hub, URL, path, or the embedded demo)."""


rule build_demo:
    output:
        manifest=layout.DEMO_MANIFEST_PATH,
    log:
        layout.DEMO_JOB_LOG,
    conda:
        "../envs/asft.yaml"
    threads: JOB_THREADS
    params:
        options=demo_params,
        out=demo_out_dir,
    shell:
        "asft build-demo --out {params.out} --options {params.options:q} > {log} 2>&1"


rule fetch_model:
    input:
        model_demo_input,
    output:
        directory(layout.MODEL_WILDCARDS),
    log:
        layout.FETCH_MODEL_LOG_WILDCARDS,
    conda:
        "../envs/asft.yaml"
    params:
        source=model_source_params,
        lock=model_lock_params,
        demo=layout.DEMO_DIR,
    shell:
        "asft fetch-model --source {params.source:q} --lock {params.lock:q} --demo-dir {params.demo}"
        " --out {output} > {log} 2>&1"


rule fetch_dataset:
    input:
        dataset_demo_input,
    output:
        data=layout.DATASET_WILDCARDS,
        sidecar=layout.DATASET_SIDECAR_WILDCARDS,
    log:
        layout.FETCH_DATASET_LOG_WILDCARDS,
    conda:
        "../envs/asft.yaml"
    params:
        spec=dataset_params,
        lock=dataset_lock_params,
        demo=layout.DEMO_DIR,
    shell:
        "asft fetch-dataset --spec {params.spec:q} --lock {params.lock:q} --demo-dir {params.demo}"
        " --out {output.data} > {log} 2>&1"


rule fetch_benchmark:
    input:
        benchmark_demo_input,
    output:
        data=layout.BENCHMARK_WILDCARDS,
        sidecar=layout.BENCHMARK_SIDECAR_WILDCARDS,
    log:
        layout.FETCH_BENCHMARK_LOG_WILDCARDS,
    conda:
        "../envs/asft.yaml"
    params:
        spec=benchmark_params,
        lock=benchmark_lock_params,
        demo=layout.DEMO_DIR,
    shell:
        "asft fetch-benchmark --spec {params.spec:q} --lock {params.lock:q} --demo-dir {params.demo}"
        " --out {output.data} > {log} 2>&1"
