"""Per-token gradient tracing (asft.tracing): exactness of the per-token gradients, the projection's JL guarantee,
the analysis' statistics, the trace stage's output and the config's trace block."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from asft.config import ConfigError, validate_config
from asft.tracing.analysis import analyse, gini, mass_fraction, pearson, spearman, token_class
from asft.tracing.gradients import (
    RademacherProjection,
    jl_cosine_bound,
    jl_failure_probability,
    select_parameters,
    token_gradients,
    token_losses_fn,
)
from asft.tracing.spec import trace_spec, trace_targets
from tests.conftest import make_random_adapter


@pytest.fixture(scope="module")
def adapter(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_adapter(small_demo / "model", tmp_path_factory.mktemp("adapter"), rank=4, std=0.05)


def lora_model(small_demo: Path, adapter: Path, dtype: torch.dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(small_demo / "model", dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True).eval()
    return model


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sequences, prompts masked, the second right-padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 500, (2, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0
    labels = input_ids.clone()
    labels[:, :12] = -100
    labels[1, 30:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def flat_grad(loss: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


def test_per_token_gradients_are_exact_and_sum_to_the_batch_gradient(small_demo: Path, adapter: Path) -> None:
    """Against plain autograd through the model's ordinary forward (not torch.func): the batch gradient, and the
    single-token gradients of a few targets. The model is float64 but Qwen2's RMSNorm computes in float32 whatever
    the model's dtype, so sums taken in another order agree to float32 rounding (relative 1e-5), not float64's."""
    model = lora_model(small_demo, adapter, torch.float64)
    params = select_parameters(model, "lora")
    b = batch()
    sizes = {k: v.numel() for k, v in params.items()}
    projection = RademacherProjection(sizes, 64, seed=3, device=torch.device("cpu"))
    traced = token_gradients(model, params, b["input_ids"], b["attention_mask"], b["labels"], projection, 7)
    n = traced.ce.numel()
    assert n == (b["labels"][:, 1:] != -100).sum() and traced.projected.shape == (n, 64)

    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    mask = b["labels"][:, 1:] != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], b["labels"][:, 1:][mask], reduction="none")
    torch.testing.assert_close(traced.ce, ce.detach(), rtol=1e-10, atol=1e-10)
    batch_grad = flat_grad(ce.sum(), params)
    assert traced.batch_norm == pytest.approx(float(batch_grad.norm()), rel=1e-10)
    # Σ_t R·g_t = R·G: the projected per-token gradients sum to the projection of the independent batch gradient
    blocks = torch.cat([projection.block(name, torch.float64) for name in params])
    expected = batch_grad @ blocks
    scale = float(expected.abs().max())
    torch.testing.assert_close(traced.projected.sum(0), expected, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(traced.projected_batch, expected, rtol=1e-9, atol=1e-9 * scale)
    for t in (0, n // 2, n - 1):
        g = flat_grad(model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1][mask][t]
                      .log_softmax(-1)[b["labels"][:, 1:][mask][t]].neg(), params)  # fmt: skip
        assert traced.norm[t] == pytest.approx(float(g.norm()), rel=1e-5)
        cos = float(g @ batch_grad / (g.norm() * batch_grad.norm()))
        assert traced.alignment[t] == pytest.approx(cos, abs=1e-5)
        torch.testing.assert_close(traced.projected[t], g @ blocks, rtol=1e-5, atol=1e-5 * float(g.norm()))


def test_a_token_sample_keeps_the_batch_sum_over_every_target(small_demo: Path, adapter: Path) -> None:
    model = lora_model(small_demo, adapter, torch.float64)
    params = select_parameters(model, "lora")
    b = batch(1)
    projection = RademacherProjection({k: v.numel() for k, v in params.items()}, 16, 0, torch.device("cpu"))
    full = token_gradients(model, params, b["input_ids"], b["attention_mask"], b["labels"], projection, 64)
    some = torch.tensor([2, 5, 11])
    part = token_gradients(model, params, b["input_ids"], b["attention_mask"], b["labels"], projection, 2, some)
    assert part.batch_norm == pytest.approx(full.batch_norm, rel=1e-12)
    torch.testing.assert_close(part.alignment, full.alignment[some], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(part.projected, full.projected[some], rtol=1e-10, atol=1e-12)


def test_projected_alignment_stays_within_the_jl_bound(small_demo: Path, adapter: Path) -> None:
    """cos(Rg_t, RG) vs the exact cos(g_t, G) for every token, with R drawn at d = 4096 (float32 model)."""
    model = lora_model(small_demo, adapter, torch.float32)
    params = select_parameters(model, "lora")
    b = batch(2)
    dim = 4096
    projection = RademacherProjection({k: v.numel() for k, v in params.items()}, dim, 0, torch.device("cpu"))
    traced = token_gradients(model, params, b["input_ids"], b["attention_mask"], b["labels"], projection, 16)
    n = traced.ce.numel()
    projected = torch.nn.functional.cosine_similarity(
        traced.projected.double(), traced.projected_batch.double()[None], dim=1
    )
    bound = jl_cosine_bound(dim, n, failure_probability=1e-3)
    assert bound < 0.35  # a bound that says something at this d
    error = (projected - traced.alignment).abs()
    assert float(error.max()) <= bound
    # and the typical error has the JL scale ~ 1/sqrt(d), far inside the worst-case bound
    assert float(error.mean()) < 3 / math.sqrt(dim)


def test_jl_bound() -> None:
    bound = jl_cosine_bound(4096, 100, 1e-3)
    eps = bound / (2 + bound)  # invert 2ε/(1−ε)
    assert jl_failure_probability(4096, eps, 100) == pytest.approx(1e-3, rel=1e-3)
    assert jl_cosine_bound(8192, 100) < bound < jl_cosine_bound(2048, 100)
    assert jl_cosine_bound(4096, 10_000) > bound  # more pairs, looser
    assert jl_cosine_bound(16, 100) == 2.0  # too few dimensions: no information


def test_projection_is_seeded_per_parameter_name() -> None:
    sizes = {"a": 5, "b": 7}
    one = RademacherProjection(sizes, 8, 1, torch.device("cpu"))
    reordered = RademacherProjection({"b": 7, "a": 5}, 8, 1, torch.device("cpu"))
    other = RademacherProjection(sizes, 8, 2, torch.device("cpu"))
    torch.testing.assert_close(one.block("a", torch.float32), reordered.block("a", torch.float32))
    assert not torch.equal(one.block("a", torch.float32), other.block("a", torch.float32))
    values = one.block("b", torch.float64)
    assert set(values.unique().tolist()) == {-1 / math.sqrt(8), 1 / math.sqrt(8)}
    # drawn in row slices and never cached (as for a 7B matrix), the projection is the same matrix product
    sliced = RademacherProjection(sizes, 8, 1, torch.device("cpu"), cache_elements=0, slice_elements=16)
    assert sliced.rows_per_slice == 2 and sliced._slices("b") == 4
    grads = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.randn(3, 7, dtype=torch.float64)}
    expected = grads["a"] @ sliced.block("a", torch.float64) + grads["b"] @ sliced.block("b", torch.float64)
    torch.testing.assert_close(sliced(grads), expected)
    assert sliced(grads).dtype == torch.float64 and sliced({"a": grads["a"].bfloat16()}).dtype == torch.float32


def test_parameter_selection(small_demo: Path, adapter: Path) -> None:
    model = lora_model(small_demo, adapter, torch.float32)
    assert all(".lora_" in name for name in select_parameters(model, "lora"))
    assert all("layers.1.mlp" in name for name in select_parameters(model, r"layers\.1\.mlp\..*lora_B"))
    with pytest.raises(ValueError, match="selects nothing"):
        select_parameters(model, "no_such_parameter")


def test_token_losses_match_the_models_cross_entropy(small_demo: Path, adapter: Path) -> None:
    model = lora_model(small_demo, adapter, torch.float64)
    b = batch()
    losses, mask = token_losses_fn(model, b["input_ids"], b["attention_mask"], b["labels"])
    ce = losses({k: v.detach() for k, v in select_parameters(model, "lora").items()})
    assert ce.numel() == int(mask.sum()) and bool((ce > 0).all())


# --- the analysis -------------------------------------------------------------------------------------------------


def test_gini_and_mass_fraction() -> None:
    assert gini(np.ones(10)) == pytest.approx(0.0, abs=1e-12)
    assert gini(np.array([0, 0, 0, 1.0])) == pytest.approx(0.75)
    assert gini(np.array([1.0, 2, 3, 4])) == pytest.approx(0.25)
    assert mass_fraction(np.array([8.0, 1, 1])) == pytest.approx(1 / 3)  # 8 of 10 is exactly 80%
    assert mass_fraction(np.array([7.0, 2, 1])) == pytest.approx(2 / 3)
    assert math.isnan(gini(np.zeros(3)))


def test_correlations_match_pandas() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    y[:20] = y[0]  # ties
    frame = pd.DataFrame({"x": x, "y": y})
    assert pearson(x, y) == pytest.approx(frame.x.corr(frame.y))
    assert spearman(x, y) == pytest.approx(frame.x.rank().corr(frame.y.rank()))
    assert math.isnan(pearson(np.ones(5), np.arange(5.0)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" 12", "number"), ("3.5", "number"), (" +", "operator"), ("=", "operator"), (" Therefore", "word"),
     ("\n\n", "format"), (" ", "format"), (".", "format"), ("3x", "other"), ("<|endoftext|>", "other")],
)  # fmt: skip
def test_token_classes(text: str, expected: str) -> None:
    assert token_class(text) == expected


def test_special_tokens_are_format() -> None:
    assert token_class("<|endoftext|>", special=True) == "format"


def synthetic_trace() -> tuple[dict[str, np.ndarray], dict]:
    """One batch of 6 targets, 4 traced, with hand-set statistics."""
    arrays = {
        "batch": np.zeros(6, np.int32),
        "row": np.array([0, 0, 0, 1, 1, 1], np.int32),
        "position": np.array([3, 4, 5, 3, 4, 5], np.int32),
        "token_id": np.array([10, 11, 12, 10, 13, 14], np.int32),
        "ce": np.array([0.1, 2.0, 0.5, 0.3, 1.0, 0.2], np.float32),
        "ref_p": np.full(6, np.nan, np.float32),
        "weight_dft": np.exp(-np.array([0.1, 2.0, 0.5, 0.3, 1.0, 0.2], np.float32)),
        "target_index": np.array([0, 1, 3, 4]),
        "norm": np.array([1.0, 4.0, 2.0, 0.0]),
        "alignment": np.array([0.5, -0.2, 0.1, np.nan]),
        "projected": np.array([[1.0, 0], [0, -1], [1, 0.2], [0, 0]], np.float32),
        "batch_norm": np.array([3.0]),
        "projected_batch": np.array([[2.0, 0.1]], np.float32),
    }
    meta = {
        "subject": {"mode_label": "asft", "model": "m"},
        "token_text": {"10": " 7", "11": " +", "12": " so", "13": " the", "14": "\n"},
        "special_ids": [],
        "jl_cosine_bound": 2.0,
    }
    return arrays, meta


def test_analyse_a_hand_made_trace() -> None:
    arrays, meta = synthetic_trace()
    result = analyse(arrays, meta)
    assert result["tokens"] == {"target": 6, "traced": 4, "zero_gradient": 1, "batches": 1}
    assert result["opposing_fraction"] == pytest.approx(1 / 3)
    assert result["opposing_magnitude_share"] == pytest.approx(4 / 7)
    assert result["gini"] == pytest.approx(gini(np.array([1.0, 4.0, 2.0])))
    assert result["by_class"]["number"] == pytest.approx(
        {"count": 2, "share": 2 / 3, "mean_alignment": 0.3, "opposing_fraction": 0.0, "mean_magnitude": 1.5}
    )
    assert result["by_class"]["operator"]["mean_alignment"] == pytest.approx(-0.2)
    # the batch sum runs over 6 targets of which 4 are traced: Σ‖g‖ is scaled by 6/4 before dividing
    assert result["cancellation"] == [pytest.approx(3.0 / (1.5 * 7.0))]
    assert result["weights_vs_alignment"]["dft"]["pearson"] == pytest.approx(
        pearson(arrays["weight_dft"][[0, 1, 3]], np.array([0.5, -0.2, 0.1]))
    )
    assert result["projection"]["max_abs_error"] is not None
    json.dumps(result, allow_nan=False)


# --- the stage and the config -------------------------------------------------------------------------------------


def trace_config(config: dict, **trace: object) -> dict:
    config = copy.deepcopy(config)
    config["experiments"]["demo"]["trace"] = {"runs": ["asft", "base"], **trace}
    return config


def test_trace_targets_and_spec(config: dict) -> None:
    validated = validate_config(trace_config(config, tokens_per_batch=8))
    targets = list(trace_targets(validated))
    assert [t.label for t in targets] == ["base", "asft-kl0.05"]
    spec = trace_spec(validated, targets[1])
    assert spec["trace"]["batch_size"] == validated["experiments"]["demo"]["training"]["per_device_train_batch_size"]
    assert spec["trace"] == {**spec["trace"], "dim": 512, "seed": 0, "parameters": "lora", "tokens_per_batch": 8}
    assert spec["weightings"]["topk"]["weighting"] == "topk" and spec["weightings"]["topk"]["keep_ratio"] == 0.7
    assert spec["subject"]["run_id"] == "tiny/arith/asft-kl0.05/seed0"
    assert trace_spec(validated, targets[0])["subject"]["mode_label"] == "base"


@pytest.mark.parametrize(
    ("trace", "message"),
    [
        ({"runs": ["nope"]}, r"experiments\.demo\.trace\.runs\[0\]: 'nope' is no run"),
        ({"runs": ["asft"], "parameters": "(unclosed"}, r"experiments\.demo\.trace\.parameters: .* not a regular"),
        ({"runs": ["asft"], "dim": 0}, r"dim"),
        ({"runs": ["asft"], "extra": 1}, r"extra"),
    ],
)
def test_bad_trace_blocks_are_refused_by_key(config: dict, trace: dict, message: str) -> None:
    config["experiments"]["demo"]["trace"] = trace
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_trace_stage_writes_a_complete_folder(small_demo: Path, adapter: Path, config: dict, tmp_path: Path) -> None:
    """`asft trace` on a LoRA run: the run's tokenisation, the sample sizes asked for, p_ref from the disabled
    adapter, mode weights on every target; then the analysis files."""
    from asft.tracing.analysis import analyse_trace
    from asft.tracing.stage import load_trace, trace

    validated = validate_config(trace_config(config, batches=2, batch_size=3, tokens_per_batch=5, dim=32))
    target = [t for t in trace_targets(validated) if t.run is not None][0]
    spec = json.loads(json.dumps(trace_spec(validated, target)))
    out = tmp_path / "trace"
    meta = trace(small_demo / "model", small_demo / "data" / "train.jsonl", spec, out, adapter_dir=adapter)
    arrays, loaded = load_trace(out)
    assert loaded["traced_tokens"] == meta["traced_tokens"] == 10
    assert arrays["projected"].shape == (10, 32) and arrays["batch_norm"].shape == (2,)
    assert len(loaded["sequences"]) == 6
    assert len({seq["example_id"] for seq in loaded["sequences"]}) == 6  # sampled without replacement
    assert loaded["stack"]["torch"] and loaded["stack"]["peft"]
    assert np.isfinite(arrays["ref_p"]).all() and np.isfinite(arrays["weight_ref_ratio"]).all()
    assert not np.allclose(arrays["weight_ref_ratio"], 1.0)  # the adapter changes p_θ away from p_ref
    assert set(np.unique(arrays["batch"])) == {0, 1}
    # every traced token's text and its sequence are there for the viewer
    assert all(str(int(i)) in loaded["token_text"] for i in arrays["token_id"])
    result = analyse_trace(out, tmp_path / "analysis")
    assert result["tokens"]["traced"] == 10
    from asft.tracing.analysis import traced_table, view_model

    view = view_model(traced_table(arrays, loaded), result, loaded, arrays)
    tokens = [t for seq in view["sequences"] for t in seq["tokens"]]
    assert sum(t["target"] for t in tokens) == 10
    assert sum(t.get("untraced", False) for t in tokens) == arrays["ce"].size - 10
    for name in ("analysis.json", "summary.md", "analysis.png", "viewer.html"):
        assert (tmp_path / "analysis" / name).stat().st_size > 0


def test_a_failed_trace_leaves_no_folder(
    small_demo: Path, config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while the folder is being written (here: the arrays) leaves neither it nor its temp sibling."""
    from asft.tracing import stage

    validated = validate_config(trace_config(config, batches=1, batch_size=2, tokens_per_batch=2, dim=8))
    spec = json.loads(json.dumps(trace_spec(validated, next(iter(trace_targets(validated))))))
    out = tmp_path / "trace"

    def disk_full(path: object, **arrays: object) -> None:
        Path(str(path)).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(stage.np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="No space"):
        stage.trace(small_demo / "model", small_demo / "data" / "train.jsonl", spec, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_trace_refuses_an_adapter_and_a_reference_together(small_demo: Path, config: dict, tmp_path: Path) -> None:
    from asft.tracing.stage import trace

    validated = validate_config(trace_config(config))
    spec = trace_spec(validated, next(iter(trace_targets(validated))))
    with pytest.raises(ValueError, match="not both"):
        trace(small_demo / "model", tmp_path / "d.jsonl", spec, tmp_path / "t", small_demo, small_demo / "model")


def test_comparison_sets_published_figures_beside_the_fork_models(tmp_path: Path) -> None:
    from asft.tracing.compare import published, write_comparison

    arrays, meta = synthetic_trace()
    paths = []
    for model in ("qwen2.5-1.5b", "tiny"):
        result = analyse(arrays, {**meta, "subject": {"mode_label": "asft", "model": model}})
        paths.append(tmp_path / f"{model}.json")
        paths[-1].write_text(json.dumps(result))
    table = write_comparison(paths, tmp_path / "out")
    titles = [c["title"] for c in table["columns"]]
    assert titles == ["asft · qwen2.5-1.5b", "asft · tiny", "qwen2.5-1.5b (fork, published)"]
    gini_row = [row["key"] for row in table["rows"]].index("gini")
    assert table["values"][2][gini_row] == published()["qwen2.5-1.5b"]["gini"] == 0.515
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "| Gini of magnitudes |" in markdown and "0.515" in markdown
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 5_000


def test_a_full_fine_tune_is_traced_on_a_regex_with_its_starting_weights_as_reference(
    small_demo: Path, config: dict, tmp_path: Path
) -> None:
    """No adapter: the selected weights themselves are traced and p_ref comes from `--reference` (here the same
    weights, so p_ref = p_θ and ref_ratio weighs every token 1)."""
    from asft.tracing.stage import load_trace, trace

    config["experiments"]["demo"]["training"]["finetune"] = "full"
    validated = validate_config(
        trace_config(
            config, batches=1, batch_size=2, tokens_per_batch=4, dim=16, parameters=r"layers\.1\.mlp\.", dtype="float64"
        )
    )
    target = [t for t in trace_targets(validated) if t.run is not None][0]
    spec = json.loads(json.dumps(trace_spec(validated, target)))
    assert "lora" not in spec["training"]
    model = small_demo / "model"
    meta = trace(model, small_demo / "data" / "train.jsonl", spec, tmp_path / "t", reference_dir=model)
    arrays, _ = load_trace(tmp_path / "t")
    assert meta["parameters"]["tensors"] == 3 and meta["reference"] == str(model)
    np.testing.assert_allclose(arrays["ref_p"], np.exp(-arrays["ce"]), rtol=1e-5)
    np.testing.assert_allclose(arrays["weight_ref_ratio"], 1.0, atol=1e-5)
    assert np.isfinite(arrays["alignment"]).all() and (arrays["norm"] > 0).all()
