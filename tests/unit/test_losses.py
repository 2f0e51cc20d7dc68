"""Policy losses: hand-computed values and gradients, and split (micro-batch / rank) invariance."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.aggregation import AGG_MODES, aggregate_loss, loss_normalizer
from pipeline.core.covariance import select_clip_cov, select_kl_cov, token_covariance
from pipeline.core.losses import (
    clip_cov_loss,
    entropy_bonus,
    get_policy_loss,
    kl_cov_loss,
    kl_penalty,
    ppo_loss,
    register_policy_loss,
    select_tokens,
)
from schemas.config import policy_loss
from tests.helpers import loss_cfg

LOG = math.log


def _leaf(rows):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


# ------------------------------------------------------------------------------------------ PPO


def _ppo_case():
    # One sequence, 4 valid tokens + 1 padding token holding garbage.
    # ratio r = exp(logp - old):     1.5    0.5    0.5    2.0   (pad)
    # A:                             +1     +1     -1     -1
    # eps_low = 0.2, eps_high = 0.28 -> clip(r) in [0.8, 1.28]
    # pg1 = -A r:                    -1.5   -0.5   +0.5   +2.0
    # pg2 = -A clip(r):              -1.28  -0.8   +0.8   +1.28
    # max(pg1, pg2):                 -1.28  -0.5   +0.8   +2.0    (t0, t2 clipped: pg2 > pg1)
    # token-mean = (-1.28 - 0.5 + 0.8 + 2.0) / 4 = 1.02 / 4 = 0.255
    # d/dlogp: clipped tokens 0; else -A r / 4: t1 = -0.5/4 = -0.125, t3 = +2/4 = 0.5
    old = torch.zeros(1, 5, dtype=torch.float64)
    logp = _leaf([[LOG(1.5), LOG(0.5), LOG(0.5), LOG(2.0), 100.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_ppo_hand_computed_clip_higher():
    logp, old, adv, mask = _ppo_case()
    cfg = policy_loss(clip_ratio_low=0.2, clip_ratio_high=0.28)
    loss, stats = ppo_loss(logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(0.255, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.0, 0.5, 0.0]], dtype=torch.float64))
    assert stats["pg_clipfrac"].item() == pytest.approx(0.5)
    assert stats["pg_clipfrac_lower"].item() == 0.0
    # ppo_kl = mean(old - logp) = -log(1.5 * 0.5 * 0.5 * 2) / 4 = -log(0.75) / 4
    assert stats["ppo_kl"].item() == pytest.approx(-LOG(0.75) / 4)


def test_ppo_dual_clip():
    # As above but t3's ratio is 4 (A = -1): max(pg1 = 4, pg2 = 1.28) = 4 > pg3 = -A c = 3 -> 3,
    # zero gradient there. Loss = (-1.28 - 0.5 + 0.8 + 3) / 4 = 0.505.
    logp, old, adv, mask = _ppo_case()
    with torch.no_grad():
        logp[0, 3] = LOG(4.0)
    cfg = policy_loss(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    loss, stats = ppo_loss(logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(0.505, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert stats["pg_clipfrac_lower"].item() == pytest.approx(0.25)
    # Without dual clip the same token keeps loss 4 and gradient -A r / 4 = 1.
    loss_nc, _ = ppo_loss(logp, old, adv, mask, policy_loss(clip_ratio_low=0.2, clip_ratio_high=0.28))
    assert loss_nc.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 4.0) / 4)


# ------------------------------------------------------------------------------------- Clip-Cov


def _cov_case():
    # 2 sequences x 2 tokens, all valid. A = [[1, 1], [-1, -1]] (mean 0),
    # logp = [[-1, -3], [-2, -2]] (mean -2) -> cov = A * (logp + 2) = [[1, -1], [0, 0]].
    logp = _leaf([[-1.0, -3.0], [-2.0, -2.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    return logp, adv, mask


def test_token_covariance_hand_computed():
    logp, adv, mask = _cov_case()
    cov = token_covariance(logp, adv, mask)
    torch.testing.assert_close(cov, torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=torch.float64))
    # Padding gets 0 and does not move the means: add a padded column with wild values.
    logp_p = torch.cat([logp.detach(), torch.full((2, 1), 50.0, dtype=torch.float64)], 1)
    adv_p = torch.cat([adv, torch.full((2, 1), 9.0, dtype=torch.float64)], 1)
    mask_p = torch.cat([mask, torch.zeros(2, 1, dtype=torch.bool)], 1)
    torch.testing.assert_close(token_covariance(logp_p, adv_p, mask_p)[:, :2], cov)
    assert token_covariance(logp_p, adv_p, mask_p)[:, 2].abs().sum() == 0


def test_clip_cov_hand_computed_zero_gradient_on_selected():
    # On-policy: r = 1, nothing PPO-clipped. Band (0.5, 5) holds only token (0,0) (cov 1).
    # k = max(1, int(0.25 * 4)) = 1 -> (0,0) detached.
    # Per-token -A r = [[-1, -1], [1, 1]] -> [[0, -1], [1, 1]]; token-mean over all 4 = 1/4.
    # Gradient -A r / 4 except the selected token: [[0, -0.25], [0.25, 0.25]].
    logp, adv, mask = _cov_case()
    cfg = policy_loss(name="clip_cov", clip_cov_lb=0.5, clip_cov_ub=5.0, clip_cov_ratio=0.25)
    loss, stats = clip_cov_loss(logp, logp.detach(), adv, mask, cfg)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.25], [0.25, 0.25]], dtype=torch.float64))
    assert logp.grad[0, 0].item() == 0.0
    assert stats["cov/selected_frac"].item() == pytest.approx(0.25)
    assert stats["cov/max"].item() == pytest.approx(1.0)
    assert stats["cov/mean"].item() == pytest.approx(0.0)
    assert stats["cov/frac_positive"].item() == pytest.approx(0.25)


def test_clip_cov_excludes_ppo_clipped_tokens():
    # Same, but token (0,0) is already clipped: old = logp - log 1.5 -> r = 1.5 > 1.2 with A = +1.
    # No other token lies in the band, so nothing is selected:
    # loss = (-1.2 - 1 + 1 + 1) / 4 = -0.05.
    logp, adv, mask = _cov_case()
    old = logp.detach().clone()
    old[0, 0] -= LOG(1.5)
    cfg = policy_loss(name="clip_cov", clip_cov_lb=0.5, clip_cov_ub=5.0, clip_cov_ratio=0.25)
    loss, stats = clip_cov_loss(logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(-0.05)
    assert stats["cov/selected_frac"].item() == 0.0
    assert stats["pg_clipfrac"].item() == pytest.approx(0.25)


def test_clip_cov_band_is_open_and_upper_bounded():
    cov = torch.tensor([0.5, 1.0, 2.0, 5.0, 7.0])
    cfg = policy_loss(name="clip_cov", clip_cov_lb=1.0, clip_cov_ub=5.0, clip_cov_ratio=1.0)
    sel = select_clip_cov(cov, torch.ones(5, dtype=torch.bool), 5, cfg)
    assert sel.tolist() == [False, False, True, False, False]  # 1 < cov < 5 strictly


def test_clip_cov_random_selection_count_and_determinism():
    # 100 valid tokens, 40 candidates in band; r = 0.1 -> k = 10 drawn from the 40.
    cov = torch.zeros(10, 10)
    cov.view(-1)[:40] = 2.0
    cand = torch.ones(10, 10, dtype=torch.bool)
    cfg = policy_loss(name="clip_cov", clip_cov_ratio=0.1)
    picks = [select_clip_cov(cov, cand, 100, cfg, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert int(picks[0].sum()) == 10
    assert bool((cov[picks[0]] == 2.0).all())
    assert torch.equal(picks[0], picks[1])
    assert not torch.equal(picks[0], picks[2])
    # Fewer candidates than k: all of them.
    assert int(select_clip_cov(cov, cand, 1000, policy_loss(name="clip_cov", clip_cov_ratio=0.5)).sum()) == 40


# --------------------------------------------------------------------------------------- KL-Cov


def test_kl_cov_hand_computed_penalty_gradient():
    # old = logp - 0.1 -> r = e^0.1 everywhere, |logp - old| = 0.1; cov as in _cov_case.
    # k = max(1, int(0.25 * 4)) = 1 -> top token (0,0) (cov 1) gets + beta |logp - old|, beta = 1.
    # Loss per token: -A e^0.1 (+0.1 at (0,0)); sum of -A r cancels -> token-mean = 0.1 / 4 = 0.025.
    # Gradient (-A r + beta sign(logp - old)) / 4: (0,0) = (-e^0.1 + 1)/4, (0,1) = -e^0.1/4,
    # second row +e^0.1/4.
    logp, adv, mask = _cov_case()
    old = logp.detach() - 0.1
    cfg = policy_loss(name="kl_cov", kl_cov_ratio=0.25, kl_cov_beta=1.0)
    loss, stats = kl_cov_loss(logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(0.025)
    loss.backward()
    e = math.exp(0.1)
    want = torch.tensor([[(-e + 1) / 4, -e / 4], [e / 4, e / 4]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want)
    assert stats["cov/selected_frac"].item() == pytest.approx(0.25)
    assert stats["kl_cov/abs_kl_selected"].item() == pytest.approx(0.1)
    assert stats["ppo_kl_abs"].item() == pytest.approx(0.1)


def test_kl_cov_has_no_ratio_clipping_and_is_noop_on_policy():
    # r = 3 with A = +1 would be clipped by PPO; KL-Cov keeps -A r = -3 and gradient -3 (1 token).
    logp = _leaf([[LOG(3.0)]])
    cfg = policy_loss(name="kl_cov", kl_cov_ratio=0.5, kl_cov_beta=0.0)
    loss, _ = kl_cov_loss(
        logp,
        torch.zeros(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, 1),
        cfg,
    )
    loss.backward()
    assert loss.item() == pytest.approx(-3.0)
    assert logp.grad.item() == pytest.approx(-3.0)
    # On-policy the penalty is 0: KL-Cov loss == -mean(A) and the no-op stat reads 0.
    logp, adv, mask = _cov_case()
    adv = adv + torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    loss, stats = kl_cov_loss(logp, logp.detach(), adv, mask, policy_loss(name="kl_cov", kl_cov_ratio=0.5))
    assert loss.item() == pytest.approx(-0.5 / 4)
    assert stats["kl_cov/abs_kl_selected"].item() == 0.0


def test_select_kl_cov_top_k_ignores_padding():
    cov = torch.tensor([[3.0, 1.0, 9.0], [2.0, 0.5, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)  # 9 and 8 are padding
    sel = select_kl_cov(cov, mask, 4, policy_loss(name="kl_cov", kl_cov_ratio=0.5))  # k = 2
    assert sel.tolist() == [[True, False, False], [True, False, False]]


# ------------------------------------------------------------------------------- aggregation


def test_aggregation_hand_computed():
    # loss [[1, 2, pad], [3, pad, pad]]: token sums 3 and 3, lengths 2 and 1, T = 3.
    lm = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(lm, mask, "token-mean").item() == pytest.approx(6 / 3)
    assert aggregate_loss(lm, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 3) / 2)
    assert aggregate_loss(lm, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 3) / 2)
    assert aggregate_loss(lm, mask, "seq-mean-token-sum-norm").item() == pytest.approx(6 / (2 * 3))
    assert aggregate_loss(lm, mask, "seq-mean-token-sum-norm", seq_norm_length=4).item() == pytest.approx(
        6 / 8
    )
    assert aggregate_loss(lm, mask, "token-mean", normalizer=12).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(lm, mask, "token-sum")


def _random_batch(seed, n, t):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[0, 0] = True  # at least one valid token overall
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t).clone()
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 4
    old = logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


def _cuts(n, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=3)))) if n > 1 else []
    return list(zip([0, *cuts], [*cuts, n]))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 7),
    t=st.integers(1, 6),
    mode=st.sampled_from(AGG_MODES),
    data=st.data(),
)
def test_aggregation_split_invariance(seed, n, t, mode, data):
    logp, _, _, mask = _random_batch(seed, n, t)
    full = aggregate_loss(logp, mask, mode)
    norm = loss_normalizer(mask, mode)
    parts = [aggregate_loss(logp[a:b], mask[a:b], mode, normalizer=norm) for a, b in _cuts(n, data)]
    torch.testing.assert_close(sum(parts), full)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 7),
    t=st.integers(1, 6),
    mode=st.sampled_from(AGG_MODES),
    name=st.sampled_from(["ppo", "clip_cov", "kl_cov"]),
    data=st.data(),
)
def test_loss_split_invariance_with_global_selection(seed, n, t, mode, name, data):
    """Micro-batches (or ranks) given the global `selected` and `normalizer` sum to the full loss
    and the same gradient, however the batch is split."""
    logp, old, adv, mask = _random_batch(seed, n, t)
    # Wide band and large ratios so that selections are non-trivial on tiny batches.
    cfg = loss_cfg(
        name,
        loss_agg_mode=mode,
        clip_cov_lb=-1.0,
        clip_cov_ub=10.0,
        clip_cov_ratio=0.3,
        kl_cov_ratio=0.3,
        clip_ratio_c=3.0,
    )
    fn = get_policy_loss(name)
    selected = select_tokens(logp, old, adv, mask, cfg, generator=torch.Generator().manual_seed(seed))
    assert (selected is None) == (name == "ppo")

    full_lp = logp.clone().requires_grad_(True)
    full, _ = fn(full_lp, old, adv, mask, cfg, selected=selected)
    full.backward()

    split_lp = logp.clone().requires_grad_(True)
    norm = loss_normalizer(mask, mode)
    total = 0.0
    for a, b in _cuts(n, data):
        sel = None if selected is None else selected[a:b]
        part, _ = fn(split_lp[a:b], old[a:b], adv[a:b], mask[a:b], cfg, normalizer=norm, selected=sel)
        total = total + part
    total.backward()
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(split_lp.grad, full_lp.grad)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_global_selection_matches_in_batch_selection(name):
    # On the full batch, select_tokens reproduces the loss's own (reference) selection.
    logp, old, adv, mask = _random_batch(3, 16, 12)
    cfg = loss_cfg(name, clip_cov_lb=0.0, clip_cov_ub=10.0, clip_cov_ratio=0.05, kl_cov_ratio=0.05)
    fn = get_policy_loss(name)
    own, s1 = fn(logp, old, adv, mask, cfg, generator=torch.Generator().manual_seed(7))
    sel = select_tokens(logp, old, adv, mask, cfg, generator=torch.Generator().manual_seed(7))
    given_, s2 = fn(logp, old, adv, mask, cfg, selected=sel)
    assert int(sel.sum()) == max(1, int(0.05 * int(mask.sum())))
    torch.testing.assert_close(own, given_)
    assert s1["cov/selected_frac"] == s2["cov/selected_frac"] > 0


# ------------------------------------------------------------------------------- registry, extras


def test_registry():
    assert get_policy_loss("ppo") is ppo_loss
    with pytest.raises(ValueError, match="registered"):
        get_policy_loss("nope")

    @register_policy_loss("test_only_vanilla_pg")
    def _pg(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        config,
        *,
        normalizer=None,
        selected=None,
        generator=None,
    ):
        return aggregate_loss(-advantages * logprobs, response_mask, "token-mean"), {}

    assert get_policy_loss("test_only_vanilla_pg") is _pg


def test_entropy_bonus_and_kl_penalty():
    ent = torch.tensor([[1.0, 3.0], [2.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    term, stats = entropy_bonus(ent, mask, 0.01)
    assert term.item() == pytest.approx(-0.01 * 2.0)  # token-mean entropy (1 + 3 + 2) / 3 = 2
    assert stats["entropy/mean"].item() == pytest.approx(2.0)

    lp = torch.tensor([-1.0, -2.0, 0.0])
    ref = torch.tensor([-2.0, -1.0, -30.0])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([1.0, -1.0, 30.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([0.5, 0.5, 450.0]))
    # k3 = e^(ref-lp) - (ref-lp) - 1: e^-1 + 1 - 1 = 0.3679; e^1 - 1 - 1 = 0.7183;
    # ref-lp = -30 clamps to -20: e^-20 + 20 - 1 ~ 19 -> clamped to 10.
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([math.exp(-1), math.e - 2, 10.0]))
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k4")


def test_selected_gradients_random_batch():
    """On a random batch: Clip-Cov's selected tokens get exactly 0 gradient and every other token
    gets PPO's gradient; KL-Cov's selected tokens get exactly beta * sign(logp - old) / n_valid more
    than the plain -A r term, the rest exactly that term."""
    logp, old, adv, mask = _random_batch(11, 12, 10)
    n_valid = int(mask.sum())
    shared = dict(clip_cov_lb=0.0, clip_cov_ub=10.0, clip_cov_ratio=0.1, kl_cov_ratio=0.1, kl_cov_beta=0.7)
    cfgs = {name: loss_cfg(name, **shared) for name in ("ppo", "clip_cov", "kl_cov")}

    def grad(fn, name, **kw):
        lp = logp.clone().requires_grad_(True)
        fn(lp, old, adv, mask, cfgs[name], **kw)[0].backward()
        return lp.grad

    sel = select_tokens(
        logp,
        old,
        adv,
        mask,
        cfgs["clip_cov"],
        generator=torch.Generator().manual_seed(0),
    )
    assert int(sel.sum()) == max(1, int(0.1 * n_valid))
    g_cc, g_ppo = grad(clip_cov_loss, "clip_cov", selected=sel), grad(ppo_loss, "ppo")
    assert bool((g_cc[sel] == 0).all()) and bool((g_ppo[sel] != 0).any())
    torch.testing.assert_close(g_cc[~sel], g_ppo[~sel])

    sel = select_tokens(logp, old, adv, mask, cfgs["kl_cov"])
    g_kl = grad(kl_cov_loss, "kl_cov", selected=sel)
    plain = torch.where(mask, -adv * torch.exp(logp - old), 0.0) / n_valid  # d(-A r)/dlogp = -A r
    extra = torch.where(sel, 0.7 * torch.sign(logp - old) / n_valid, 0.0)
    torch.testing.assert_close(g_kl, plain + extra)
    assert bool((torch.sign(logp - old)[sel] != 0).all())
