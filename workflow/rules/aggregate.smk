"""One results table and one training-curve plot per experiment, and the tidy records the paper's tables read."""


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
        evals=f"{layout.TABLES_WILDCARDS}/{layout.EVAL_RECORDS}",
        trains=f"{layout.TABLES_WILDCARDS}/{layout.TRAIN_RECORDS}",
        curves=f"{layout.TABLES_WILDCARDS}/{layout.CURVE_RECORDS}",
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
        runs=eval_identities,
        train_runs=train_identities,
        table_dir=table_dir,
        plot_dir=plot_dir,
    shell:
        "asft aggregate --experiment {wildcards.experiment} --metrics {input.metrics}"
        " --train-dirs {input.train_dirs} --benchmarks {params.benchmarks}"
        " --runs {params.runs:q} --train-runs {params.train_runs:q}"
        " --table-dir {params.table_dir} --plot-dir {params.plot_dir} > {log} 2>&1"
