"""The embedded demo: a tiny Qwen2-architecture model, its tokenizer and data, built entirely locally.

It lets the whole pipeline (LoRA fine-tuning with every loss, merge, generation, \\boxed{} grading) run on a
2-core CPU with no model hub. The model is briefly pretrained on arithmetic facts and on problems answered in
a plain style ("So the result is 12."), so it has real preferences that fine-tuning on \\boxed{} answers
moves away from, which is what the KL anchor is about. Everything is deterministic from the seed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from asft.data import ALPACA_TEMPLATE, write_jsonl

log = logging.getLogger(__name__)

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
STAND_INS = Path(__file__).parent / "stand_ins"
# packaged stand-in -> its name under the demo's benchmarks/
STAND_IN_BENCHMARKS = {"humaneval_plus.jsonl": "code.jsonl", "alpaca_eval.json": "alpaca_eval.json"}
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NAMES = ("Tom", "Ana", "Li", "Sam", "Mia", "Raj", "Eva", "Ben", "Zoe", "Kai")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles")
# Question templates per operation; {a} and {b} are the operands.
QUESTIONS = {
    "+": (
        "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        "{name} collects {a} {item} on Monday and {b} {item} on Tuesday. How many {item} in total?",
        "What is {a} plus {b}?",
    ),
    "-": (
        "{name} has {a} {item} and gives away {b}. How many {item} are left?",
        "There are {a} {item} in a box. {name} takes out {b}. How many {item} remain in the box?",
        "What is {a} minus {b}?",
    ),
    "*": (
        "{name} has {a} bags with {b} {item} in each bag. How many {item} are there?",
        "What is {a} times {b}?",
    ),
}


@dataclass(frozen=True)
class Problem:
    question: str
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def equation(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer}"

    def boxed_response(self) -> str:
        """The fine-tuning target: a short derivation ending in \\boxed{}."""
        return f"We compute {self.equation}. The answer is \\boxed{{{self.answer}}}."

    def plain_response(self) -> str:
        """The pretraining style the base model learns (no \\boxed{})."""
        return f"{self.equation}. So the result is {self.answer}."


def make_problem(rng: random.Random) -> Problem:
    """One random word problem with small operands (non-negative results)."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(1, 19), rng.randint(1, 19)
        if op == "-" and b > a:
            a, b = b, a
    template = rng.choice(QUESTIONS[op])
    question = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return Problem(question, a, op, b)


def make_problem_sets(rng: random.Random, n_train: int, n_test: int, n_pretrain: int) -> tuple[list, list, list]:
    """Disjoint test problems; training and pretraining problems never repeat a test question."""
    test: dict[str, Problem] = {}
    while len(test) < n_test:
        problem = make_problem(rng)
        test.setdefault(problem.question, problem)
    train, pretrain = [], []
    while len(train) < n_train or len(pretrain) < n_pretrain:
        problem = make_problem(rng)
        if problem.question in test:
            continue
        (train if len(train) < n_train else pretrain).append(problem)
    return list(test.values()), train, pretrain


def pretraining_texts(problems: list[Problem], rng: random.Random, boxed_fraction: float = 0.2) -> list[str]:
    """Half arithmetic facts, half Alpaca-formatted problems, mostly answered in the plain style.

    A minority of \\boxed{} answers gives the fine-tuning format a small but real prior probability, as a real
    base model has for a format it has seen, so that probability-weighted losses (DFT, ASFT) have signal.
    """
    texts = []
    for index, problem in enumerate(problems):
        if index % 2:
            facts = [make_problem(rng).equation for _ in range(6)]
            texts.append("\n".join(facts))
        else:
            answer = problem.boxed_response() if rng.random() < boxed_fraction else problem.plain_response()
            texts.append(ALPACA_TEMPLATE.format(instruction=problem.question) + " " + answer)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):  # noqa: ANN201 - transformers tokenizer
    """Byte-level BPE with Qwen2's own normaliser and pre-tokenizer, so transformers loads it unchanged."""
    from tokenizers import Tokenizer, trainers
    from transformers import Qwen2Tokenizer

    template = Qwen2Tokenizer()._tokenizer  # Qwen2's normaliser/pre-tokenizer/decoder, empty vocabulary
    tokenizer = Tokenizer.from_str(template.to_str())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts + [CHAT_TEMPLATE], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    qwen = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    qwen.chat_template = CHAT_TEMPLATE
    qwen.model_max_length = 512
    return qwen


def build_model(vocab_size: int, seed: int):  # noqa: ANN201 - transformers model
    """Qwen2 architecture, 2 layers of width 128, head_dim 32 (vLLM's CPU backend needs head_dim >= 32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int, batch_size: int = 32, max_length: int = 128):  # noqa: ANN001
    """A plain AdamW causal-LM loop over shuffled texts; returns the final loss."""
    generator = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(t + EOS, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows = [encoded[i] for i in torch.randint(len(encoded), (batch_size,), generator=generator).tolist()]
        width = max(map(len, rows))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log.info("pretrain step %d/%d loss %.3f", step + 1, steps, loss.item())
    model.eval()
    return float(loss.detach())


LETTERS = "ABCD"


def choice_options(problem: Problem, rng: random.Random) -> tuple[list[int], int]:
    """Four distinct numeric options, the answer among them at a random position: (options, answer index)."""
    options = {problem.answer}
    while len(options) < 4:
        options.add(max(0, problem.answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])))
    ordered = sorted(options - {problem.answer})
    rng.shuffle(ordered)
    index = rng.randrange(4)
    ordered.insert(index, problem.answer)
    return ordered, index


def write_choice_sets(out_dir: Path, train: list[Problem], test: list[Problem], seed: int) -> None:
    """The multiple-choice stand-ins of the paper's medical data: training pairs in the appendix's format
    (question, lettered options; explanation then "So the answer to this question is X") and a benchmark in
    MedMCQA's row layout. A generator of their own, so the arithmetic files stay what they were."""
    rng = random.Random(seed + 1)
    records = []
    for p in train:
        options, index = choice_options(p, rng)
        lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        records.append(
            {
                "instruction": f"{p.question}\n{lines}",
                "response": f"We compute {p.equation}. So the answer to this question is {LETTERS[index]}",
            }
        )
    write_jsonl(out_dir / "data" / "choice_train.jsonl", records)
    rows = []
    for i, p in enumerate(test):
        options, index = choice_options(p, rng)
        row = {"id": f"choice/{i}", "question": p.question, "cop": index, "exp": p.equation}
        row.update({key: str(o) for key, o in zip(("opa", "opb", "opc", "opd"), options, strict=True)})
        rows.append(row)
    write_jsonl(out_dir / "benchmarks" / "choice.jsonl", rows)


def build_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 512,
    n_test: int = 64,
    n_pretrain: int = 4000,
    pretrain_steps: int = 800,
    vocab_size: int = 640,
) -> dict:
    """Write model/, data/train.jsonl, benchmarks/arith.jsonl (MATH-500 format), the multiple-choice stand-ins
    data/choice_train.jsonl and benchmarks/choice.jsonl (MedMCQA format), and the code and judged stand-ins
    benchmarks/code.jsonl (HumanEval+ format) and benchmarks/alpaca_eval.json under `out_dir`."""
    from transformers import GenerationConfig

    started = time.perf_counter()
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    test, train, pretrain_problems = make_problem_sets(rng, n_train, n_test, n_pretrain)
    texts = pretraining_texts(pretrain_problems, rng)

    write_jsonl(
        out_dir / "data" / "train.jsonl",
        ({"instruction": p.question, "response": p.boxed_response()} for p in train),
    )
    write_jsonl(
        out_dir / "benchmarks" / "arith.jsonl",
        (
            {
                "problem": p.question,
                "solution": p.boxed_response(),
                "answer": str(p.answer),
                "subject": "Arithmetic",
                "level": 1,
                "unique_id": f"arith/{i}",
            }
            for i, p in enumerate(test)
        ),
    )

    write_choice_sets(out_dir, train, test, seed)
    # The code and instruction-following stand-ins of the paper's smoke run: written by hand (asft/stand_ins),
    # since the tiny model cannot pass a real coding problem or answer a real instruction anyway.
    for name, dest in STAND_IN_BENCHMARKS.items():
        shutil.copyfile(STAND_INS / name, out_dir / "benchmarks" / dest)

    tokenizer = train_tokenizer(texts + [p.boxed_response() for p in train], vocab_size)
    model = build_model(len(tokenizer), seed)
    final_loss = pretrain(model, tokenizer, texts, pretrain_steps, seed)
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64
    )
    model.config.eos_token_id = eos_ids[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = None
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    summary = {
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_final_loss": final_loss,
        "n_train": len(train),
        "n_test": len(test),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("demo built in %.1fs: %s", summary["seconds"], summary)
    return summary
