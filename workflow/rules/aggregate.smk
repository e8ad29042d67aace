"""One results table and one training-curve plot per experiment."""


rule aggregate:
    input:
        metrics=lambda w: experiment_metrics(w.experiment),
        train_dirs=lambda w: experiment_train_dirs(w.experiment),
    output:
        csv=report(
            "results/{experiment}/tables/results.csv",
            category="{experiment}",
            labels={"table": "results (csv)"},
        ),
        md="results/{experiment}/tables/results.md",
        plot=report(
            "results/{experiment}/plots/training_curves.png",
            category="{experiment}",
            labels={"figure": "training curves"},
        ),
    log:
        "logs/{experiment}/aggregate.log",
    conda:
        "../envs/asft.yaml"
    params:
        benchmarks=lambda w: CONFIG["experiments"][w.experiment]["benchmarks"],
        table_dir=lambda w, output: str(Path(output.csv).parent),
        plot_dir=lambda w, output: str(Path(output.plot).parent),
    shell:
        "asft aggregate --experiment {wildcards.experiment} --metrics {input.metrics}"
        " --train-dirs {input.train_dirs} --benchmarks {params.benchmarks}"
        " --table-dir {params.table_dir} --plot-dir {params.plot_dir} > {log} 2>&1"
