"""One results table and one training-curve plot per experiment."""


rule aggregate:
    input:
        metrics=experiment_metrics,
        train_dirs=experiment_train_dirs,
    output:
        csv=report(
            f"{layout.TABLES_WILDCARDS}/{layout.RESULTS_CSV}",
            category="{experiment}",
            labels={"table": "results (csv)"},
        ),
        md=f"{layout.TABLES_WILDCARDS}/{layout.RESULTS_MD}",
        plot=report(
            f"{layout.PLOTS_WILDCARDS}/{layout.TRAINING_CURVES}",
            category="{experiment}",
            labels={"figure": "training curves"},
        ),
    log:
        layout.AGGREGATE_LOG_WILDCARDS,
    conda:
        "../envs/asft.yaml"
    params:
        benchmarks=experiment_benchmarks,
        table_dir=table_dir,
        plot_dir=plot_dir,
    shell:
        "asft aggregate --experiment {wildcards.experiment} --metrics {input.metrics}"
        " --train-dirs {input.train_dirs} --benchmarks {params.benchmarks}"
        " --table-dir {params.table_dir} --plot-dir {params.plot_dir} > {log} 2>&1"
