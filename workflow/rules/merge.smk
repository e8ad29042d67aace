"""LoRA runs only: fold the adapter into the base weights (full fine-tunes are evaluated directly)."""


rule merge:
    input:
        base=start_weights,
        adapter=layout.TRAIN_WILDCARDS,
    output:
        directory(layout.MERGED_WILDCARDS),
    log:
        layout.MERGE_LOG_WILDCARDS,
    conda:
        "../envs/asft.yaml"
    resources:
        gpu=merge_resource("gpu"),
        nodes=merge_resource("nodes"),
        cpus_per_task=merge_resource("cpus_per_task"),
        mem_mb=merge_resource("mem_mb"),
        runtime=merge_resource("runtime"),
    params:
        dtype=merge_dtype,
        remote_code=merge_remote_code_flag,
    shell:
        "asft merge --base {input.base} --adapter {input.adapter} --out {output}"
        " --dtype {params.dtype} {params.remote_code} > {log} 2>&1"
