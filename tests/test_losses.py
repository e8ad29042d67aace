"""Losses: hand-computed values for every mode, both paths against an independent float64 reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from asft.losses import LossSpec, count_target_tokens, loss_from_hidden, loss_from_logits

WEIGHTINGS = ("none", "dft", "topk", "antiop", "ref_ratio")


# --- an independent reference: plain Python loops over tokens, float64 ---------------------------------------


def reference_loss(logits, labels, spec: LossSpec, ref_logits=None, num_target_tokens=None) -> torch.Tensor:
    """Σ w·CE/N + λ·ΣKL/N written token by token, straight from DESIGN.md's table."""
    tokens = []  # (logp row, ref logp row, target)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            logp = torch.log_softmax(logits[b, t].double(), -1)
            ref = torch.log_softmax(ref_logits[b, t].double(), -1) if ref_logits is not None else None
            tokens.append((logp, ref, y))
    n = len(tokens)
    if n == 0:
        return logits.sum() * 0.0
    norm = float(num_target_tokens) if num_target_tokens is not None else float(n)
    ce = [-lp[y] for lp, _, y in tokens]
    ce_values = [float(c.detach()) for c in ce]
    if spec.weighting == "none":
        weights = [1.0] * n
    elif spec.weighting == "dft":
        weights = [math.exp(-c) for c in ce_values]
    elif spec.weighting == "topk":
        k = max(1, int(n * spec.keep_ratio))
        threshold = sorted(ce_values)[k - 1]
        kept = [c <= threshold for c in ce_values]
        weights = [n / sum(kept) if keep else 0.0 for keep in kept]
    elif spec.weighting == "antiop":
        median = sorted(ce_values)[(n - 1) // 2]  # the lower median, as torch.median
        cap = spec.clip_mult * median
        weights = [1.0 if c <= cap else cap / c for c in ce_values]
    else:
        weights = []
        for (_, ref, y), c in zip(tokens, ce_values, strict=True):
            gap = min(1.0, max(-1.0, math.exp(float(ref[y])) - math.exp(-c)))
            weights.append(max(0.1, 1 + spec.alpha * gap))
    total = sum(w * c for w, c in zip(weights, ce, strict=True))
    if spec.kl_weight > 0:
        for lp, ref, _ in tokens:
            if spec.kl_direction == "forward":
                kl = (ref.exp() * (ref - lp)).sum()
            else:
                kl = (lp.exp() * (lp - ref)).sum()
            total = total + spec.kl_weight * kl
    return total / norm


def random_batch(seed: int, dtype=torch.float64, fully_masked_row: bool = True):
    generator = torch.Generator().manual_seed(seed)
    batch, length = (
        int(torch.randint(1, 4, (1,), generator=generator)),
        int(torch.randint(2, 9, (1,), generator=generator)),
    )
    dim, vocab = (
        int(torch.randint(2, 7, (1,), generator=generator)),
        int(torch.randint(3, 13, (1,), generator=generator)),
    )
    hidden = torch.randn(batch, length, dim, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=generator, dtype=dtype)
    ref_hidden = hidden + 0.5 * torch.randn(batch, length, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[torch.rand(batch, length, generator=generator) < 0.3] = -100
    if fully_masked_row and batch > 1:
        labels[0] = -100
    return hidden, weight, ref_hidden, labels


# --- hand-computed examples ---------------------------------------------------------------------------------------

# Two target tokens, V = 3. Position 0 predicts label 0, position 1 predicts label 2.
LOGITS = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
LABELS = torch.tensor([[-100, 0, 2]])
REF_LOGITS = torch.zeros_like(LOGITS)  # uniform reference


def _hand_values() -> dict[str, float]:
    z0 = math.log(math.exp(2) + 2)
    ce0, ce1 = z0 - 2.0, math.log(math.exp(1) + 2)  # -log p(0 | [2,0,0]), -log p(2 | [0,1,0])
    p0, p1 = math.exp(-ce0), math.exp(-ce1)
    q = 1 / 3
    # forward KL(uniform ‖ p) = Σ q (log q - log p)
    kl0 = sum(q * (math.log(q) - (x - z0)) for x in (2.0, 0.0, 0.0))
    z1 = math.log(math.exp(1) + 2)
    kl1 = sum(q * (math.log(q) - (x - z1)) for x in (0.0, 1.0, 0.0))
    return {"ce0": ce0, "ce1": ce1, "p0": p0, "p1": p1, "kl0": kl0, "kl1": kl1}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"weighting": "none"}, lambda h: (h["ce0"] + h["ce1"]) / 2),
        ({"weighting": "dft"}, lambda h: (h["p0"] * h["ce0"] + h["p1"] * h["ce1"]) / 2),
        ({"weighting": "none", "kl_weight": 0.5}, lambda h: (h["ce0"] + h["ce1"] + 0.5 * (h["kl0"] + h["kl1"])) / 2),
        (
            {"weighting": "dft", "kl_weight": 0.5},
            lambda h: (h["p0"] * h["ce0"] + h["p1"] * h["ce1"] + 0.5 * (h["kl0"] + h["kl1"])) / 2,
        ),
        # keep 1 of 2 tokens (int(2 * 0.7) = 1): the lower CE, averaged over the kept token
        ({"weighting": "topk", "keep_ratio": 0.7}, lambda h: min(h["ce0"], h["ce1"])),
        # lower median = ce0 (the smaller); cap = 1.5 * ce0 < ce1, so ce1 gets weight cap / ce1
        ({"weighting": "antiop", "clip_mult": 1.5}, lambda h: (h["ce0"] + 1.5 * h["ce0"]) / 2),
        # reference uniform (1/3): w = max(0.1, 1 + 2 (1/3 - p))
        (
            {"weighting": "ref_ratio", "alpha": 2.0},
            lambda h: (
                (max(0.1, 1 + 2 * (1 / 3 - h["p0"])) * h["ce0"] + max(0.1, 1 + 2 * (1 / 3 - h["p1"])) * h["ce1"]) / 2
            ),
        ),
    ],
)
def test_hand_computed_values(row: dict, expected) -> None:
    hand = _hand_values()
    assert hand["ce0"] < hand["ce1"] and 1.5 * hand["ce0"] < hand["ce1"]  # the premises of the cases above
    spec = LossSpec.from_config(row)
    loss, stats = loss_from_logits(LOGITS, LABELS, spec, ref_logits=REF_LOGITS)
    assert float(loss) == pytest.approx(expected(hand), rel=1e-12)
    assert stats["target_tokens"] == 2 and stats["ce"] == pytest.approx((hand["ce0"] + hand["ce1"]) / 2)
    # the chunked path from hidden states: logits = hidden @ I
    hidden = LOGITS.clone()
    chunked, _ = loss_from_hidden(
        hidden, torch.eye(3, dtype=torch.float64), LABELS, spec, ref_hidden=REF_LOGITS, chunk_size=1
    )
    assert float(chunked) == pytest.approx(expected(hand), rel=1e-12)


def test_reverse_kl_hand_value() -> None:
    hand = _hand_values()
    logits = LOGITS[0, 0]
    logp = torch.log_softmax(logits, -1)
    reverse = float((logp.exp() * (logp - math.log(1 / 3))).sum())
    spec = LossSpec(weighting="none", kl_weight=1.0, kl_direction="reverse")
    labels = torch.tensor([[-100, 0, -100]])
    loss, stats = loss_from_logits(LOGITS, labels, spec, ref_logits=REF_LOGITS)
    assert float(loss) == pytest.approx(hand["ce0"] + reverse, rel=1e-12)
    assert stats["kl"] == pytest.approx(reverse)


# --- both paths against the reference, values and gradients -------------------------------------------------------


@pytest.mark.parametrize(
    ("weighting", "direction", "kl_weight"), list(itertools.product(WEIGHTINGS, ("forward", "reverse"), (0.0, 0.05)))
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paths_match_reference(weighting: str, direction: str, kl_weight: float, dtype: torch.dtype) -> None:
    spec = LossSpec(weighting=weighting, kl_direction=direction, kl_weight=kl_weight, keep_ratio=0.6, clip_mult=1.2)
    tolerance = {"rtol": 1e-6, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for seed in range(8):
        hidden, weight, ref_hidden, labels = random_batch(seed, dtype)
        if count_target_tokens(labels) == 0:
            continue
        n_step = count_target_tokens(labels) + seed  # as if other micro-batches had more tokens
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        expected = reference_loss(h64 @ w64.T, labels, spec, (ref_hidden.double() @ w64.T).detach(), n_step)
        expected_grads = torch.autograd.grad(expected, [h64, w64])

        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits_loss, _ = loss_from_logits(h @ w.T, labels, spec, (ref_hidden @ w.T).detach(), n_step)
        logits_grads = torch.autograd.grad(logits_loss, [h, w])

        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        chunked_loss, stats = loss_from_hidden(h2, w2, labels, spec, ref_hidden, None, n_step, chunk_size=2)
        chunked_grads = torch.autograd.grad(chunked_loss, [h2, w2])

        for loss, grads in ((logits_loss, logits_grads), (chunked_loss, chunked_grads)):
            torch.testing.assert_close(loss.double(), expected.detach(), **tolerance)
            for got, want in zip(grads, expected_grads, strict=True):
                torch.testing.assert_close(got.double(), want, **tolerance)
        assert stats["target_tokens"] == count_target_tokens(labels)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_fully_masked_batch_is_zero_not_nan(weighting: str) -> None:
    spec = LossSpec(weighting=weighting, kl_weight=0.05)
    hidden, weight, ref_hidden, labels = random_batch(0)
    labels[:] = -100
    for compute in (
        lambda h, w: loss_from_logits(h @ w.T, labels, spec, ref_hidden @ w.detach().T)[0],
        lambda h, w: loss_from_hidden(h, w, labels, spec, ref_hidden)[0],
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = compute(h, w)
        loss.backward()
        assert float(loss.detach()) == 0.0
        assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize(
    ("weighting", "kl_weight"), [("none", 0.0), ("dft", 0.0), ("ref_ratio", 0.0), ("none", 0.05), ("dft", 0.05)]
)
def test_gradient_accumulation_invariance(weighting: str, kl_weight: float) -> None:
    """One batch of 8 == four micro-batches of 2 with the step's token count (no batch statistics involved)."""
    spec = LossSpec(weighting=weighting, kl_weight=kl_weight)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 6, 4, generator=generator, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(8, 6, 4, generator=generator, dtype=torch.float64)
    weight = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 9, (8, 6), generator=generator)
    labels[torch.rand(8, 6, generator=generator) < 0.4] = -100
    n_step = count_target_tokens(labels)

    w_full = weight.clone().requires_grad_()
    loss_full, _ = loss_from_hidden(hidden, w_full, labels, spec, ref_hidden)
    loss_full.backward()

    w_acc = weight.clone().requires_grad_()
    total = 0.0
    for i in range(0, 8, 2):
        loss, _ = loss_from_hidden(
            hidden[i : i + 2], w_acc, labels[i : i + 2], spec, ref_hidden[i : i + 2], None, n_step
        )
        loss.backward()
        total += float(loss)
    assert total == pytest.approx(float(loss_full), rel=1e-12)
    torch.testing.assert_close(w_acc.grad, w_full.grad, rtol=1e-10, atol=1e-12)


def test_bf16_inputs_are_computed_in_float32() -> None:
    hidden, weight, ref_hidden, labels = random_batch(3, torch.float32)
    spec = LossSpec(weighting="dft", kl_weight=0.05)
    loss32, _ = loss_from_hidden(hidden, weight, labels, spec, ref_hidden)
    loss16, _ = loss_from_hidden(hidden.bfloat16(), weight.bfloat16(), labels, spec, ref_hidden.bfloat16())
    assert loss16.dtype == torch.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=5e-2)


def test_bf16_head_gradient_accumulates_over_chunks() -> None:
    """A trained bf16 head: gradients summed chunk by chunk in bf16 stay close to the float32 ones."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 65, 16, generator=generator)
    weight = torch.randn(40, 16, generator=generator) * 0.3
    labels = torch.randint(0, 40, (2, 65), generator=generator)
    spec = LossSpec(weighting="dft")
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = weight.to(dtype).detach().requires_grad_()
        loss, _ = loss_from_hidden(hidden.to(dtype), w, labels, spec, chunk_size=8)
        loss.backward()
        assert w.grad.dtype == dtype
        grads[dtype] = w.grad.float()
    error = (grads[torch.bfloat16] - grads[torch.float32]).norm() / grads[torch.float32].norm()
    assert error < 2e-2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"weighting": "focal"}, "weighting"),
        ({"weighting": "none", "kl_weight": -1}, "kl_weight"),
        ({"weighting": "none", "kl_wieght": 0.1}, "unknown loss key"),
        ({"weighting": "topk", "keep_ratio": 0.0}, "keep_ratio"),
        ({"weighting": "none", "kl_direction": "sideways"}, "kl_direction"),
    ],
)
def test_spec_validation(row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossSpec.from_config(row)


def test_spec_defaults_and_reference_need() -> None:
    spec = LossSpec.from_config({"weighting": "topk"})
    assert (spec.keep_ratio, spec.clip_mult, spec.alpha, spec.kl_direction, spec.kl_weight) == (
        0.7,
        3.0,
        1.0,
        "forward",
        0.0,
    )
    assert not spec.needs_reference
    assert LossSpec.from_config({"weighting": "ref_ratio"}).needs_reference
    assert LossSpec.from_config({"weighting": "dft", "kl_weight": 0.05}).needs_reference
