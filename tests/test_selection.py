"""selection.py against hand-written references (plain Python loops in float64 on tiny seeded tensors).

Tolerances: the criteria run in float32 with torch's reductions, the references in float64 Python sums, so
they are compared with allclose (rtol 1e-5, atol 1e-7: float32 rounding of values of order 1e-2..1).
K-LoRA's tables use the same IEEE float64 operations in the same order as the references: compared exactly.
Bits are compared only where the same ops run on tensors of the same shape and layout (a CPU's vector width
decides the order of a reduction and which elements take a kernel's scalar tail).
"""
import math

import pytest
import torch

from lib_dynfuse import selection as sel


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [v / s for v in e]


def _tokens(feature, conv):
    """List of rows, each a list of tokens, each a list of channel values (loops, no tensor reshapes)."""
    f = feature.double().tolist()
    if conv:
        B, C, H, W = feature.shape
        return [[[f[b][c][h][w] for c in range(C)] for h in range(H) for w in range(W)] for b in range(B)]
    if feature.dim() == 2:
        return [[row] for row in f]
    return [[tok for tok in row] for row in f]


def _ref_kl(f_hat, f_base, conv):
    out = []
    for row_hat, row_base in zip(_tokens(f_hat, conv), _tokens(f_base, conv)):
        per_token = []
        for a, b in zip(row_hat, row_base):
            p, q = _softmax(a), _softmax(b)
            per_token.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))
        out.append(sum(per_token) / len(per_token))
    return out


def _ref_js(f_hat, f_base, conv):
    out = []
    for row_hat, row_base in zip(_tokens(f_hat, conv), _tokens(f_base, conv)):
        per_token = []
        for a, b in zip(row_hat, row_base):
            p, q = _softmax(a), _softmax(b)
            m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
            kl_pm = sum(pi * math.log(pi / mi) for pi, mi in zip(p, m))
            kl_qm = sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
            per_token.append(0.5 * kl_pm + 0.5 * kl_qm)
        out.append(sum(per_token) / len(per_token))
    return out


def _flat_rows(t):
    return [row for row in t.double().reshape(t.shape[0], -1).tolist()]


def _ref_cosine(f_hat, f_base):
    out = []
    for a, b in zip(_flat_rows(f_hat), _flat_rows(f_base)):
        dot = sum(x * y for x, y in zip(a, b))
        out.append(1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
    return out


def _ref_dot(f_hat, f_base):
    return [-sum(x * y for x, y in zip(a, b)) / len(a) for a, b in zip(_flat_rows(f_hat), _flat_rows(f_base))]


FEATURES = {
    "linear_tokens": ((3, 5, 6), False),   # [B, T, C], e.g. attention to_q output
    "linear_vector": ((3, 6), False),      # [B, C], e.g. time_emb_proj output
    "conv": ((3, 6, 2, 3), True),          # [B, C, H, W]
}


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, base + 0.7 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("layout", sorted(FEATURES))
def test_kl_and_js_match_loop_reference(layout):
    shape, conv = FEATURES[layout]
    base, hat = _pair(shape)
    cdim = 1 if conv else -1
    logp, logp_hat = sel.channel_log_probs(base, cdim), sel.channel_log_probs(hat, cdim)
    kl, js = sel.kl_per_row(logp_hat, logp), sel.js_per_row(logp_hat, logp)
    assert kl.shape == js.shape == (shape[0],)
    torch.testing.assert_close(kl.double(), torch.tensor(_ref_kl(hat, base, conv), dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(js.double(), torch.tensor(_ref_js(hat, base, conv), dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    # KL is asymmetric, JS symmetric (both use the same per-token distributions)
    kl_back = sel.kl_per_row(logp, logp_hat)
    torch.testing.assert_close(kl_back.double(), torch.tensor(_ref_kl(base, hat, conv), dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    assert not torch.allclose(kl_back, kl, rtol=1e-3)
    torch.testing.assert_close(sel.js_per_row(logp, logp_hat), js, rtol=1e-6, atol=1e-8)
    # the criterion entry point gives the same KL from a delta
    d_c, _ = sel.branch_divergences("kl", base, hat - base, torch.zeros_like(base), cdim)
    torch.testing.assert_close(d_c, kl, rtol=1e-6, atol=1e-8)


def _scores(criterion, base, d_c, d_s, cdim):
    """The hooks' scores for two deltas, as (s_c, s_s) [B] (branch_scores keeps size-1 feature dims)."""
    scores = sel.branch_scores(criterion, base, sel.branch_outputs(base, torch.stack([d_c, d_s])), cdim)
    assert scores.dtype == torch.float64 and scores.shape == (2, base.shape[0]) + (1,) * (base.dim() - 1)
    return scores.reshape(2, -1).unbind(0)


@pytest.mark.parametrize("layout", sorted(FEATURES))
def test_kl_scores_differ_by_the_kl_difference(layout):
    """The hooks' KL scores drop LSE(F), which both branches share, and sum over tokens: s_c - s_s = tokens x
    (KL_c - KL_s) (float64 loop reference), and the choice is the divergences' choice, row by row, both ways."""
    shape, conv = FEATURES[layout]
    cdim = 1 if conv else -1
    g = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=g)
    d_c, d_s = 0.5 * torch.randn(shape, generator=g), 0.5 * torch.randn(shape, generator=g)
    d_s[0] *= 3.0   # row 0: the style changes far more; the others by chance
    s_c, s_s = _scores("kl", base, d_c, d_s, cdim)
    tokens = base[0].numel() // shape[cdim]
    ref = torch.tensor(_ref_kl(base + d_c, base, conv), dtype=torch.float64) - torch.tensor(
        _ref_kl(base + d_s, base, conv), dtype=torch.float64)
    torch.testing.assert_close((s_c - s_s) / tokens, ref, rtol=1e-5, atol=1e-6)
    kl_c, kl_s = sel.branch_divergences("kl", base, d_c, d_s, cdim)
    assert sel.choose_subject(s_c, s_s).tolist() == sel.choose_subject(kl_c, kl_s).tolist() == (ref >= 0).tolist()
    assert sel.choose_subject(s_c, s_s).tolist()[0] is False


@pytest.mark.parametrize("criterion", ["js", "cosine", "dot"])
@pytest.mark.parametrize("layout", sorted(FEATURES))
def test_other_scores_are_the_divergences(criterion, layout):
    shape, conv = FEATURES[layout]
    cdim = 1 if conv else -1
    g = torch.Generator().manual_seed(12)
    base = torch.randn(shape, generator=g)
    d_c, d_s = 0.5 * torch.randn(shape, generator=g), 0.3 * torch.randn(shape, generator=g)
    s_c, s_s = _scores(criterion, base, d_c, d_s, cdim)
    ref = {"js": lambda h: _ref_js(h, base, conv), "cosine": lambda h: _ref_cosine(h, base),
           "dot": lambda h: _ref_dot(h, base)}[criterion]
    torch.testing.assert_close(s_c, torch.tensor(ref(base + d_c), dtype=torch.float64), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_s, torch.tensor(ref(base + d_s), dtype=torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("criterion", sel.CRITERIA)
def test_equal_deltas_score_equal_bits_in_either_layout(criterion):
    """Equal branches tie exactly (ties keep the subject), also for a channels_last conv output: both branches
    are reduced by the same op over one stacked tensor."""
    base, hat = _pair((2, 8, 5, 5), seed=7)
    delta = hat - base
    for y in (base, base.to(memory_format=torch.channels_last)):
        for d in (delta, torch.zeros_like(base)):
            s_c, s_s = _scores(criterion, y, d, d.clone(), 1)
            assert torch.equal(s_c, s_s) and sel.choose_subject(s_c, s_s).all()


def test_kept_branch_is_where():
    g = torch.Generator().manual_seed(23)
    f_both = torch.randn(2, 3, 4, 5, generator=g)
    choose = torch.tensor([True, False, True]).view(3, 1, 1)
    assert torch.equal(sel.kept_branch(choose, f_both), torch.where(choose, f_both[0], f_both[1]))


def test_conv_tokens_are_pixels_and_channels_are_dim1():
    base, _ = _pair((2, 3, 2, 2))
    tokens = sel.tokens_by_channels(base, 1)
    assert tokens.shape == (2, 4, 3)
    for b in range(2):
        for h in range(2):
            for w in range(2):
                assert torch.equal(tokens[b, h * 2 + w], base[b, :, h, w])


@pytest.mark.parametrize("layout", sorted(FEATURES))
def test_cosine_and_dot_match_formula(layout):
    shape, _ = FEATURES[layout]
    base, hat = _pair(shape, seed=1)
    torch.testing.assert_close(sel.cosine_divergence_per_row(hat, base).double(),
                               torch.tensor(_ref_cosine(hat, base), dtype=torch.float64), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sel.dot_divergence_per_row(hat, base).double(),
                               torch.tensor(_ref_dot(hat, base), dtype=torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("criterion", sel.CRITERIA)
def test_zero_delta_diverges_by_exactly_nothing_and_ties_go_to_subject(criterion):
    base, _ = _pair((2, 4, 6))
    zero = torch.zeros_like(base)
    d_c, d_s = sel.branch_divergences(criterion, base, zero, zero, -1)
    assert torch.equal(d_c, d_s)                          # the same ops on the same bits
    if criterion == "kl":   # exactly 0 by construction: both LSEs come from the same bits
        assert torch.equal(d_c, torch.zeros(2))
    elif criterion != "dot":  # js, cosine: 0 up to the rounding of log/cosine; dot is -mean(F*F), not a divergence
        torch.testing.assert_close(d_c, torch.zeros_like(d_c), rtol=0, atol=1e-6)
    assert sel.choose_subject(d_c, d_s).tolist() == [True, True]
    assert sel.choose_subject(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])).tolist() == [True, False]


@pytest.mark.parametrize("criterion", sel.CRITERIA)
def test_all_zero_features_give_no_nan(criterion):
    zero = torch.zeros(2, 3, 4)
    for d_c, d_s in (sel.branch_divergences(criterion, zero, zero, zero, -1), _scores(criterion, zero, zero, zero, -1)):
        assert not torch.isnan(d_c).any() and not torch.isnan(d_s).any()
        assert sel.choose_subject(d_c, d_s).all()


@pytest.mark.parametrize("criterion", sel.CRITERIA)
@pytest.mark.parametrize("conv", [False, True])
def test_each_row_keeps_the_branch_that_changed_it_more(criterion, conv):
    shape = (2, 6, 2, 2) if conv else (2, 4, 6)
    cdim = 1 if conv else -1
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    big = -2.0 * base + 0.3 * torch.randn(shape, generator=g)   # flips the features: large change on every criterion
    small = 0.01 * base.flip(cdim)
    d_c = torch.stack([big[0], small[1]])                     # row 0: subject changes more; row 1: style does
    d_s = torch.stack([small[0], big[1]])
    div_c, div_s = sel.branch_divergences(criterion, base, d_c, d_s, cdim)
    assert sel.choose_subject(div_c, div_s).tolist() == [True, False]
    score_c, score_s = _scores(criterion, base, d_c, d_s, cdim)
    assert sel.choose_subject(score_c, score_s).tolist() == [True, False]


def test_unknown_criterion_is_a_clear_error():
    with pytest.raises(ValueError, match="criterion must be one of"):
        sel.branch_divergences("l2", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), -1)


# ----------------------------------------------------------------------------- K-LoRA
def test_topk_abs_sum_matches_sorted_sum():
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(6, 5, generator=g)
    values = sorted((abs(v) for v in dw.double().flatten().tolist()), reverse=True)
    for k in (1, 4, 7, 30):
        assert math.isclose(sel.topk_abs_sum(dw, k).item(), math.fsum(values[:k]), rel_tol=1e-15)
    # K larger than dW: clamped to all elements
    assert math.isclose(sel.topk_abs_sum(dw, 1000).item(), math.fsum(values), rel_tol=1e-15)
    # equal magnitudes: the sum does not depend on which tied element topk returns
    assert sel.topk_abs_sum(torch.tensor([[-2.0, 2.0], [1.0, -2.0]]), 2).item() == 4.0


def test_klora_k_is_rank_product_clamped():
    assert sel.klora_k(4, 8, 10_000) == 32
    assert sel.klora_k(64, 64, 1000) == 1000
    assert sel.klora_k(0, 8, 10) == 1


def test_gamma_formula_and_zero_safety():
    abs_c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    abs_s = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert sel.klora_gamma(abs_c, abs_s).item() == 6.0 / 1.0
    zeros = torch.zeros(3, dtype=torch.float64)
    for c, s in ((abs_c, zeros), (zeros, abs_s), (zeros, zeros)):
        gamma = sel.klora_gamma(c, s)
        assert gamma.item() == 1.0 and torch.isfinite(gamma)
    assert sel.klora_gamma(torch.zeros(0), torch.zeros(0)).item() == 1.0


@pytest.mark.parametrize("alpha,beta", [(1.5, 0.5), (2.0, 0.1), (0.7, 1.0)])
def test_scales_match_the_formulas(alpha, beta):
    total = 50
    p = sel.klora_progress(total)
    assert p.tolist() == [i / total for i in range(total)]
    assert sel.klora_scale(p, alpha, beta, "linear").tolist() == [alpha * (i / total) + beta for i in range(total)]
    star = sel.klora_scale(p, alpha, beta, "star").tolist()
    assert star == [(1.5 * (i / total) + 1.3) % alpha for i in range(total)]
    assert [sel.klora_scale(i / total, alpha, beta, "star") for i in range(total)] == star


def test_star_scale_shape_for_the_default_alpha():
    # supplement D: 1.3 at the start, wraps to ~0 at p = 0.2/1.5, then rises again to 1.3 at p = 1
    assert sel.klora_scale(0.0, 1.5, 0.5, "star") == 1.3
    assert sel.klora_scale(0.1, 1.5, 0.5, "star") == pytest.approx(1.45)
    assert sel.klora_scale(0.2, 1.5, 0.5, "star") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="alpha > 0"):
        sel.klora_scale(0.0, 0.0, 0.5, "star")
    with pytest.raises(ValueError, match="scale must be one of"):
        sel.klora_scale(0.0, 1.5, 0.5, "cosine")


def _random_sums(layers, seed):
    g = torch.Generator().manual_seed(seed)
    s_c = torch.rand(layers, generator=g, dtype=torch.float64) * 3
    s_s = torch.rand(layers, generator=g, dtype=torch.float64) * 3
    return s_c, s_s


@pytest.mark.parametrize("kind", ["linear", "star"])
@pytest.mark.parametrize("total", [1, 7, 30])
def test_schedule_equals_brute_force(kind, total):
    s_c, s_s = _random_sums(12, seed=total)
    gamma = torch.tensor(1.3, dtype=torch.float64)
    table = sel.klora_schedule(s_c, s_s, gamma, total, 1.5, 0.5, kind)
    assert table.shape == (total, 12) and table.dtype == torch.bool
    expected = []
    for step in range(total):
        p = step / total
        scale = 1.5 * p + 0.5 if kind == "linear" else (1.5 * p + 1.3) % 1.5
        expected.append([c >= s * 1.3 * scale for c, s in zip(s_c.tolist(), s_s.tolist())])
    assert table.tolist() == expected


def test_switch_progress_agrees_with_the_schedule():
    s_c, s_s = _random_sums(40, seed=5)
    gamma = torch.tensor(0.8, dtype=torch.float64)
    alpha, beta = 1.5, 0.5
    p_star = sel.klora_switch_progress(s_c, s_s, gamma, alpha, beta)
    for j in range(40):  # the closed form by hand
        assert p_star[j].item() == pytest.approx((s_c[j].item() / (s_s[j].item() * 0.8) - beta) / alpha, rel=1e-12)
    total = 200
    table = sel.klora_schedule(s_c, s_s, gamma, total, alpha, beta, "linear")
    p = sel.klora_progress(total)
    away = (p[:, None] - p_star[None, :]).abs() > 1e-9   # exact ties may round either way in the closed form
    assert torch.equal(table[away], (p[:, None] <= p_star[None, :])[away])
    # monotonic: once a layer switched to the style it stays there
    assert torch.equal(table.int().cummin(0).values, table.int())


def test_switch_progress_edge_cases():
    s_c = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    s_s = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    p_star = sel.klora_switch_progress(s_c, s_s, 1.0, 1.5, 0.5)
    assert p_star[0] == math.inf          # zero style: subject forever
    assert p_star[1] == -1 / 3            # zero subject: style from the first step (p* < 0)
    assert p_star[2] == pytest.approx(1 / 3)
    assert p_star[3] == math.inf          # both zero: tie -> subject
    const = sel.klora_switch_progress(s_c, s_s, 1.0, 0.0, 0.5)   # alpha 0: S = beta at every step
    assert const.tolist() == [math.inf, -math.inf, math.inf, math.inf]


def test_all_zero_lora_schedules():
    s = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    for kind in ("linear", "star"):
        # zero style: subject everywhere; zero subject: style everywhere (S > 0 at every step here)
        gamma = sel.klora_gamma(s, zero)
        assert sel.klora_schedule(s, zero, gamma, 20, 1.5, 0.5, kind).all()
        gamma = sel.klora_gamma(zero, s)
        assert not sel.klora_schedule(zero, s, gamma, 20, 1.5, 0.5, kind).any()


def test_schedule_progress_override_for_text_encoders():
    s_c, s_s = _random_sums(5, seed=9)
    first_row = sel.klora_schedule(s_c, s_s, 1.0, 10, 1.5, 0.5, "linear")[0]
    assert torch.equal(sel.klora_schedule(s_c, s_s, 1.0, 10, 1.5, 0.5, "linear", progress=[0.0])[0], first_row)


@pytest.mark.parametrize("layout", sorted(FEATURES))
def test_kl_is_stable_for_large_features(layout):
    """Features of magnitude ~100 (deep UNet layers): no overflow, still the loop reference, in the per-branch
    divergence and in the hooks' scores."""
    shape, conv = FEATURES[layout]
    base, hat = _pair(shape, seed=5)
    base, hat = 80.0 * base, 80.0 * base + 3.0 * (hat - base)
    cdim = 1 if conv else -1
    ref = torch.tensor(_ref_kl(hat, base, conv), dtype=torch.float64)
    kl = sel.kl_per_row(sel.channel_log_probs(hat, cdim), sel.channel_log_probs(base, cdim))
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1e-4)
    s_c, s_s = _scores("kl", base, hat - base, torch.zeros_like(base), cdim)
    tokens = base[0].numel() // shape[cdim]
    torch.testing.assert_close((s_c - s_s) / tokens, ref, rtol=1e-4, atol=1e-4)


def test_zero_delta_is_exactly_zero_kl_for_channels_last_features():
    """A conv output in channels_last (as hosts may produce) and its copy in the standard layout: equal
    values must give equal log-probabilities, so a zero delta diverges by exactly 0 and cannot win a tie."""
    base, _ = _pair((2, 8, 5, 5), seed=7)
    channels_last = base.to(memory_format=torch.channels_last)
    zero = torch.zeros_like(base)
    d_c, d_s = sel.output_divergences("kl", channels_last, base + zero, base.clone(), 1)
    assert torch.equal(d_c, torch.zeros(2)) and torch.equal(d_s, torch.zeros(2))
