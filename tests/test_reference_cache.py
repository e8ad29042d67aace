"""The cached reference (asft.reference_cache): exact where it claims exact, unbiased where it estimates, and a
disk format that refuses what it was not built for. Float64, fixed seeds: every test is deterministic.

Statistical tolerance: an unbiased estimator's mean over R independent draws is off by about its standard error
SE = std/√R, so the tests require |mean − exact| < 5·SE for each token's KL and each gradient entry. 5 SE because
the draws are seeded (deterministic, so a pass is no luck of the day) yet the seed is not picked to pass: under
normality a 5-SE deviation has two-sided probability 6e-7, < 2e-4 even over the few hundred entries checked at
once, while any bias larger than 5 SE fails; the top-k test shows the same check rejecting a biased estimator.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from asft import reference_cache as rc
from asft.losses import LossSpec, kl_forward, loss_from_logits, sequence_ids_for, shifted_targets, token_weights

IDENTITY = {"model": "demo-base@abc123", "tokenizer": "demo-tok@abc123", "template": "chatml", "max_length": 64}
Z = 5.0  # standard errors: see the module docstring


def _batch(seed: int, b: int = 3, t: int = 9, v: int = 40, scale: float = 1.0, dtype=torch.float64):
    """Policy and reference logits [B, T, V] and labels with a prompt (-100) prefix and right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    ref_logits = (logits.double() + torch.randn(b, t, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    for row in range(b):
        labels[row, : 1 + row] = -100  # prompt
        labels[row, t - row :] = -100  # padding
    return logits, ref_logits, labels


def _stats(ref_logits: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0, chunk_rows: int = 1024) -> dict:
    mask, targets = shifted_targets(labels)
    return rc.reference_statistics(ref_logits, targets, mask, k, rc.sampling_generator(seed), chunk_rows=chunk_rows)


def _write(path: Path, ids: list, ref_logits: torch.Tensor, labels: torch.Tensor, k: int = 4, seed: int = 0) -> Path:
    stats = _stats(ref_logits, labels, k, seed)
    with rc.write_cache(path, IDENTITY, k=k, seed=seed) as writer:
        for example_id, part in zip(ids, rc.split_by_example(stats, shifted_targets(labels)[0]), strict=True):
            writer.add(example_id, part)
    return path


# --- exact: ref_ratio (sft-lr) and iw_sft (iw-sft) weights ---------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        LossSpec(weighting="ref_ratio", alpha=2.0, sft_weight=0.5),
        LossSpec(weighting="iw_sft", iw_temp=0.5, iw_clip=2.0),
    ],
    ids=str,
)
@pytest.mark.parametrize("route", ["float64-memory", "float32-disk"])
def test_ref_ratio_from_cache_equals_live_reference_exactly(route: str, spec: LossSpec, tmp_path: Path) -> None:
    """sft-lr (and iw-sft) weights, loss and gradient from cached target log-probs are bit-equal to the
    live-reference path (float32 through the on-disk float32 arrays, the production precision)."""
    dtype = torch.float64 if route == "float64-memory" else torch.float32
    logits, ref_logits, labels = _batch(1, dtype=dtype, scale=3.0)
    mask, targets = shifted_targets(labels)
    sequence_ids = sequence_ids_for(spec, mask)
    if route == "float64-memory":
        cached = _stats(ref_logits, labels, k=2, chunk_rows=3)  # chunked on purpose
    else:
        ids = ["x", 3, "y"]
        cache = rc.open_cache(_write(tmp_path / "c", ids, ref_logits, labels), IDENTITY)
        cached = cache.batch(ids, targets=targets)

    live_logp = torch.log_softmax(ref_logits[:, :-1][mask], -1, dtype=dtype)
    live_ref_p = live_logp.gather(-1, targets[:, None]).squeeze(-1).exp()
    ce = -torch.log_softmax(logits[:, :-1][mask], -1, dtype=dtype).gather(-1, targets[:, None]).squeeze(-1)
    live_w = token_weights(ce, live_ref_p, spec, sequence_ids)
    cached_w = token_weights(ce, cached["target_logp"].to(dtype).exp(), spec, sequence_ids)
    assert torch.equal(cached_w, live_w) and not torch.all(live_w == live_w[0])  # real, varying weights

    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    live_loss, live_stats = loss_from_logits(a, labels, spec, ref_logits=ref_logits)
    cached_loss, cached_stats = rc.cached_loss_from_logits(b, labels, spec, cached)
    live_loss.backward()
    cached_loss.backward()
    assert torch.equal(cached_loss, live_loss) and torch.equal(b.grad, a.grad)
    assert cached_stats["weight_mean"] == live_stats["weight_mean"]


# --- unbiased: the sampled forward KL -------------------------------------------------------------------------------


def _draws(r: int, k: int, seed: int = 0):
    """R independent K-sample caches of one batch (one call with R·K samples: draws with replacement are iid),
    the estimator per draw and its gradient w.r.t. the policy logits, and the exact KL and gradient."""
    logits, ref_logits, labels = _batch(2, b=2, t=6, v=32, scale=0.7)  # min p_ref ≈ 1.4e-3: every id gets drawn
    mask, targets = shifted_targets(labels)
    stats = _stats(ref_logits, labels, k=r * k, seed=seed)
    rows = logits[:, :-1][mask]  # [n, V]
    n, v = rows.shape
    sample_ids = stats["sample_ids"].view(n, r, k).transpose(0, 1)  # [R, n, K]
    z = rows.expand(r, n, v).clone().requires_grad_()
    estimate = rc.cached_forward_kl_from_logits(z, sample_ids, stats["entropy"])  # [R, n]
    estimate.sum().backward()  # draw r's gradient lands in z.grad[r] only

    exact_z = rows.clone().requires_grad_()
    ref_logp = torch.log_softmax(ref_logits[:, :-1][mask], -1)
    exact = kl_forward(torch.log_softmax(exact_z, -1), ref_logp)
    exact.sum().backward()
    return estimate.detach(), z.grad, exact.detach(), exact_z.grad, rows, ref_logp, sample_ids


def _within(draws: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|mean − exact|, SE) per entry over the draws (dim 0)."""
    return (draws.mean(0) - exact).abs(), draws.std(0) / draws.shape[0] ** 0.5


def test_sampled_forward_kl_is_unbiased_in_value_and_gradient() -> None:
    estimate, grad, exact, exact_grad, *_ = _draws(r=4000, k=4)
    err, se = _within(estimate, exact)
    assert torch.all(se > 0) and torch.all(err < Z * se), (err / se).max()
    g_err, g_se = _within(grad, exact_grad)
    assert torch.all(g_se > 0)  # every vocabulary entry was sampled: no entry passes by zero variance
    assert torch.all(g_err < Z * g_se), (g_err / g_se).max()
    assert torch.all(exact > 0.05) and exact.sum() > 20 * se.sum()  # a KL large enough that bias would show


def test_sampled_forward_kl_in_the_anchored_loss_is_unbiased() -> None:
    """ASFT (dft + λ·KL): the cached loss and its gradient average, over draws, to the live loss and gradient."""
    r, k = 400, 4
    logits, ref_logits, labels = _batch(3, b=2, t=6, v=12, scale=0.5)  # min p_ref ≈ 1e-2: every id gets drawn
    spec = LossSpec(weighting="dft", kl_weight=0.5)
    stats = _stats(ref_logits, labels, k=r * k, seed=1)
    a = logits.clone().requires_grad_()
    live, live_stats = loss_from_logits(a, labels, spec, ref_logits=ref_logits, num_target_tokens=20)
    live.backward()
    losses, grads = [], []
    for i in range(r):
        cached = dict(stats, sample_ids=stats["sample_ids"][:, i * k : (i + 1) * k])
        b = logits.clone().requires_grad_()
        loss, _ = rc.cached_loss_from_logits(b, labels, spec, cached, num_target_tokens=20)
        loss.backward()
        losses.append(loss.detach())
        grads.append(b.grad)
    err, se = _within(torch.stack(losses), live.detach())
    assert se > 0 and err < Z * se
    g_err, g_se = _within(torch.stack(grads), a.grad)
    moving = a.grad != 0  # positions without a target have zero gradient in both
    assert torch.all(g_se[moving] > 0) and torch.all(g_err[moving] < Z * g_se[moving])
    assert torch.all(torch.stack(grads)[:, ~moving] == 0)


CACHED_SPECS = [
    LossSpec(weighting="dft", kl_weight=0.5),  # asft
    LossSpec(weighting="none", kl_weight=0.3),  # sft+kl
    LossSpec(weighting="ref_ratio"),  # sft-lr: exact
    LossSpec(weighting="topk", kl_weight=0.2),  # a batch-statistic weighting with an anchor
    LossSpec(weighting="ref_ratio", kl_weight=0.1, sft_weight=0.5),
    LossSpec(weighting="none"),  # no anchor: the KL is only a statistic
    LossSpec(weighting="iw_sft", kl_weight=0.1, iw_clip=1.5),  # iw-sft: per sequence, exact
]


@pytest.mark.parametrize("spec", CACHED_SPECS, ids=str)
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_cached_loss_equals_full_logits_reference(spec: LossSpec, chunk_size: int) -> None:
    """The training kernel with a cache (`loss_from_hidden(..., cached=)`) equals `cached_loss_from_logits` on
    hidden @ W.T in loss, statistics and gradients w.r.t. hidden and the head, for chunk sizes that divide the
    tokens, do not, and exceed them (float64)."""
    from asft.losses import loss_from_hidden

    g = torch.Generator().manual_seed(7)
    b, t, d, v = 3, 9, 6, 40
    hidden = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    head = torch.randn(v, d, generator=g, dtype=torch.float64)
    _, ref_logits, labels = _batch(8, b=b, t=t, v=v)
    cached = _stats(ref_logits, labels, k=5, seed=2)

    h1, w1 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    expected, expected_stats = rc.cached_loss_from_logits(h1 @ w1.T, labels, spec, cached, num_target_tokens=25)
    expected.backward()
    h2, w2 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    loss, stats = loss_from_hidden(h2, w2, labels, spec, num_target_tokens=25, chunk_size=chunk_size, cached=cached)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-12)
    assert stats.keys() == expected_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(expected_stats[key], rel=1e-12, abs=1e-12), key
    with torch.no_grad():  # evaluation: same value, no gradient work
        no_grad, _ = loss_from_hidden(hidden, head, labels, spec, num_target_tokens=25, cached=cached)
    torch.testing.assert_close(no_grad, expected.detach(), rtol=1e-12, atol=1e-12)


def test_chunked_cached_loss_refusals_and_empty_batch() -> None:
    """Both references at once, a reverse-KL anchor and misaligned rows are refused; no targets gives 0 and zero
    gradients."""
    from asft.losses import loss_from_hidden

    hidden, head = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    cached = _stats(torch.randn(2, 5, 11, dtype=torch.float64), labels, k=3)
    asft = LossSpec(weighting="dft", kl_weight=0.5)
    with pytest.raises(ValueError, match="not both"):
        loss_from_hidden(hidden, head, labels, asft, ref_hidden=hidden, cached=cached)
    with pytest.raises(ValueError, match="kl_direction 'reverse'"):
        loss_from_hidden(
            hidden, head, labels, LossSpec(weighting="dft", kl_weight=0.5, kl_direction="reverse"), cached=cached
        )
    shifted = labels.clone()
    shifted[0, 2] = (shifted[0, 2] + 1) % 11
    with pytest.raises(ValueError, match="first difference at target token 1"):
        loss_from_hidden(hidden, head, shifted, asft, cached=cached)
    empty_labels = torch.full_like(labels, -100)
    empty = _stats(torch.randn(2, 5, 11, dtype=torch.float64), empty_labels, k=3)
    h = hidden.clone().requires_grad_()
    loss, stats = loss_from_hidden(h, head, empty_labels, asft, cached=empty)
    loss.backward()
    assert float(loss.detach()) == 0.0 and stats["target_tokens"] == 0 and torch.all(h.grad == 0)


def test_analytic_gradient_equals_autograd() -> None:
    """The chunked kernel's form: d estimate/d logits = p − counts/K, repeated samples counted."""
    _, grad, _, _, rows, _, sample_ids = _draws(r=3, k=8)
    logp = torch.log_softmax(rows, -1)
    entropy = torch.rand(rows.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        kl, analytic = rc.cached_forward_kl_analytic(logp, sample_ids[i], entropy, True)
        assert torch.allclose(analytic, grad[i], rtol=0, atol=1e-12)
        assert torch.allclose(kl, rc.cached_forward_kl_from_logits(rows, sample_ids[i], entropy), rtol=0, atol=1e-12)
    assert any(len(set(row.tolist())) < 8 for row in sample_ids.reshape(-1, 8))  # repeats occurred
    assert rc.cached_forward_kl_analytic(logp, sample_ids[0], entropy, False)[1] is None


def test_topk_tail_caching_is_biased() -> None:
    """Comparison only: the top-k + tail KL (k = the sampler's K) fails the 5-SE check the sampled estimator passes,
    by a wide margin, and lies below the exact KL (data-processing inequality)."""
    estimate, _, exact, exact_grad, rows, ref_logp, _ = _draws(r=4000, k=4)
    _, se = _within(estimate, exact)
    top = rc.topk_tail_statistics(ref_logp, 4)
    z = rows.clone().requires_grad_()
    topk_kl = rc.topk_tail_forward_kl(torch.log_softmax(z, -1), top["top_ids"], top["top_logp"])
    topk_kl.sum().backward()
    bias = exact - topk_kl.detach()
    assert torch.all(bias > Z * se)  # every token fails the check the sampled estimator passes
    assert bias.sum() > 10 * Z * se.square().sum().sqrt()  # summed over the batch: by more than 10x the tolerance
    assert (z.grad - exact_grad).abs().max() > 0.05  # the gradient is biased too (exact: 0 expected error)


# --- sampling and directions -----------------------------------------------------------------------------------------


def test_samples_reproducible_from_seed_and_forward_only() -> None:
    _, ref_logits, labels = _batch(4)
    first, again, other = (_stats(ref_logits, labels, k=16, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["sample_ids"], other["sample_ids"])
    assert rc.supported_kl_directions() == {"forward"}
    logits = ref_logits.clone()
    with pytest.raises(ValueError, match="kl_direction 'reverse' cannot use a cached reference"):
        rc.cached_loss_from_logits(
            logits, labels, LossSpec(weighting="dft", kl_weight=0.1, kl_direction="reverse"), first
        )


# --- on disk --------------------------------------------------------------------------------------------------------


def test_round_trip_by_example_id_in_shuffled_order(tmp_path: Path) -> None:
    _, ref_logits, labels = _batch(5, b=5)
    ids = ["q-17", 4, "q-2", 0, "0"]  # ints and strings, "0" distinct from 0
    path = _write(tmp_path / "cache", ids, ref_logits, labels, k=16, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no .tmp left behind
    cache = rc.open_cache(path, IDENTITY)
    assert isinstance(cache.arrays["sample_ids"], np.memmap) and cache.arrays["sample_ids"].dtype == np.int32
    assert (cache.k, cache.header["seed"], cache.header["identity"]) == (16, 3, IDENTITY)

    mask, _ = shifted_targets(labels)
    parts = dict(zip(ids, rc.split_by_example(_stats(ref_logits, labels, k=16, seed=3), mask), strict=True))
    order = [2, 0, 4, 1, 3]
    random.Random(0).shuffle(order)
    for example_id in (ids[i] for i in order):
        stored = cache.example(example_id)
        for name, dtype in rc.ARRAYS.items():
            assert np.array_equal(stored[name], parts[example_id][name].numpy().astype(dtype)), (example_id, name)
    shuffled = [ids[i] for i in order]
    batch = cache.batch(shuffled, targets=shifted_targets(labels[order])[1])
    assert batch["sample_ids"].dtype == torch.long and batch["sample_ids"].shape[1] == 16
    assert torch.equal(batch["entropy"], torch.cat([parts[i]["entropy"].float() for i in shuffled]))
    with pytest.raises(ValueError, match="does not match this batch's targets"):
        cache.batch(ids, targets=shifted_targets(labels[order])[1])  # right ids, wrong order of rows
    with pytest.raises(KeyError, match="'missing'"):
        cache.example("missing")


def test_corrupted_array_is_refused(tmp_path: Path) -> None:
    _, ref_logits, labels = _batch(6)
    path = _write(tmp_path / "cache", [0, 1, 2], ref_logits, labels)
    rc.open_cache(path, IDENTITY)
    data = bytearray((path / "sample_ids.npy").read_bytes())
    data[-1] ^= 0x01  # one bit of one sampled id
    (path / "sample_ids.npy").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sample_ids\.npy fails its sha256"):
        rc.open_cache(path, IDENTITY)
    rc.open_cache(path, IDENTITY, verify=False)  # only the checksum refused it


@pytest.mark.parametrize(
    ("field", "value"), [("tokenizer", "other-tok@def"), ("template", "alpaca"), ("max_length", 32)]
)
def test_mismatched_identity_is_refused_naming_the_field(field: str, value: object, tmp_path: Path) -> None:
    _, ref_logits, labels = _batch(7)
    path = _write(tmp_path / "cache", [0, 1, 2], ref_logits, labels)
    expected = dict(IDENTITY, **{field: value})
    message = f"different {field}: cache has {IDENTITY[field]!r}, this run has {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        rc.open_cache(path, expected)
    with pytest.raises(ValueError, match="different dataset: cache has '<absent>'"):
        rc.open_cache(path, dict(IDENTITY, dataset="sha:1"))  # a field only one side records also counts


def test_writer_is_atomic_and_strict(tmp_path: Path) -> None:
    _, ref_logits, labels = _batch(8)
    parts = rc.split_by_example(_stats(ref_logits, labels, k=4), shifted_targets(labels)[0])
    with pytest.raises(ValueError, match="added twice"):
        with rc.write_cache(tmp_path / "cache", IDENTITY, k=4, seed=0) as writer:
            writer.add(1, parts[0])
            writer.add(1, parts[1])
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temp folder
    with pytest.raises(ValueError, match=r"missing \['max_length'\]"):
        with rc.write_cache(tmp_path / "cache", {k: v for k, v in IDENTITY.items() if k != "max_length"}, 4, 0):
            pass
    with pytest.raises(ValueError, match="sample_ids has shape"):
        with rc.write_cache(tmp_path / "cache", IDENTITY, k=8, seed=0) as writer:
            writer.add(0, parts[0])
    header = json.loads((_write(tmp_path / "ok", [0, 1, 2], ref_logits, labels) / "header.json").read_text())
    assert header["format"] == rc.FORMAT and header["version"] == rc.VERSION
    assert [e[0] for e in header["examples"]] == [0, 1, 2] and header["n_tokens"] == sum(
        e[2] for e in header["examples"]
    )
