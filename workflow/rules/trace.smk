"""Per-token gradient traces (experiments.<name>.trace): a trace per listed run or base model, its analysis and
viewer, and one comparison of every trace with the fork's published findings."""


rule trace_run:
    input:
        model=trace_model,
        trained=trace_trained,
        reference=trace_reference,
        data=layout.DATASET_WILDCARDS,
    output:
        directory(f"{layout.TRACE_RUN_WILDCARDS}/{layout.TRACE}"),
    log:
        f"{layout.LOGS}/{{experiment}}/trace/{{model}}/{{dataset}}/{{mode_label}}/seed{{seed}}.log",
    conda:
        "../envs/train.yaml"
    threads: JOB_THREADS
    resources:
        gpu=trace_resource("gpu"),
        nodes=trace_resource("nodes"),
        cpus_per_task=trace_resource("cpus_per_task"),
        mem_mb=trace_resource("mem_mb"),
        runtime=trace_resource("runtime"),
    params:
        spec=trace_run_params,
        adapter=trace_adapter_option,
        reference=trace_reference_option,
    shell:
        "asft trace --model {input.model} {params.adapter} {params.reference} --data {input.data}"
        " --spec {params.spec:q} --out {output} > {log} 2>&1"


rule trace_base:
    input:
        model=layout.MODEL_WILDCARDS,
        data=layout.DATASET_WILDCARDS,
    output:
        directory(f"{layout.TRACE_BASE_WILDCARDS}/{layout.TRACE}"),
    log:
        f"{layout.LOGS}/{{experiment}}/trace/{{model}}/{{dataset}}/base.log",
    conda:
        "../envs/train.yaml"
    threads: JOB_THREADS
    resources:
        gpu=trace_resource("gpu"),
        nodes=trace_resource("nodes"),
        cpus_per_task=trace_resource("cpus_per_task"),
        mem_mb=trace_resource("mem_mb"),
        runtime=trace_resource("runtime"),
    params:
        spec=trace_base_params,
    shell:
        "asft trace --model {input.model} --data {input.data} --spec {params.spec:q} --out {output} > {log} 2>&1"


rule trace_analysis:
    input:
        f"{layout.RESULTS}/{{trace_path}}/{layout.TRACE}",
    output:
        analysis=f"{layout.RESULTS}/{{trace_path}}/{layout.TRACE_ANALYSIS}",
        summary=f"{layout.RESULTS}/{{trace_path}}/{layout.TRACE_SUMMARY}",
        plot=f"{layout.RESULTS}/{{trace_path}}/{layout.TRACE_PLOT}",
        viewer=f"{layout.RESULTS}/{{trace_path}}/{layout.TRACE_VIEWER}",
    log:
        f"{layout.LOGS}/{{trace_path}}/trace_analysis.log",
    conda:
        "../envs/asft.yaml"
    params:
        out_dir=trace_analysis_dir,
    shell:
        "asft trace-analysis --trace {input} --out {params.out_dir} > {log} 2>&1"


rule trace_compare:
    input:
        trace_analyses(),
    output:
        md=f"{layout.TRACES_COMPARISON}/comparison.md",
        csv=f"{layout.TRACES_COMPARISON}/comparison.csv",
        json=f"{layout.TRACES_COMPARISON}/comparison.json",
        plot=f"{layout.TRACES_COMPARISON}/comparison.png",
    log:
        f"{layout.LOGS}/traces/comparison.log",
    conda:
        "../envs/asft.yaml"
    params:
        out_dir=trace_compare_dir,
    shell:
        "asft trace-compare --analyses {input} --out {params.out_dir} > {log} 2>&1"
