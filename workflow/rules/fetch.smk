"""Obtain every model, dataset and benchmark as a local artefact (hub, URL, path, or the embedded demo)."""


rule build_demo:
    output:
        manifest=f"{DEMO_DIR}/manifest.json",
    params:
        options=canonical_json(CONFIG["demo"]),
        out=DEMO_DIR,
    log:
        "logs/build_demo.log",
    threads: 2
    shell:
        "asft build-demo --out {params.out} --options {params.options:q} > {log} 2>&1"


rule fetch_model:
    input:
        lambda w: demo_input(CONFIG["models"][w.model]),
    output:
        directory("resources/models/{model}"),
    params:
        source=lambda w: canonical_json(CONFIG["models"][w.model]["source"]),
        demo=DEMO_DIR,
    log:
        "logs/fetch_model/{model}.log",
    shell:
        "asft fetch-model --source {params.source:q} --demo-dir {params.demo} --out {output} > {log} 2>&1"


rule fetch_dataset:
    input:
        lambda w: demo_input(CONFIG["datasets"][w.dataset]),
    output:
        "resources/datasets/{dataset}.jsonl",
    params:
        spec=lambda w: canonical_json(CONFIG["datasets"][w.dataset]),
        demo=DEMO_DIR,
    log:
        "logs/fetch_dataset/{dataset}.log",
    shell:
        "asft fetch-dataset --spec {params.spec:q} --demo-dir {params.demo} --out {output} > {log} 2>&1"


rule fetch_benchmark:
    input:
        lambda w: demo_input(CONFIG["benchmarks"][w.benchmark]),
    output:
        "resources/benchmarks/{benchmark}.jsonl",
    params:
        spec=lambda w: canonical_json(CONFIG["benchmarks"][w.benchmark]),
        demo=DEMO_DIR,
    log:
        "logs/fetch_benchmark/{benchmark}.log",
    shell:
        "asft fetch-benchmark --spec {params.spec:q} --demo-dir {params.demo} --out {output} > {log} 2>&1"
