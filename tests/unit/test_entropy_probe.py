"""The SGD entropy probe: measures the exact entropy change of one plain SGD step, leaves the run alone."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.core.entropy_dynamics import (
    entropy_from_logits,
    exact_entropy_change,
    first_order_entropy_change,
    tabular_pg_entropy_change,
)
from pipeline.core.entropy_probe import lr_key, sgd_entropy_probe
from pipeline.core.ppo_update import ppo_update
from schemas.run_config import AlgorithmConfig, LearnerConfig
from tests.helpers import SGDTrainable, chain_case, random_batch, tiny_model


def test_probe_leaves_weights_and_update_unchanged():
    batch = random_batch(n=16, seed=2)
    plain, probed = tiny_model(), tiny_model()
    before = [p.detach().clone() for p in probed.parameters()]
    m = sgd_entropy_probe(probed, batch, lrs=[0.5, 5.0], temperature=1.0, micro_batch_size=5)
    for p, q in zip(probed.parameters(), before):
        assert torch.equal(p, q)
    assert m[lr_key(0.5)] != 0.0 and m[lr_key(5.0)] != m[lr_key(0.5)]
    assert probed.training  # mode restored

    kw = dict(algo=AlgorithmConfig(), learner=LearnerConfig(mini_batches=2), temperature=1.0, seed=3)
    a = ppo_update(SGDTrainable(plain), batch, **kw)
    b = ppo_update(SGDTrainable(probed), batch, **kw, entropy_probe_lrs=[0.5])
    for p, q in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(p, q)
    assert lr_key(0.5) in b.metrics and lr_key(0.5) not in a.metrics
    assert b.metrics["actor/loss"] == a.metrics["actor/loss"]


def test_probe_measures_the_exact_change_and_matches_first_order_for_small_steps():
    """On a lookup-table policy every response position is its own state with logits z_s, so the SGD step
    on -sum_t A_t log pi_t / n moves exactly dz_s = lr * A_t / n * (onehot(y_t) - pi_s): the probe's measured
    change must equal the exact entropy change of those logits, and the law's first-order prediction for
    a small lr."""
    rng = np.random.default_rng(0)
    lengths = [3, 4, 2, 3]
    cur = rng.uniform(-2.0, -0.2, sum(lengths)).tolist()
    adv = [1.0, -0.5, 0.8, -1.3]
    model, batch = chain_case(lengths, adv, cur, cur)
    n = sum(lengths)
    # logits of each predicting state (column j of the head), before and after a step of size lr
    states, labels, a_tok = [], [], []
    start = 0
    for length, a in zip(lengths, adv):
        for j in range(start, start + length):
            states.append(j)
            labels.append(j + 1)
            a_tok.append(a)
        start += length + 1
    z0 = model.head.weight.detach()[:, states].T.double()  # (n, V)
    pi = torch.softmax(z0, -1)
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), z0.shape[1]).double()
    direction = torch.tensor(a_tok, dtype=torch.float64)[:, None] / n * (onehot - pi)
    for lr in (0.05, 5.0):
        m = sgd_entropy_probe(model, batch, lrs=[lr], temperature=1.0, micro_batch_size=64)
        exact = exact_entropy_change(z0, z0 + lr * direction).mean().item()
        assert m[lr_key(lr)] == pytest.approx(exact, rel=5e-3)
    small = first_order_entropy_change(z0, z0 + 0.05 * direction).mean().item()
    m = sgd_entropy_probe(model, batch, lrs=[0.05], temperature=1.0, micro_batch_size=64)
    assert m[lr_key(0.05)] == pytest.approx(small, rel=5e-2)


def test_tabular_change_is_the_derivative_of_the_entropy_along_the_pg_logit_step():
    """At temperature T the step on -A log pi(y) moves the raw logits by A (onehot(y) - pi) / T; the function's
    value is d/d(eps) H(softmax((z + eps * dz) / T)) at eps = 0, checked by central differences in fp64."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 9, (6,), generator=gen)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    for temp in (1.0, 0.7):
        pi = torch.softmax(z / temp, -1)
        dz = adv[:, None] * (torch.nn.functional.one_hot(labels, 9).double() - pi) / temp
        eps = 1e-5
        numeric = (
            entropy_from_logits((z + eps * dz) / temp) - entropy_from_logits((z - eps * dz) / temp)
        ) / (2 * eps)
        got = tabular_pg_entropy_change(z, labels, adv, temp)
        assert torch.allclose(got, numeric, rtol=1e-6, atol=1e-9)
        if temp == 1.0:  # the lemma's covariance form gives the same first-order term
            assert torch.allclose(got, first_order_entropy_change(z, z + dz), rtol=1e-9)


def test_linear_and_tabular_terms_split_the_gap_to_the_law():
    """On a lookup-table policy (every position its own state, the logits are the parameters) the network's
    first-order term is the tabular one; on a transformer, parameter sharing makes them differ, while the
    measured change per unit lr still tends to the network's own first-order term as lr -> 0."""
    rng = np.random.default_rng(1)
    lengths = [3, 4, 2, 3]
    cur = rng.uniform(-2.0, -0.2, sum(lengths)).tolist()
    model, batch = chain_case(lengths, [1.0, -0.5, 0.8, -1.3], cur, cur)
    m = sgd_entropy_probe(model, batch, lrs=[1e-2], temperature=1.0, micro_batch_size=3)
    assert m["probe/dH_linear"] == pytest.approx(m["probe/dH_tabular"], rel=1e-5)
    assert m[lr_key(1e-2)] / 1e-2 == pytest.approx(m["probe/dH_linear"], rel=2e-2)

    net, batch = tiny_model(seed=1), random_batch(n=16, seed=5)
    m = sgd_entropy_probe(net, batch, lrs=[1e-3, 1e-1], temperature=1.0, micro_batch_size=5)
    lin, tab = m["probe/dH_linear"], m["probe/dH_tabular"]
    # (much below lr 1e-3 the fp32 entropies of this model cannot resolve the change)
    assert m[lr_key(1e-3)] / 1e-3 == pytest.approx(lin, rel=5e-2)
    assert abs(m[lr_key(1e-1)] / 1e-1 - lin) > 5 * abs(m[lr_key(1e-3)] / 1e-3 - lin)  # curvature at large lr
    assert abs(tab - lin) > 0.1 * abs(lin)
    # the probe's micro-batching does not change the terms
    again = sgd_entropy_probe(net, batch, lrs=[1e-3], temperature=1.0, micro_batch_size=16)
    assert again["probe/dH_linear"] == pytest.approx(lin, rel=1e-4)
    assert again["probe/dH_tabular"] == pytest.approx(tab, rel=1e-4)


def test_probe_config():
    assert LearnerConfig().entropy_probe.every == 0  # off by default
    with pytest.raises(ValidationError, match="entropy_probe"):
        LearnerConfig(zero_stage=3, entropy_probe={"every": 5})
    with pytest.raises(ValidationError, match="lrs"):
        LearnerConfig(entropy_probe={"every": 5, "lrs": [1e-3, -1.0]})
