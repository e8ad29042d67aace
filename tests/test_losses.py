"""Losses: hand-computed values, both paths against an independent float64 reference, memory structure."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from asft import chunked_loss, losses
from asft.losses import LossSpec, count_target_tokens, loss_from_hidden, loss_from_logits
from asft.matrix import REFERENCE_WEIGHTINGS

WEIGHTINGS = ("none", "dft", "topk", "antiop", "ref_ratio", "iw_sft")
DIRECTIONS = ("forward", "reverse")
CASES = list(itertools.product(WEIGHTINGS, DIRECTIONS, (0.0, 0.05)))
EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True, database=None)


# --- an independent reference: plain Python loops over tokens, float64 ----------------------------------------


def reference_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_logits: torch.Tensor | None = None,
    num_target_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ w·CE/N + λ·ΣKL/N written token by token, straight from the loss table of docs/ARCHITECTURE.md;
    returns (loss, ce/kl/weight means)."""
    tokens = []  # (logp row, ref logp row or None, target)
    rows = []  # each token's sequence (batch row)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            logp = torch.log_softmax(logits[b, t].double(), -1)
            ref = torch.log_softmax(ref_logits[b, t].double(), -1) if ref_logits is not None else None
            tokens.append((logp, ref, y))
            rows.append(b)
    n = len(tokens)
    if n == 0:
        return logits.sum() * 0.0, {"ce": 0.0, "kl": 0.0, "weight_mean": 0.0}
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
    elif spec.weighting == "ref_ratio":
        weights = []
        for (_, ref, y), c in zip(tokens, ce_values, strict=True):
            gap = min(1.0, max(-1.0, math.exp(float(ref[y])) - math.exp(-c)))
            weights.append(max(0.1, 1 + spec.alpha * gap))
    elif spec.weighting == "iw_sft":  # one weight per sequence: its tokens' mean log p_θ/p_ref, scaled and clipped
        log_ratios: dict[int, list[float]] = {}
        for (_, ref, y), c, row in zip(tokens, ce_values, rows, strict=True):
            log_ratios.setdefault(row, []).append(-c - float(ref[y]))
        per_row = {row: min(spec.iw_clip, math.exp(spec.iw_temp * sum(r) / len(r))) for row, r in log_ratios.items()}
        weights = [per_row[row] for row in rows]
    else:
        raise AssertionError(spec.weighting)
    kls = []
    if ref_logits is not None:
        for lp, ref, _ in tokens:
            if spec.kl_direction == "forward":
                kls.append(sum(math.exp(float(ref[v])) * (ref[v] - lp[v]) for v in range(len(lp))))
            else:
                kls.append(sum(torch.exp(lp[v]) * (lp[v] - ref[v]) for v in range(len(lp))))
    total = sum(w * c for w, c in zip(weights, ce, strict=True))
    if spec.kl_weight > 0:
        total = total + spec.kl_weight * sum(kls)
    means = {
        "ce": sum(ce_values) / n,
        "kl": sum(float(k.detach()) for k in kls) / n if kls else 0.0,
        "weight_mean": sum(weights) / n,
    }
    return total / norm, means


def make_batch(
    seed: int, batch: int, length: int, dim: int, vocab: int, masked: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random hidden states, head, reference hidden states and labels with random masks (row 0 fully masked)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64)
    ref_hidden = hidden + 0.5 * torch.randn(batch, length, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[torch.rand(batch, length, generator=generator) < masked] = -100
    if batch > 1:
        labels[0] = -100
    return hidden.to(dtype), weight.to(dtype), ref_hidden.to(dtype), labels


batches = st.builds(
    dict,
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    length=st.integers(2, 9),
    dim=st.integers(1, 6),
    vocab=st.integers(2, 12),
    masked=st.sampled_from([0.0, 0.3, 0.7]),
)


# --- hand-computed examples -----------------------------------------------------------------------------------------

# Two target tokens, V = 3. Position 0 predicts label 0, position 1 predicts label 2.
LOGITS = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
LABELS = torch.tensor([[-100, 0, 2]])
REF_LOGITS = torch.zeros_like(LOGITS)  # uniform reference


def _hand_values() -> dict[str, float]:
    z0, z1 = math.log(math.exp(2) + 2), math.log(math.exp(1) + 2)  # log-partition of each row
    ce0, ce1 = z0 - 2.0, z1 - 0.0  # -log p(0 | [2,0,0]), -log p(2 | [0,1,0])
    p0, p1 = math.exp(-ce0), math.exp(-ce1)
    q = 1 / 3
    # forward KL(uniform ‖ p) = Σ q (log q - log p)
    kl0 = sum(q * (math.log(q) - (x - z0)) for x in (2.0, 0.0, 0.0))
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
        # keep_ratio 1: every token kept, plain mean
        ({"weighting": "topk", "keep_ratio": 1.0}, lambda h: (h["ce0"] + h["ce1"]) / 2),
        # lower median = ce0 (the smaller); cap = 1.5 * ce0 < ce1, so ce1 gets weight cap / ce1
        ({"weighting": "antiop", "clip_mult": 1.5}, lambda h: (h["ce0"] + 1.5 * h["ce0"]) / 2),
        # cap = 7 * ce0 > ce1: nothing clipped
        ({"weighting": "antiop", "clip_mult": 7.0}, lambda h: (h["ce0"] + h["ce1"]) / 2),
        # reference uniform (1/3): w = max(0.1, 1 + 2 (1/3 - p))
        (
            {"weighting": "ref_ratio", "alpha": 2.0},
            lambda h: (
                (max(0.1, 1 + 2 * (1 / 3 - h["p0"])) * h["ce0"] + max(0.1, 1 + 2 * (1 / 3 - h["p1"])) * h["ce1"]) / 2
            ),
        ),
        # alpha 5: token 0 (p0 ≈ 0.79) hits the floor 0.1; token 1 gets 1 + 5 (1/3 - p1)
        (
            {"weighting": "ref_ratio", "alpha": 5.0},
            lambda h: (0.1 * h["ce0"] + (1 + 5 * (1 / 3 - h["p1"])) * h["ce1"]) / 2,
        ),
    ],
)
def test_hand_computed_values(row: dict, expected: Callable[[dict], float]) -> None:
    hand = _hand_values()
    # the premises of the cases above
    assert hand["ce0"] < hand["ce1"] and 1.5 * hand["ce0"] < hand["ce1"] < 7 * hand["ce0"]
    assert 1 + 5 * (1 / 3 - hand["p0"]) < 0.1 < 1 + 5 * (1 / 3 - hand["p1"])
    spec = LossSpec.from_config(row)
    loss, stats = loss_from_logits(LOGITS, LABELS, spec, ref_logits=REF_LOGITS)
    assert float(loss) == pytest.approx(expected(hand), rel=1e-12)
    assert stats["target_tokens"] == 2 and stats["ce"] == pytest.approx((hand["ce0"] + hand["ce1"]) / 2)
    assert stats["kl"] == pytest.approx((hand["kl0"] + hand["kl1"]) / 2)
    # the chunked path from hidden states: logits = hidden @ I, one token per chunk
    chunked, _ = loss_from_hidden(
        LOGITS.clone(), torch.eye(3, dtype=torch.float64), LABELS, spec, ref_hidden=REF_LOGITS, chunk_size=1
    )
    assert float(chunked) == pytest.approx(expected(hand), rel=1e-12)


def test_topk_keeps_ties_at_the_threshold() -> None:
    """Three tokens with equal CE and keep_ratio 0.4: k = 1, but all three tie at the threshold and are kept."""
    logits = torch.zeros(1, 4, 3, dtype=torch.float64)
    labels = torch.tensor([[-100, 0, 1, 2]])
    loss, stats = loss_from_logits(logits, labels, LossSpec(weighting="topk", keep_ratio=0.4))
    assert float(loss) == pytest.approx(math.log(3), rel=1e-12)
    assert stats["weight_mean"] == pytest.approx(1.0)


# --- iw-SFT: one importance weight per sequence ---------------------------------------------------------------------

# Two sequences of different lengths, V = 3. Row 0: two prompt labels, targets 0 and 2, one padding label; row 1: two
# prompt labels, targets 1, 0, 2. Positions that predict nothing carry logits of 50 (they must not count).
IW_LABELS = torch.tensor([[-100, -100, 0, 2, -100], [-100, -100, 1, 0, 2]])
IW_LOGITS = [
    [[50.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0], [50.0, 0.0, 0.0], [0.0, 50.0, 0.0]],
    [[50.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 50.0]],
]
IW_REF_LOGITS = [
    [[0.0, 50.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 50.0], [50.0, 0.0, 0.0]],
    [[0.0, 0.0, 50.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 50.0, 0.0]],
]
IW_TARGETS = {0: [(1, 0), (2, 2)], 1: [(1, 1), (2, 0), (3, 2)]}  # row -> (position, target) of its target tokens


def _log_softmax_at(row: list[float], y: int) -> float:
    return row[y] - math.log(sum(math.exp(x) for x in row))


def _iw_hand(temp: float, clip: float) -> tuple[dict[int, float], dict[int, list[float]]]:
    """Per sequence: w = min(clip, exp(temp · mean over its targets of log p_θ − log p_ref)); and each token's CE."""
    weights, ces = {}, {}
    for b, targets in IW_TARGETS.items():
        logp = [_log_softmax_at(IW_LOGITS[b][t], y) for t, y in targets]
        ref_logp = [_log_softmax_at(IW_REF_LOGITS[b][t], y) for t, y in targets]
        mean = sum(lp - rp for lp, rp in zip(logp, ref_logp, strict=True)) / len(targets)
        weights[b] = min(clip, math.exp(temp * mean))
        ces[b] = [-lp for lp in logp]
    return weights, ces


@pytest.mark.parametrize(
    ("temp", "clip", "clipped"),
    [(1.0, 16.0, False), (2.0, 4.0, True)],  # the authors' setting (no sequence clipped); row 0 clipped at 4
)
@pytest.mark.parametrize("num_target_tokens", [None, 8])
def test_iw_sft_hand_computed(temp: float, clip: float, clipped: bool, num_target_tokens: int | None) -> None:
    weights, ces = _iw_hand(temp, clip)
    unclipped, _ = _iw_hand(temp, math.inf)
    assert (unclipped[0] > clip) == clipped and unclipped[1] < 1 < unclipped[0]  # the premises of the cases
    norm = 5 if num_target_tokens is None else num_target_tokens
    expected = sum(weights[b] * sum(ces[b]) for b in IW_TARGETS) / norm
    spec = LossSpec.from_config({"weighting": "iw_sft", "iw_temp": temp, "iw_clip": clip})
    logits = torch.tensor(IW_LOGITS, dtype=torch.float64)
    ref_logits = torch.tensor(IW_REF_LOGITS, dtype=torch.float64)

    # the gradient w.r.t. the logits: w_s·(p − onehot(y))/N at each target position (w detached), 0 elsewhere
    want_grad = torch.zeros_like(logits)
    for b, targets in IW_TARGETS.items():
        for t, y in targets:
            exps = [math.exp(x) for x in IW_LOGITS[b][t]]
            want_grad[b, t] = torch.tensor(
                [weights[b] * (e / sum(exps) - (v == y)) / norm for v, e in enumerate(exps)], dtype=torch.float64
            )

    def full(z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return loss_from_logits(z, IW_LABELS, spec, ref_logits, num_target_tokens)

    def chunked(size: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict]]:
        eye = torch.eye(3, dtype=torch.float64)
        return lambda z: loss_from_hidden(z, eye, IW_LABELS, spec, ref_logits, None, num_target_tokens, size)

    for compute in (full, *(chunked(size) for size in (1, 2, 3, 5, 1024))):
        z = logits.clone().requires_grad_()
        loss, stats = compute(z)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
        assert stats["weight_mean"] == pytest.approx((2 * weights[0] + 3 * weights[1]) / 5, rel=1e-12)
        assert stats["target_tokens"] == 5
        torch.testing.assert_close(z.grad, want_grad, rtol=1e-12, atol=1e-15)


def test_iw_sft_weights_are_per_sequence() -> None:
    """token_weights gives every token of a sequence its sequence's weight, in `shifted_targets` order."""
    weights, _ = _iw_hand(1.0, 16.0)
    logits = torch.tensor(IW_LOGITS, dtype=torch.float64)
    ref_logits = torch.tensor(IW_REF_LOGITS, dtype=torch.float64)
    mask, targets = losses.shifted_targets(IW_LABELS)
    ids = losses.target_sequence_ids(mask)
    assert ids.tolist() == [0, 0, 1, 1, 1]
    ce = -torch.log_softmax(logits[:, :-1][mask], -1).gather(-1, targets[:, None]).squeeze(-1)
    ref_p = torch.softmax(ref_logits[:, :-1][mask], -1).gather(-1, targets[:, None]).squeeze(-1)
    got = losses.token_weights(ce, ref_p, LossSpec(weighting="iw_sft"), ids)
    assert got.tolist() == pytest.approx([weights[0]] * 2 + [weights[1]] * 3, rel=1e-12)
    # a batch whose first row has no target tokens: the other rows' weights are unchanged
    padded = torch.cat([torch.full((1, 5), -100), IW_LABELS])
    assert losses.target_sequence_ids(padded[:, 1:] != -100).tolist() == [1, 1, 2, 2, 2]
    shifted = losses.token_weights(ce, ref_p, LossSpec(weighting="iw_sft"), ids + 1)
    assert torch.equal(shifted, got)
    with pytest.raises(ValueError, match="sequence index"):
        losses.token_weights(ce, ref_p, LossSpec(weighting="iw_sft"))
    with pytest.raises(ValueError, match="reference"):
        loss_from_logits(logits, IW_LABELS, LossSpec(weighting="iw_sft"))
    with pytest.raises(ValueError, match="per_token or per_sequence"):
        losses.Weighting(losses.weights_iw_sft, per_token=True, per_sequence=True)


def test_planning_knows_which_weightings_read_the_reference() -> None:
    """asft.matrix spells out (torch-free, for planning) the weightings that read p_ref; they must be the registry's."""
    assert {name for name, w in losses.WEIGHTINGS.items() if w.needs_reference} == REFERENCE_WEIGHTINGS


def test_reverse_kl_hand_value() -> None:
    hand = _hand_values()
    p = [math.exp(x - math.log(math.exp(2) + 2)) for x in (2.0, 0.0, 0.0)]
    reverse = sum(pv * (math.log(pv) - math.log(1 / 3)) for pv in p)  # KL(p ‖ uniform)
    spec = LossSpec(weighting="none", kl_weight=1.0, kl_direction="reverse")
    labels = torch.tensor([[-100, 0, -100]])
    for loss, stats in (
        loss_from_logits(LOGITS, labels, spec, ref_logits=REF_LOGITS),
        loss_from_hidden(LOGITS, torch.eye(3, dtype=torch.float64), labels, spec, REF_LOGITS),
    ):
        assert float(loss) == pytest.approx(hand["ce0"] + reverse, rel=1e-12)
        assert stats["kl"] == pytest.approx(reverse, rel=1e-12)


def test_hand_computed_gradient() -> None:
    """d/dz of (CE + λ·KL(q‖p))/N is ((p − onehot(y)) + λ(p − q))/N, row by row."""
    spec = LossSpec(weighting="none", kl_weight=0.5)
    for path in ("logits", "hidden"):
        z = LOGITS.clone().requires_grad_()
        if path == "logits":
            loss, _ = loss_from_logits(z, LABELS, spec, REF_LOGITS, num_target_tokens=4)
        else:
            loss, _ = loss_from_hidden(z, torch.eye(3, dtype=torch.float64), LABELS, spec, REF_LOGITS, None, 4, 1)
        loss.backward()
        for row, target in ((0, 0), (1, 2)):
            exps = [math.exp(float(x)) for x in LOGITS[0, row]]
            p = [e / sum(exps) for e in exps]
            want = [(p[v] - (v == target) + 0.5 * (p[v] - 1 / 3)) / 4 for v in range(3)]
            assert z.grad[0, row].tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert z.grad[0, 2].tolist() == [0.0, 0.0, 0.0]  # the last position predicts nothing


# --- both paths against the reference, values and gradients -------------------------------------------------------


@pytest.mark.parametrize(("weighting", "direction", "kl_weight"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@EXAMPLES
@given(shape=batches, chunks=st.integers(2, 4), extra=st.integers(0, 5), own_ref_head=st.booleans())
def test_paths_match_reference(
    weighting: str,
    direction: str,
    kl_weight: float,
    dtype: torch.dtype,
    shape: dict,
    chunks: int,
    extra: int,
    own_ref_head: bool,
) -> None:
    spec = LossSpec(
        weighting=weighting,
        kl_direction=direction,
        kl_weight=kl_weight,
        keep_ratio=0.6,
        clip_mult=1.2,
        iw_temp=2.0,
        iw_clip=1.5,  # some sequences clipped, some not
    )
    tolerance = {"rtol": 1e-6, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    hidden, weight, ref_hidden, labels = make_batch(**shape, dtype=dtype)
    # full fine-tuning: the reference is a frozen copy with its own head; LoRA: the policy's head
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(shape["seed"]), dtype=dtype)
    ref_head = weight + 0.3 * noise if own_ref_head else None
    n = count_target_tokens(labels)
    n_step = n + extra  # as if other micro-batches had more tokens
    chunk_size = max(1, n // chunks)  # several chunks whenever there are 2+ target tokens

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_w64 = w64.detach() if ref_head is None else ref_head.double()
    expected, means = reference_loss(h64 @ w64.T, labels, spec, ref_hidden.double() @ ref_w64.T, n_step)
    expected_grads = torch.autograd.grad(expected, [h64, w64], allow_unused=True, materialize_grads=True)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logits = ref_hidden @ (w.detach() if ref_head is None else ref_head).T
    logits_loss, logits_stats = loss_from_logits(h @ w.T, labels, spec, ref_logits, n_step)
    logits_grads = torch.autograd.grad(logits_loss, [h, w])

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked_loss, chunked_stats = loss_from_hidden(h2, w2, labels, spec, ref_hidden, ref_head, n_step, chunk_size)
    chunked_grads = torch.autograd.grad(chunked_loss, [h2, w2])

    for loss, grads, stats in (
        (logits_loss, logits_grads, logits_stats),
        (chunked_loss, chunked_grads, chunked_stats),
    ):
        assert loss.dtype == dtype
        torch.testing.assert_close(loss.double(), expected.detach(), **tolerance)
        for got, want in zip(grads, expected_grads, strict=True):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), want, **tolerance)
        assert stats["target_tokens"] == n
        for key, value in means.items():  # kl is logged whenever the reference ran, even with kl_weight 0
            assert float(stats[key]) == pytest.approx(value, rel=tolerance["rtol"], abs=1e-6)


@pytest.mark.parametrize(
    ("weighting", "with_ref"),
    [(w, r) for w in WEIGHTINGS for r in (True, False) if r or not losses.WEIGHTINGS[w].needs_reference],
)
@pytest.mark.parametrize("num_target_tokens", [None, 0, 7])
def test_fully_masked_batch_is_zero_not_nan(weighting: str, with_ref: bool, num_target_tokens: int | None) -> None:
    spec = LossSpec(weighting=weighting, kl_weight=0.05 if with_ref else 0.0)
    hidden, weight, ref_hidden, labels = make_batch(0, batch=2, length=5, dim=3, vocab=7, masked=0.0)
    labels[:] = -100
    labels[:, 0] = 3  # a label at position 0 predicts nothing after the shift
    assert count_target_tokens(labels) == 0
    ref = ref_hidden if with_ref else None
    for compute in (
        lambda h, w: loss_from_logits(
            h @ w.T, labels, spec, None if ref is None else ref @ w.detach().T, num_target_tokens
        ),
        lambda h, w: loss_from_hidden(h, w, labels, spec, ref, None, num_target_tokens, 2),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = compute(h, w)
        loss.backward()
        assert float(loss.detach()) == 0.0 and loss.dtype == torch.float64
        assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
        assert stats["target_tokens"] == 0
        assert all(math.isfinite(float(v)) for v in stats.values())


def test_fully_masked_batch_with_huge_half_logits_is_not_nan() -> None:
    """The zero loss is an empty sum, not logits.sum() * 0 (which overflows to inf·0 = NaN in float16)."""
    logits = torch.full((1, 4, 50_000), 60_000.0, dtype=torch.float16, requires_grad=True)
    loss, _ = loss_from_logits(logits, torch.full((1, 4), -100), LossSpec())
    loss.backward()
    assert float(loss.detach()) == 0.0 and not logits.grad.isnan().any()


GA_CASES = [
    ("none", "forward", 0.0),
    ("dft", "forward", 0.0),
    ("ref_ratio", "forward", 0.0),
    ("none", "forward", 0.05),
    ("dft", "forward", 0.05),
    ("dft", "reverse", 0.05),
    ("ref_ratio", "reverse", 0.05),
    ("iw_sft", "forward", 0.0),  # per sequence: micro-batches of whole rows leave every weight as it is
    ("iw_sft", "reverse", 0.05),
]


@pytest.mark.parametrize(("weighting", "direction", "kl_weight"), GA_CASES)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_gradient_accumulation_invariance(weighting: str, direction: str, kl_weight: float, path: str) -> None:
    """One batch of 8 == four micro-batches of 2 with the step's token count (no batch statistics involved)."""
    spec = LossSpec(weighting=weighting, kl_weight=kl_weight, kl_direction=direction)
    hidden, weight, ref_hidden, labels = make_batch(1, batch=8, length=6, dim=4, vocab=9, masked=0.4)
    n_step = count_target_tokens(labels)

    def step(rows: slice, h: torch.Tensor, w: torch.Tensor, n: int | None) -> torch.Tensor:
        if path == "logits":
            ref_logits = ref_hidden[rows] @ w.detach().T
            return loss_from_logits(h[rows] @ w.T, labels[rows], spec, ref_logits, n)[0]
        return loss_from_hidden(h[rows], w, labels[rows], spec, ref_hidden[rows], None, n, chunk_size=3)[0]

    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_full = step(slice(None), h_full, w_full, None)
    loss_full.backward()

    h_acc, w_acc = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total = 0.0
    for i in range(0, 8, 2):
        loss = step(slice(i, i + 2), h_acc, w_acc, torch.tensor(n_step))  # a tensor, as Trainer passes it
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(loss_full.detach()), rel=1e-12)
    torch.testing.assert_close(w_acc.grad, w_full.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_acc.grad, h_full.grad, rtol=1e-10, atol=1e-12)


# --- the chunked path's memory and work -----------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records every op's name and the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize(
    "spec",
    [
        LossSpec(),
        LossSpec(weighting="dft", kl_weight=0.05),
        LossSpec(weighting="ref_ratio", kl_weight=0.05, kl_direction="reverse"),
        LossSpec(weighting="topk"),
        LossSpec(weighting="antiop", kl_weight=0.05),
        LossSpec(weighting="iw_sft", kl_weight=0.05),
    ],
    ids=str,
)
def test_chunked_path_never_builds_sequence_by_vocab_tensors(spec: LossSpec) -> None:
    batch, length, dim, vocab, chunk = 2, 33, 5, 97, 8
    hidden, weight, ref_hidden, labels = make_batch(2, batch, length, dim, vocab, masked=0.0, dtype=torch.float32)
    n = count_target_tokens(labels)
    assert n >= 4 * chunk and chunk * vocab > max(vocab * dim, batch * length * dim)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with _LargestOutput() as chunked:
        loss, _ = loss_from_hidden(h, w, labels, spec, ref_hidden, chunk_size=chunk)
        loss.backward()
    # The reference shares the head (LoRA): both models' logits of a chunk come from one [2·chunk, V] matmul.
    assert chunked.largest <= 2 * chunk * vocab < n * vocab
    with _LargestOutput() as separate:  # a separate reference head (full fine-tuning): one chunk's logits at a time
        separate_loss, _ = loss_from_hidden(h, w, labels, spec, ref_hidden, w.detach().clone(), chunk_size=chunk)
        separate_loss.backward()
    assert separate.largest <= chunk * vocab
    torch.testing.assert_close(separate_loss, loss)  # an equal head, by value: the same loss either way
    with _LargestOutput() as full:  # the detector sees the full-logits path's [n, V] tensors
        loss_from_logits(h @ w.T, labels, spec, ref_hidden @ w.detach().T)[0].backward()
    assert full.largest >= n * vocab


def test_no_gradient_work_without_grad_mode() -> None:
    """Evaluation (no_grad) does one head matmul per chunk and nothing else; with grad, two more per chunk."""
    hidden, weight, _, labels = make_batch(3, batch=2, length=17, dim=4, vocab=11, masked=0.0, dtype=torch.float32)
    spec = LossSpec(weighting="dft")
    n_chunks = math.ceil(count_target_tokens(labels) / 8)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad(), _LargestOutput() as evaluation:
        loss_eval, _ = loss_from_hidden(h, w, labels, spec, chunk_size=8)
    matmuls = ("mm", "addmm", "addmm_", "matmul", "bmm")
    assert sum(op in matmuls for op in evaluation.ops) == n_chunks
    with _LargestOutput() as training:
        loss_train, _ = loss_from_hidden(h, w, labels, spec, chunk_size=8)
    assert sum(op in matmuls for op in training.ops) == 3 * n_chunks
    assert float(loss_eval) == float(loss_train.detach())


# --- registries: a new weighting or anchor is one registered function --------------------------------------------


@pytest.fixture
def registered() -> Iterator[None]:
    """Registers two test weightings and a test anchor, and removes them afterwards."""
    before = (dict(losses.WEIGHTINGS), dict(losses.ANCHORS))

    @losses.register_weighting("test_half", per_token=True)
    def _half(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
        return torch.full_like(ce, 0.5)

    @losses.register_weighting("test_relative")  # a batch statistic: CE relative to the batch's largest
    def _relative(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
        return ce / ce.max()

    @losses.register_weighting("test_per_row", per_sequence=True)  # each sequence's tokens share weight 1/|s|
    def _per_row(
        ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec, sequence_ids: torch.Tensor
    ) -> torch.Tensor:
        return 1.0 / torch.bincount(sequence_ids)[sequence_ids].to(ce.dtype)

    @losses.register_anchor("test_l2")  # ½ Σ_v (p_v − q_v)²; the chunked path differentiates it by autograd
    def _l2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        gap = logp.exp() - ref_logp.exp()
        return 0.5 * (gap * gap).sum(-1)

    yield
    for registry, saved in zip((losses.WEIGHTINGS, losses.ANCHORS), before, strict=True):
        registry.clear()
        registry.update(saved)


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("weighting", ["test_half", "test_relative", "test_per_row"])
def test_registered_weighting_and_anchor_run_through_both_paths(weighting: str) -> None:
    spec = LossSpec.from_config({"weighting": weighting, "kl_weight": 0.3, "kl_direction": "test_l2"})
    hidden, weight, ref_hidden, labels = make_batch(4, batch=3, length=7, dim=4, vocab=6, masked=0.2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # the reference: weights and the anchor written out here, autograd for the gradient
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax((h @ w.T)[:, :-1][mask], -1)
    ref_p = torch.softmax((ref_hidden @ w.detach().T)[:, :-1][mask], -1)
    ce = -logp.gather(-1, labels[:, 1:][mask][:, None]).squeeze(-1)
    if weighting == "test_half":
        weights = torch.full_like(ce, 0.5)
    elif weighting == "test_relative":
        weights = (ce / ce.max()).detach()
    else:  # 1/(target tokens of the token's row)
        weights = (1.0 / mask.sum(1, keepdim=True).expand_as(mask)[mask]).to(ce.dtype)
    expected = ((weights * ce).sum() + 0.3 * 0.5 * ((logp.exp() - ref_p) ** 2).sum()) / ce.numel()
    expected_grads = torch.autograd.grad(expected, [h, w])
    for compute in (
        lambda h, w: loss_from_logits(h @ w.T, labels, spec, ref_hidden @ w.detach().T)[0],
        lambda h, w: loss_from_hidden(h, w, labels, spec, ref_hidden, chunk_size=2)[0],
    ):
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = compute(h2, w2)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)
        for got, want in zip(torch.autograd.grad(loss, [h2, w2]), expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --- dtypes, robustness, arguments -----------------------------------------------------------------------------------


def test_bf16_inputs_are_computed_in_float32() -> None:
    hidden, weight, ref_hidden, labels = make_batch(3, 2, 9, 6, 11, 0.3, torch.float32)
    spec = LossSpec(weighting="dft", kl_weight=0.05)
    loss32, _ = loss_from_hidden(hidden, weight, labels, spec, ref_hidden)
    loss16, _ = loss_from_hidden(hidden.bfloat16(), weight.bfloat16(), labels, spec, ref_hidden.bfloat16())
    logits16, _ = loss_from_logits(
        hidden.bfloat16() @ weight.bfloat16().T, labels, spec, ref_hidden.bfloat16() @ weight.bfloat16().T
    )
    assert loss16.dtype == logits16.dtype == torch.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=5e-2)
    assert float(logits16) == pytest.approx(float(loss16), rel=1e-3)


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


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_vocabulary_the_reference_masks_gives_no_nan(direction: str) -> None:
    """A reference logit of −inf (q = 0) contributes 0·log 0 = 0 to either KL, with finite gradients."""
    logits = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(1, 3, 5, dtype=torch.float64)
    ref_logits[..., 4] = -math.inf
    spec = LossSpec(weighting="none", kl_weight=0.1, kl_direction=direction)
    loss, stats = loss_from_logits(logits, torch.tensor([[-100, 1, 2]]), spec, ref_logits)
    loss.backward()
    if direction == "forward":
        assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()
    else:  # KL(p ‖ q) is +inf where p > 0 = q: an honest inf, not NaN
        assert loss.item() == math.inf
    assert not math.isnan(stats["kl"])


def test_policy_vocabulary_masked_in_both_gives_no_nan() -> None:
    """Both models masking the same entries (−inf logits): 0·log(0/0) terms are 0 in either direction."""
    logits = torch.randn(1, 3, 5, dtype=torch.float64)
    logits[..., 4] = -math.inf
    ref_logits = torch.randn(1, 3, 5, dtype=torch.float64)
    ref_logits[..., 4] = -math.inf
    for direction in DIRECTIONS:
        z = logits.clone().requires_grad_()
        spec = LossSpec(weighting="dft", kl_weight=0.1, kl_direction=direction)
        loss, _ = loss_from_logits(z, torch.tensor([[-100, 1, 2]]), spec, ref_logits)
        loss.backward()
        assert math.isfinite(loss.item()) and not z.grad.isnan().any()


def test_arguments_are_checked() -> None:
    hidden, weight, ref_hidden, labels = make_batch(5, 2, 6, 3, 7, 0.0)
    n = count_target_tokens(labels)
    with pytest.raises(ValueError, match="reference"):
        loss_from_hidden(hidden, weight, labels, LossSpec(weighting="dft", kl_weight=0.05))
    with pytest.raises(ValueError, match="reference"):
        loss_from_logits(hidden @ weight.T, labels, LossSpec(weighting="ref_ratio"))
    with pytest.raises(ValueError, match="num_target_tokens"):
        loss_from_hidden(hidden, weight, labels, LossSpec(), num_target_tokens=n - 1)
    with pytest.raises(ValueError, match="chunk_size"):
        loss_from_hidden(hidden, weight, labels, LossSpec(), chunk_size=0)


def test_count_target_tokens_is_the_shifted_count() -> None:
    labels = torch.tensor([[5, -100, 3, 4], [-100, -100, -100, 2]])
    assert count_target_tokens(labels) == 3  # position 0's label predicts nothing
    loss, stats = loss_from_logits(torch.zeros(2, 4, 6, dtype=torch.float64), labels, LossSpec())
    assert stats["target_tokens"] == 3 and float(loss) == pytest.approx(math.log(6))


# --- LossSpec --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"weighting": "focal"}, "weighting: 'focal'"),
        ({"kl_weight": 0.1}, "weighting: missing"),
        ({"weighting": "none", "kl_weight": -1}, "kl_weight: -1"),
        ({"weighting": "none", "kl_weight": "0.05"}, "kl_weight: '0.05'"),
        ({"weighting": "none", "kl_weight": math.nan}, "kl_weight: nan"),
        ({"weighting": "none", "kl_wieght": 0.1}, "unknown loss key.*kl_wieght"),
        ({"weighting": "topk", "keep_ratio": 0.0}, "keep_ratio: 0.0"),
        ({"weighting": "topk", "keep_ratio": 1.5}, "keep_ratio: 1.5"),
        ({"weighting": "topk", "keep_ratio": True}, "keep_ratio: True"),
        ({"weighting": "antiop", "clip_mult": 0}, "clip_mult: 0"),
        ({"weighting": "ref_ratio", "alpha": -0.5}, "alpha: -0.5"),
        ({"weighting": "none", "kl_direction": "sideways"}, "kl_direction: 'sideways'"),
        ({"weighting": "iw_sft", "iw_temp": -1.0}, "iw_temp: -1.0"),
        ({"weighting": "iw_sft", "iw_temp": True}, "iw_temp: True"),
        ({"weighting": "iw_sft", "iw_clip": 0}, "iw_clip: 0"),
        ({"weighting": "iw_sft", "iw_clip": -2.0}, "iw_clip: -2.0"),
        ({"weighting": "iw_sft", "iw_clip": math.inf}, "iw_clip: inf"),
        ({"weighting": "iw_sft", "iw_clip": "16"}, "iw_clip: '16'"),
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
    iw = LossSpec.from_config({"weighting": "iw_sft"})
    assert iw.needs_reference and (iw.iw_temp, iw.iw_clip) == (1.0, 16.0)  # the authors' temp 1, clip 16
    assert LossSpec.from_config({"weighting": "dft", "kl_weight": 0.05}).needs_reference
    assert not LossSpec.from_config({"weighting": "dft", "kl_weight": 0}).needs_reference
    assert LossSpec.from_config({"weighting": "none", "kl_weight": 1}).kl_weight == 1.0
    assert isinstance(LossSpec.from_config({"weighting": "none", "kl_weight": 1}).kl_weight, float)
    with pytest.raises(ValueError, match="weighting"):
        LossSpec(weighting="focal")  # direct construction is validated too
    with pytest.raises(AttributeError):
        spec.kl_weight = 1.0  # frozen


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kernel_anchor_gradients_are_the_definitions(direction: str) -> None:
    """The chunked kernel's hand-derived anchor (value, d/dlogits) equals autograd through the pure definition."""
    generator = torch.Generator().manual_seed(6)
    z = torch.randn(5, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    ref_logits[0, 3] = -math.inf  # a token the reference gives no mass
    ref_logp = torch.log_softmax(ref_logits, -1)
    logp = torch.log_softmax(z, -1)
    value = losses.ANCHORS[direction](logp, ref_logp)
    (want,) = torch.autograd.grad(value.sum(), z)
    analytic = chunked_loss._ANALYTIC_ANCHORS[losses.ANCHORS[direction]]
    got_value, got_grad = analytic(logp.detach(), ref_logp.clone(), True)
    if direction == "reverse":  # KL(p ‖ q) is +inf where q = 0 < p; compare the rows without that entry
        rows = slice(1, None)
        assert got_value[0] == value[0] == math.inf
    else:
        rows = slice(None)
    torch.testing.assert_close(got_value[rows], value.detach()[rows], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_grad[rows], want[rows], rtol=1e-12, atol=1e-15)
