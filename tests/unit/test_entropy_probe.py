"""The SGD entropy probe: measures the exact entropy change of one plain SGD step, leaves the run alone."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.core.entropy_dynamics import exact_entropy_change, first_order_entropy_change
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


def test_probe_config():
    assert LearnerConfig().entropy_probe.every == 0  # off by default
    with pytest.raises(ValidationError, match="entropy_probe"):
        LearnerConfig(zero_stage=3, entropy_probe={"every": 5})
    with pytest.raises(ValidationError, match="lrs"):
        LearnerConfig(entropy_probe={"every": 5, "lrs": [1e-3, -1.0]})
