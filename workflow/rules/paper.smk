"""The paper's tables and figures (config `catalogue: paper`), each rendered from its experiments' records."""


rule paper_table:
    input:
        records=paper_records,
    output:
        csv=report(
            layout.paper_table_files("{name}")["csv"],
            caption="../report/paper_table.rst",
            category="paper",
            subcategory="tables",
            labels={"table": "{name}"},
        ),
        md=layout.paper_table_files("{name}")["md"],
        tex=layout.paper_table_files("{name}")["tex"],
        caption=layout.paper_table_files("{name}")["caption"],
    log:
        layout.paper_job_log("{name}"),
    wildcard_constraints:
        name="|".join(PAPER_TABLES),
    conda:
        "../envs/asft.yaml"
    params:
        records=paper_records_dirs,
        out_dir=paper_out_dir,
        caption=paper_report_caption,
    shell:
        "asft paper --name {wildcards.name} --records {params.records} --out-dir {params.out_dir} > {log} 2>&1"


rule paper_figure:
    input:
        records=paper_records,
    output:
        png=report(
            layout.paper_figure_files("{name}")["png"],
            caption="../report/paper_figure.rst",
            category="paper",
            subcategory="figures",
            labels={"figure": "{name}"},
        ),
        caption=layout.paper_figure_files("{name}")["caption"],
    log:
        layout.paper_job_log("{name}"),
    wildcard_constraints:
        name="|".join(PAPER_FIGURES),
    conda:
        "../envs/asft.yaml"
    params:
        records=paper_records_dirs,
        out_dir=paper_out_dir,
        caption=paper_report_caption,
    shell:
        "asft paper --name {wildcards.name} --records {params.records} --out-dir {params.out_dir} > {log} 2>&1"
