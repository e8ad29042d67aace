"""Every run and every base model on every benchmark of its experiment."""


rule evaluate_run:
    input:
        model=evaluated_model,
        adapter=evaluated_adapter,
        benchmark="resources/benchmarks/{benchmark}.jsonl",
    output:
        metrics="results/{experiment}/runs/{model}/{dataset}/{mode}/seed{seed}/eval/{benchmark}/metrics.json",
        samples="results/{experiment}/runs/{model}/{dataset}/{mode}/seed{seed}/eval/{benchmark}/samples.jsonl",
    log:
        "logs/{experiment}/evaluate/{model}/{dataset}/{mode}/seed{seed}/{benchmark}.log",
    conda:
        "../envs/eval.yaml"
    threads: 2
    resources:
        mem_mb=32000,
        runtime=240,
    params:
        spec=lambda w: canonical_json(eval_spec(CONFIG, w.experiment, w.benchmark)),
        run=lambda w: canonical_json(run_identity(run_of(w))),
        out_dir=lambda w, output: str(Path(output.metrics).parent),
        adapter=lambda w, input: f"--adapter {input.adapter}" if input.adapter else "",
    shell:
        "asft evaluate --model {input.model} {params.adapter} --benchmark {input.benchmark} --spec {params.spec:q}"
        " --run {params.run:q} --out-dir {params.out_dir} > {log} 2>&1"


rule evaluate_base:
    input:
        model="resources/models/{model}",
        benchmark="resources/benchmarks/{benchmark}.jsonl",
    output:
        metrics="results/{experiment}/base/{model}/eval/{benchmark}/metrics.json",
        samples="results/{experiment}/base/{model}/eval/{benchmark}/samples.jsonl",
    log:
        "logs/{experiment}/evaluate/{model}/base/{benchmark}.log",
    conda:
        "../envs/eval.yaml"
    threads: 2
    resources:
        mem_mb=32000,
        runtime=240,
    params:
        spec=lambda w: canonical_json(eval_spec(CONFIG, w.experiment, w.benchmark)),
        run=lambda w: canonical_json(
            {"experiment": w.experiment, "model": w.model, "mode_label": "base"}
        ),
        out_dir=lambda w, output: str(Path(output.metrics).parent),
    shell:
        "asft evaluate --model {input.model} --benchmark {input.benchmark} --spec {params.spec:q}"
        " --run {params.run:q} --out-dir {params.out_dir} > {log} 2>&1"
