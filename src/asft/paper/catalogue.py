"""The catalogue: which of our runs stand behind each row and column of the paper's tables, as data.

A table is a ``TableSpec``: column groups (benchmarks plus the group's average, in the paper's column order) and
rows in the paper's order. Each ``Row`` says, per column group, which evaluations fill it (a selection filter,
see ``asft.paper.selection``) and which row of the reference CSV holds the published numbers. A row the paper
has but we do not build has no sources; a row we add has no reference key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from asft.paper.selection import Filter

MODEL_LABELS = {
    "qwen2.5-1.5b": "Qwen2.5-1.5B",
    "qwen2.5-7b": "Qwen2.5-7B",
    "qwen2.5-32b": "Qwen2.5-32B",
    "qwen2.5-72b": "Qwen2.5-72B",
    "llama-2-7b": "LLaMA-2-7B",
    "llama-2-70b": "LLaMA-2-70B",
}
METHOD_LABELS = {
    "base": "Base",
    "sft": "SFT",
    "sft+kl": "SFT w/ KL",
    "sft+dapo": "SFT + DAPO",
    "asft+dapo": "ASFT + DAPO",
    "dft": "DFT",
    "asft": "ASFT",
    "asft-reverse": "ASFT (reverse KL)",
    "asft-sft": "ASFT-SFT",
    "asft-lora": "ASFT-LoRA",
    "iw-sft": "IW-SFT",
    "grpo": "GRPO",
    "dapo": "DAPO",
    "sft-topk": "SFT-TopK",
    "sft-antiop": "SFT-AntiOP",
    "sft-lr": "SFT-LR",
}
BENCHMARK_LABELS = {
    "medqa": "MedQA",
    "mmlu_medical": "MMLU-Medical",
    "medmcqa": "MedMCQA",
    "aime24": "AIME24",
    "math500": "MATH-500",
    "minerva_math": "Minerva Math",
    "olympiadbench": "OlympiadBench",
    "amc23": "AMC23",
    "humaneval": "HumanEval",
    "humaneval_plus": "HumanEval+",
    "mbpp": "MBPP",
    "mbpp_plus": "MBPP+",
    "alpaca_eval": "AlpacaEval win rate",
}
MEDICAL = ("medqa", "mmlu_medical", "medmcqa")
MATH = ("aime24", "math500", "minerva_math", "olympiadbench", "amc23")  # Table 1's column order
CODE = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")  # Table 3's column order
SIZES = ("10k", "30k", "100k")
# The first words of every caption rendered from smoke-scale results (asft.scale).
SMOKE_NOTE = "Smoke scale: embedded stand-ins, numbers are not comparable."
# The paper's default KL weight: the lambda of Table 1's ASFT rows, where Figures 2 and 4 meet Table 1.
PAPER_KL_WEIGHT = 0.05


@dataclass(frozen=True)
class Column:
    """One table column: a benchmark, a group average, or a training cost (Table 4)."""

    key: str
    label: str
    reference: str  # the column's name in the reference CSV
    kind: str = "benchmark"  # benchmark | avg | time | memory
    of: tuple[str, ...] = ()  # the benchmarks an average is taken over


@dataclass(frozen=True)
class Group:
    """Columns filled from one source per row (e.g. Table 1's medical columns come from LLaMA-2-7B runs)."""

    name: str
    label: str
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Row:
    """One table row; ``sources`` maps a group name to the filter of its evaluations (absent: not built)."""

    method: str
    sources: Mapping[str, Filter]
    reference: tuple[str, ...] | None
    block: str = ""
    label: str | None = None
    base: Mapping[str, Filter] | None = None  # default: the same experiment(s) and model, mode "base"
    published: Mapping[str, float] = field(default_factory=dict)  # numbers stated only in a file's text

    @property
    def method_label(self) -> str:
        return self.label or METHOD_LABELS[self.method]

    @property
    def full_label(self) -> str:
        return f"{self.block} · {self.method_label}" if self.block else self.method_label

    def base_filter(self, group: str) -> Filter | None:
        """The base model this row's delta is taken against, for one column group."""
        if self.base is not None and group in self.base:
            return self.base[group]
        source = self.sources.get(group)
        if source is None or self.method == "base":
            return None
        return {"experiment": source["experiment"], "model": source["model"], "mode": "base"}


@dataclass(frozen=True)
class TableSpec:
    """A paper table: its reference file and key columns, column groups, rows, and caption facts."""

    name: str
    title: str
    reference_file: str | None  # None: a table of ours, with no published numbers
    reference_keys: tuple[str, ...]
    groups: tuple[Group, ...]
    rows: tuple[Row, ...]
    block_label: str | None
    setting: str  # model, data and decoding, as the paper's caption would say
    decoding: str
    differences: tuple[str, ...] = ()
    # Part of `snakemake paper`; a table of ours beyond the paper (a judged one needs an endpoint) has its own target.
    in_paper: bool = True

    @property
    def columns(self) -> list[tuple[Group, Column]]:
        return [(group, column) for group in self.groups for column in group.columns]

    def row_labels(self) -> list[str]:
        return [row.full_label for row in self.rows]

    def column_labels(self) -> list[str]:
        return [column.label for _, column in self.columns]


def sel(experiment: str | tuple[str, ...], model: str, mode: str, dataset: str | None = None, **extra: object) -> dict:
    """A selection filter; experiment may be a priority tuple."""
    spec: dict[str, object] = {
        "experiment": experiment if isinstance(experiment, tuple) else (experiment,),
        "model": model,
        "mode": mode,
    }
    if dataset is not None:
        spec["dataset"] = dataset
    spec.update(extra)
    return spec


def _bench_columns(benchmarks: tuple[str, ...], avg_key: str, avg_label: str) -> tuple[Column, ...]:
    columns = tuple(Column(b, BENCHMARK_LABELS[b], b) for b in benchmarks)
    return (*columns, Column(avg_key, avg_label, avg_key, kind="avg", of=benchmarks))


# ---------------------------------------------------------------- Table 1
TRAINED = ("sft", "sft+kl", "dft", "asft")


def medical_10k(mode: str) -> dict:
    """LLaMA-2-7B on MedMCQA 10k from Table 1's runs: Tables 4, 5 and the figures' reference lines share them."""
    if mode == "base":
        return sel("table1_medical", "llama-2-7b", "base")
    return sel("table1_medical", "llama-2-7b", mode, "medmcqa-10k")


def math_10k(mode: str) -> dict:
    """Qwen2.5-7B on NuminaMath-CoT 10k from Table 1's runs (Figure 4's reference lines)."""
    if mode == "base":
        return sel("table1_math", "qwen2.5-7b", "base")
    return sel("table1_math", "qwen2.5-7b", mode, "numina-cot-10k")


def _table1_rows() -> tuple[Row, ...]:
    rows = [Row("base", {"medical": medical_10k("base"), "math": math_10k("base")}, ("base", "base"))]
    for size in SIZES:
        for mode in TRAINED:
            # 30k and 100k are experiments of their own, so that the targets reading only 10k do not train them
            suffix = "" if size == "10k" else "_large"
            sources = {
                "medical": sel(f"table1_medical{suffix}", "llama-2-7b", mode, f"medmcqa-{size}"),
                "math": sel(f"table1_math{suffix}", "qwen2.5-7b", mode, f"numina-cot-{size}"),
            }
            # every size's delta is against Table 1's one Base row
            base = {"medical": medical_10k("base"), "math": math_10k("base")}
            rows.append(Row(mode, sources, (size, mode), block=size, base=base))
    # Our ablation: the loss normalised per target token instead of the paper code's scaling.
    for mode in TRAINED:
        rows.append(
            Row(
                mode,
                {
                    "medical": sel("scaling_medical", "llama-2-7b", mode, "medmcqa-10k"),
                    "math": sel("scaling_math", "qwen2.5-7b", mode, "numina-cot-10k"),
                },
                None,
                block="10k",
                label=f"{METHOD_LABELS[mode]} (token-normalised loss)",
                base={
                    "medical": sel(("scaling_medical", "table1_medical"), "llama-2-7b", "base"),
                    "math": sel(("scaling_math", "table1_math"), "qwen2.5-7b", "base"),
                },
            )
        )
    return tuple(rows)


TABLE1 = TableSpec(
    name="table1",
    title="Table 1",
    reference_file="asft_paper_table1.csv",
    reference_keys=("train_size", "method"),
    groups=(
        Group("medical", "Medical (LLaMA-2-7B, MedMCQA)", _bench_columns(MEDICAL, "medical_avg", "Medical Avg")),
        Group("math", "Math (Qwen2.5-7B, NuminaMath-CoT)", _bench_columns(MATH, "math_avg", "Math Avg")),
    ),
    rows=_table1_rows(),
    block_label="Train size",
    setting="Full fine-tuning; medical columns LLaMA-2-7B trained on MedMCQA, math columns Qwen2.5-7B trained on "
    "NuminaMath-CoT, at 10k/30k/100k training examples",
    decoding="math avg@16 at temperature 1.0 (max 4096 new tokens); medical scored by the answer letter",
    differences=(
        "the rows marked (token-normalised loss) are our ablation, not in the paper: the loss is normalised per "
        "target token of the optimizer step instead of the paper code's scaling",
    ),
)


# ---------------------------------------------------------------- Table 2
def table2_source(method: str) -> dict:
    """LLaMA-2-7B on MedMCQA 10k: SFT-family rows from Table 1's runs, IW-SFT, RL from the base model, and DAPO
    continued from the SFT and ASFT runs (init_from), whose mode label names the parent."""
    if method in ("sft", "dft", "asft", "base"):
        return medical_10k(method)
    if method == "iw-sft":
        return sel("table2_iwsft", "llama-2-7b", "iw-sft", "medmcqa-10k")
    if method in ("grpo", "dapo"):
        return sel("table2_rl", "llama-2-7b", method, "medmcqa-10k")
    parent, _, mode = method.partition("+")
    return sel("table2_continual", "llama-2-7b", mode, "medmcqa-10k", init_label=_paper_label(parent))


def _paper_label(mode: str) -> str:
    """The mode label of Table 1's medical run of `mode` (its KL weight in the label when it is anchored)."""
    return f"{mode}-kl{PAPER_KL_WEIGHT:g}" if mode in ("asft", "sft+kl") else mode


TABLE2_ROWS = (
    ("sft", ("dft", "iw-sft", "sft", "asft")),
    ("rl", ("grpo", "dapo")),
    ("continual", ("sft+dapo", "asft+dapo")),
)
TABLE2 = TableSpec(
    name="table2",
    title="Table 2",
    reference_file="asft_paper_table2.csv",
    reference_keys=("group", "method"),
    groups=(Group("medical", "Medical (LLaMA-2-7B, MedMCQA 10k)", _bench_columns(MEDICAL, "medical_avg", "Avg")),),
    rows=tuple(
        Row(
            method,
            {"medical": table2_source(method)},
            (group, method),
            block=group,
            base={"medical": medical_10k("base")},
        )
        for group, methods in TABLE2_ROWS
        for method in methods
    ),
    block_label="Strategy",
    setting="Post-training strategies on LLaMA-2-7B with MedMCQA 10k: supervised (DFT, IW-SFT, SFT, ASFT), RL from "
    "the base model with the answer letter as reward (GRPO, DAPO), and DAPO continued from the SFT and ASFT models",
    decoding="medical scored by the answer letter",
    differences=(
        "the paper gives no RL hyper-parameters: ours are in config/paper.yaml (experiments.table2_rl: 8 "
        "completions per prompt, 512 per step, 4 optimizer steps per rollout batch, lr 1e-6); DAPO's dynamic "
        "sampling is not in TRL's GRPOTrainer, so our DAPO keeps groups whose rewards are all equal",
    ),
)


# ---------------------------------------------------------------- Table 3
def code_source(method: str) -> dict:
    """LLaMA-2-7B on 10k Magicoder-Evol-Instruct samples (Table 3's one experiment)."""
    if method == "base":
        return sel("table3_code", "llama-2-7b", "base")
    return sel("table3_code", "llama-2-7b", method, "magicoder-10k")


TABLE3 = TableSpec(
    name="table3",
    title="Table 3",
    reference_file="asft_paper_table3.csv",
    reference_keys=("method",),
    groups=(Group("code", "Code (LLaMA-2-7B, Magicoder-Evol-Instruct 10k)", _bench_columns(CODE, "avg", "Avg")),),
    rows=tuple(
        Row(method, {"code": code_source(method)}, (method,)) for method in ("base", "sft", "iw-sft", "dft", "asft")
    ),
    block_label=None,
    setting="Code generation: LLaMA-2-7B fine-tuned on 10k Magicoder-Evol-Instruct-110K samples for 2 epochs, "
    "otherwise the medical setup (max length 512, global batch 64, lr 2e-5)",
    decoding="evalplus pass@1, greedy; generated code runs only in the sandbox (asft.evaluation.sandbox)",
)


# ---------------------------------------------------------------- AlpacaEval (upstream's instruction following)
ALPACA_EVAL = TableSpec(
    name="alpaca_eval",
    title="AlpacaEval",
    reference_file=None,
    reference_keys=(),
    groups=(
        Group(
            "chat",
            "Instruction following (LLaMA-2-7B, Magpie 10k)",
            (Column("alpaca_eval", "Win rate", "alpaca_eval"),),
        ),
    ),
    rows=tuple(
        Row(
            method,
            {
                "chat": sel(
                    "alpaca_eval", "llama-2-7b", method, **({} if method == "base" else {"dataset": "magpie-10k"})
                )
            },
            None,
        )
        for method in ("base", "sft", "dft", "asft")
    ),
    block_label=None,
    setting="Instruction following, as the upstream repository evaluates it: LLaMA-2-7B fine-tuned on Magpie 10k, "
    "each answer judged against AlpacaEval's reference answer by an LLM judge (evaluation.judge), win rate with "
    "a bootstrap CI over instructions (ties count one half)",
    decoding="greedy answers; the judge at temperature 0, each pair shown in a random (seeded) order",
    differences=(
        "not in the paper: the upstream repository's evaluation, no published numbers",
        "the reference answers are AlpacaEval's alpaca_eval.json (AlpacaEval 1's, text-davinci-003) and the judge "
        "is ours (evaluation.judge) with our prompt: neither AlpacaEval 1's nor 2's exact protocol",
    ),
    in_paper=False,
)

# ---------------------------------------------------------------- Table 4
TABLE4 = TableSpec(
    name="table4",
    title="Table 4",
    reference_file="asft_paper_table4.csv",
    reference_keys=("method",),
    groups=(
        Group(
            "medical",
            "LLaMA-2-7B, MedMCQA 10k",
            (
                Column("time_hours", "Time (h)", "time_hours", kind="time"),
                Column("memory_gb", "Memory (GB)", "memory_gb", kind="memory"),
                Column("medical_avg", "Medical Avg", "medical_avg", kind="avg", of=MEDICAL),
            ),
        ),
    ),
    rows=(
        Row("sft", {"medical": medical_10k("sft")}, ("sft",)),
        Row("dft", {"medical": medical_10k("dft")}, ("dft",)),
        Row("sft+kl", {"medical": medical_10k("sft+kl")}, None),
        Row("iw-sft", {"medical": table2_source("iw-sft")}, ("iw-sft",)),
        Row("grpo", {"medical": table2_source("grpo")}, ("grpo",)),
        Row("dapo", {"medical": table2_source("dapo")}, ("dapo",)),
        Row(
            "asft-lora",
            {"medical": sel("table4_lora", "llama-2-7b", "asft", "medmcqa-10k")},
            ("asft-lora",),
            base={"medical": sel(("table4_lora", "table1_medical"), "llama-2-7b", "base")},
        ),
        Row("asft", {"medical": medical_10k("asft")}, ("asft",)),
    ),
    block_label=None,
    setting="Training cost on LLaMA-2-7B, MedMCQA 10k: wall time, peak accelerator memory (max over ranks) and "
    "the medical average; ASFT-LoRA is rank 8, lr 5e-4",
    decoding="medical scored by the answer letter",
    differences=("the paper measured one NVIDIA A100; SFT w/ KL is ours only",),
)

# ---------------------------------------------------------------- Table 5
_TABLE5_ORDER = (
    ("llama-2-7b", ("base", "sft", "sft+kl", "iw-sft", "dft", "grpo", "dapo", "asft")),
    ("llama-2-70b", ("base", "dft", "sft", "asft")),
    ("qwen2.5-7b", ("base", "sft", "sft+kl", "dft", "grpo", "dapo", "asft")),
    ("qwen2.5-32b", ("base", "sft", "dft", "asft")),
    ("qwen2.5-72b", ("base", "sft", "dft", "asft")),
)
NOT_BUILT = frozenset({"iw-sft", "grpo", "dapo"})  # except on LLaMA-2-7B, where Table 2 builds them


def table5_source(model: str, mode: str) -> dict | None:
    """Where a Table 5 (and Figure 3) cell comes from; None for baselines we do not build."""
    if model == "llama-2-7b":
        return table2_source(mode) if mode in NOT_BUILT else medical_10k(mode)
    if mode in NOT_BUILT:
        return None
    experiment = {"qwen2.5-7b": "table5_qwen7b", "qwen2.5-32b": "table5_32b"}.get(model, "table5_70b")
    if mode == "base":
        return sel(experiment, model, "base")
    return sel(experiment, model, mode, "medmcqa-10k")


def _table5_rows() -> tuple[Row, ...]:
    rows = []
    for model, modes in _TABLE5_ORDER:
        for mode in modes:
            source = table5_source(model, mode)
            sources = {} if source is None else {"medical": source}
            rows.append(Row(mode, sources, (MODEL_LABELS[model], mode), block=MODEL_LABELS[model]))
    return tuple(rows)


TABLE5 = TableSpec(
    name="table5",
    title="Table 5",
    reference_file="asft_paper_table5.csv",
    reference_keys=("model", "method"),
    groups=(Group("medical", "Medical (MedMCQA 10k training)", _bench_columns(MEDICAL, "medical_avg", "Avg")),),
    rows=_table5_rows(),
    block_label="Model",
    setting="Medical benchmarks across model families and scales, full fine-tuning on MedMCQA 10k",
    decoding="medical scored by the answer letter",
    differences=("IW-SFT, GRPO and DAPO are built for LLaMA-2-7B only (Table 2's runs), not for Qwen2.5-7B",),
)

# ---------------------------------------------------------------- the token-weighted fork
_FORK_SMALL_BASE = {"math": sel(("fork_quick", "fork_3ep"), "qwen2.5-1.5b", "base")}
FORK = TableSpec(
    name="fork",
    title="Token-weighted SFT fork",
    reference_file="token_sft_fork_results.csv",
    reference_keys=("method",),
    groups=(Group("math", "MATH-500, greedy", (Column("math500", "MATH-500", "math500"),)),),
    rows=(
        Row("base", {"math": sel("fork", "qwen2.5-7b", "base")}, None, block="Qwen2.5-7B, LoRA r32, 100k"),
        *(
            Row(
                mode,
                {"math": sel("fork", "qwen2.5-7b", mode, "numina-cot-100k")},
                None if mode in ("sft", "dft") else (mode,),
                block="Qwen2.5-7B, LoRA r32, 100k",
            )
            for mode in ("sft", "dft", "asft", "sft-topk", "sft-lr", "sft-antiop")
        ),
        Row(
            "asft",
            {"math": sel("fork_quick", "qwen2.5-1.5b", "asft", "numina-cot-10k")},
            None,
            block="Qwen2.5-1.5B, LoRA r8, 10k",
            label="ASFT, 200 steps",
            base=_FORK_SMALL_BASE,
            published={"math500": 39.8},
        ),
        Row(
            "asft",
            {"math": sel("fork_3ep", "qwen2.5-1.5b", "asft", "numina-cot-10k")},
            None,
            block="Qwen2.5-1.5B, LoRA r8, 10k",
            label="ASFT, 3 epochs",
            base=_FORK_SMALL_BASE,
            published={"math500": 37.8},
        ),
    ),
    block_label="Setting",
    setting="The token-weighted SFT fork: Qwen2.5-7B with LoRA r=32 on NuminaMath-CoT 100k (1 epoch), and "
    "Qwen2.5-1.5B with LoRA r=8 on 10k (200 steps and 3 epochs)",
    decoding="MATH-500 only, greedy decoding, n=1 (not comparable with the paper's avg@16)",
    differences=("SFT and DFT rows are ours only; the fork reported a single seed",),
)

TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (TABLE1, TABLE2, TABLE3, TABLE4, TABLE5, FORK, ALPACA_EVAL)}
