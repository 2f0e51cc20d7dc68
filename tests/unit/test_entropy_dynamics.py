"""The first-order entropy law against measured entropy changes, and the batch estimates."""

import torch

from pipeline.core.entropy_dynamics import (
    entropy_from_logits,
    exact_entropy_change,
    first_order_entropy_change,
    predicted_entropy_change,
    predicted_entropy_change_by_group,
)


def test_first_order_matches_measured_change_and_error_shrinks():
    # Random softmax policies over 16 states x 50 actions, random logit direction d.
    # dH(eps) = -eps Cov(log pi, d) + O(eps^2): relative error ~ eps, so 10x smaller step -> ~10x smaller.
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(16, 50, generator=g, dtype=torch.float64)
    d = torch.randn(16, 50, generator=g, dtype=torch.float64)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        exact = exact_entropy_change(z, z + eps * d)
        approx = first_order_entropy_change(z, z + eps * d)
        errors.append(((exact - approx).norm() / exact.norm()).item())
    assert errors[-1] < 1e-2
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5


def test_natural_pg_step_lowers_entropy_when_covariance_positive():
    # One state, logits [2, 0, -2]; advantage favouring the already likely action: Cov(log pi, A) > 0.
    z = torch.tensor([[2.0, 0.0, -2.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    assert first_order_entropy_change(z, z + 0.01 * adv).item() < 0
    assert exact_entropy_change(z, z + 0.01 * adv).item() < 0
    # Favouring the unlikely action raises entropy.
    assert exact_entropy_change(z, z - 0.01 * adv).item() > 0
    # Uniform logits: entropy is log V.
    assert entropy_from_logits(torch.zeros(4)).item() == torch.log(torch.tensor(4.0)).item()


def test_predicted_entropy_change_hand_computed():
    # Valid tokens logp [-1, -3], A [1, -1] (padding ignored): means -2, 0 ->
    # Cov = ((1)(1) + (-1)(-1)) / 2 = 1 -> predicted dH = -lr_scale * 1.
    logp = torch.tensor([[-1.0, -3.0, 5.0]])
    adv = torch.tensor([[1.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert predicted_entropy_change(logp, adv, mask).item() == -1.0
    assert predicted_entropy_change(logp, adv, mask, lr_scale=0.5).item() == -0.5


def test_sampled_estimate_tracks_the_lemma():
    # Sampling actions from pi and taking the empirical Cov(log pi(a), A(a)) estimates the lemma's
    # Cov_{a~pi} for the natural-PG step dz = eta * A.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 20, generator=g, dtype=torch.float64) * 1.5
    # Advantages partly aligned with the logits (the usual case: likely answers score higher).
    adv_table = 0.5 * z + torch.randn(1, 20, generator=g, dtype=torch.float64)
    eta = 1e-3
    lemma = first_order_entropy_change(z, z + eta * adv_table).item()
    pi = torch.softmax(z[0], -1)
    actions = torch.multinomial(pi, 40_000, replacement=True, generator=g)
    logp = torch.log(pi[actions])[None]
    adv = adv_table[0, actions][None]
    est = predicted_entropy_change(logp, adv, torch.ones_like(logp), lr_scale=eta).item()
    # Standard error of the sample covariance; the test only has teeth if it is small vs the lemma.
    prod = (logp - logp.mean()) * (adv - adv.mean())
    se = eta * prod.std().item() / prod.numel() ** 0.5
    assert 4 * se < 0.3 * abs(lemma)
    assert abs(est - lemma) < 4 * se


def test_group_estimate_hand_computed():
    # Group "p": responses with mean logp -1 and -3, A +1 and -1 -> cov 1.
    # Group "q": equal mean logp -2, -2 -> cov 0.  Estimate = -(1 + 0) / 2 = -0.5.
    logp = torch.tensor([[-1.0, -1.0], [-3.0, 0.0], [-2.0, -2.0], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    est, per_group = predicted_entropy_change_by_group(logp, adv, mask, ["p", "p", "q", "q"])
    torch.testing.assert_close(per_group, torch.tensor([1.0, 0.0]))
    assert est.item() == -0.5
