"""Obtain every model, dataset and benchmark as a local artefact (hub, URL, path, or the embedded demo)."""


rule build_demo:
    output:
        manifest=f"{DEMO_DIR}/manifest.json",
    log:
        "logs/build_demo.log",
    conda:
        "../envs/asft.yaml"
    threads: 2
    params:
        options=canonical_json(CONFIG["demo"]),
        out=lambda w, output: str(Path(output.manifest).parent),
    shell:
        "asft build-demo --out {params.out} --options {params.options:q} > {log} 2>&1"


rule fetch_model:
    input:
        lambda w: demo_input(CONFIG["models"][w.model]),
    output:
        directory("resources/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    conda:
        "../envs/asft.yaml"
    params:
        source=lambda w: canonical_json(CONFIG["models"][w.model]["source"]),
        demo=DEMO_DIR,
    shell:
        "asft fetch-model --source {params.source:q} --demo-dir {params.demo} --out {output} > {log} 2>&1"


rule fetch_dataset:
    input:
        lambda w: demo_input(CONFIG["datasets"][w.dataset]),
    output:
        "resources/datasets/{dataset}.jsonl",
    log:
        "logs/fetch_dataset/{dataset}.log",
    conda:
        "../envs/asft.yaml"
    params:
        spec=lambda w: canonical_json(CONFIG["datasets"][w.dataset]),
        demo=DEMO_DIR,
    shell:
        "asft fetch-dataset --spec {params.spec:q} --demo-dir {params.demo} --out {output} > {log} 2>&1"


rule fetch_benchmark:
    input:
        lambda w: demo_input(CONFIG["benchmarks"][w.benchmark]),
    output:
        "resources/benchmarks/{benchmark}.jsonl",
    log:
        "logs/fetch_benchmark/{benchmark}.log",
    conda:
        "../envs/asft.yaml"
    params:
        spec=lambda w: canonical_json(CONFIG["benchmarks"][w.benchmark]),
        demo=DEMO_DIR,
    shell:
        "asft fetch-benchmark --spec {params.spec:q} --demo-dir {params.demo} --out {output} > {log} 2>&1"
