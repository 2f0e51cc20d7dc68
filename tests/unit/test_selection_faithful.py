"""Clip-Cov / KL-Cov as the paper's code does them, called as one mini-batch update with the default config.

The policy here is a lookup table (next-token logits depend only on the current token, and every token id
is used once), so each response token's current log-prob is set exactly; the step-start / old log-probs
are given separately, as they are after earlier updates of a step. Expected values come from
(1) hand derivation in the comments and (2) the reference port's own functions (verl's
``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``), run on the same inputs; their outputs
are stored in tests/data/verl_reference_cases.json with the inputs.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.losses import clip_cov_candidates, get_policy_loss, get_token_selector
from pipeline.core.mini_batch import StepState, update_mini_batch
from schemas.config import policy_loss
from schemas.run_config import AlgorithmConfig, LearnerConfig
from tests.helpers import SGD, LookupPolicy, chain_case, loss_cfg

CASES = json.loads((Path(__file__).parent / "data" / "verl_reference_cases.json").read_text())["cases"]


def one_update(model, batch, old, policy_loss, learner=None):
    """``update_mini_batch`` over the whole batch as one mini-batch, after earlier updates (not ``first``):
    the step-start and PPO-old log-probs are ``old``, the model's are the current ones."""
    learner = learner or LearnerConfig()
    algo = AlgorithmConfig(policy_loss=policy_loss)
    old = np.asarray(old, np.float32)
    state = StepState(
        batch=batch,
        algo=algo,
        learner=learner,
        loss_fn=get_policy_loss(policy_loss.name),
        selector=get_token_selector(policy_loss.name),
        temperature=1.0,
        full_logits=False,
        old=old,
        step_start=old,
        advantages=np.repeat(batch.advantages, batch.response_lengths).astype(np.float32),
        valid=np.ones(old.shape[0], bool),
        is_weights=None,
        generator=torch.Generator().manual_seed(0),
    )
    trainable = SGD(model)
    update_mini_batch(trainable, state, np.arange(len(batch)), first=False)
    return state, trainable


def test_lookup_policy_has_the_requested_logprobs():
    from pipeline.core.model_forward import make_micro_batch, response_logprobs

    cur = [-0.7, -1.3, -0.2, -2.0, -0.05]
    model, batch = chain_case([3, 2], [1.0, -1.0], cur, cur)
    mb = make_micro_batch(batch, np.arange(2))
    lp, _ = response_logprobs(model, mb, with_entropy=False)
    torch.testing.assert_close(lp[mb.response_mask], torch.tensor(cur), atol=1e-6, rtol=0)


# Two rows of two response tokens. Row 0 has A = +1, row 1 has A = -1 (token-mean, PPO clip 0.2):
#   token  A   current p   old p   ratio   PPO term max(-A r, -A clip(r))
#   t0    +1   0.5         0.5     1.0     -1.0
#   t1    +1   0.25        0.5     0.5     -0.5            (A > 0 clips only above 1.2)
#   t2    -1   0.5         0.4     1.25    1.25            (A < 0 clips only below 0.8)
#   t3    -1   0.3         0.6     0.5     0.8  <- clipped (zero gradient already)
# Covariance by the current log-probs: mean A = 0, mean logp = (ln.5 + ln.25 + ln.5 + ln.3)/4 = -0.99413,
#   cov = A (logp - mean) = [0.3010, -0.3922, -0.3010, 0.2099]
# by the step-start (old) log-probs: mean = (ln.5 + ln.5 + ln.4 + ln.6)/4 = -0.70335,
#   cov = [0.0102, 0.0102, 0.2130, -0.1925]
HAND = dict(
    lengths=[2, 2],
    advantages=[1.0, -1.0],
    current=[math.log(0.5), math.log(0.25), math.log(0.5), math.log(0.3)],
    old=[math.log(0.5), math.log(0.5), math.log(0.4), math.log(0.6)],
)


@pytest.mark.parametrize("micro_batch_size", [64, 1])  # fused (one micro-batch) and the lean-pass path
def test_clip_cov_hand_derived(micro_batch_size):
    # k = max(1, int(0.25 * 4)) = 1; band 0.1 < cov < 1 by the current log-probs: t0 (0.301) and t3 (0.210),
    # but t3 is PPO-clipped, so t0 is detached: loss = (0 - 0.5 + 1.25 + 0.8) / 4 = 0.3875.
    # (Ranking by the step-start log-probs would detach t2 instead: (-1 - 0.5 + 0 + 0.8) / 4 = -0.175.)
    model, batch = chain_case(HAND["lengths"], HAND["advantages"], HAND["current"], HAND["old"])
    cfg = policy_loss(name="clip_cov", clip_cov_ratio=0.25, clip_cov_lb=0.1, clip_cov_ub=1.0)
    state, _ = one_update(model, batch, HAND["old"], cfg, LearnerConfig(micro_batch_size=micro_batch_size))
    assert state.loss_sum == pytest.approx(0.3875, abs=1e-6)
    assert state.acc.sums["cov/selected_frac"] / state.acc.weight == pytest.approx(0.25)


@pytest.mark.parametrize("micro_batch_size", [64, 1])
def test_kl_cov_hand_derived(micro_batch_size):
    # No clipping: sum of -A r = -1 - 0.5 + 1.25 + 0.5 = 0.25. k = int(0.5 * 4) = 2 top tokens by the current
    # covariance: t0 (0.301, |logp - old| = 0) and t3 (0.210, |ln.3 - ln.6| = ln 2), beta = 1:
    # loss = (0.25 + ln 2) / 4 = 0.235789.
    # (Ranking by the step-start log-probs would penalise t2 (0.213, |ln.5 - ln.4| = 0.2231) instead of t3.)
    model, batch = chain_case(HAND["lengths"], HAND["advantages"], HAND["current"], HAND["old"])
    cfg = policy_loss(name="kl_cov", kl_cov_ratio=0.5, kl_cov_beta=1.0)
    state, _ = one_update(model, batch, HAND["old"], cfg, LearnerConfig(micro_batch_size=micro_batch_size))
    assert state.loss_sum == pytest.approx((0.25 + math.log(2)) / 4, abs=1e-6)


@pytest.mark.parametrize("micro_batch_size", [64, 2])
@pytest.mark.parametrize("case", CASES, ids=[f"{c['loss']}-{c['mode']}" for c in CASES])
def test_default_update_matches_the_reference_port(case, micro_batch_size):
    """The default config reproduces the reference port's loss on cases where ranking by the step-start
    log-probs would select other tokens (``step_start_ranking_differs``)."""
    assert case["step_start_ranking_differs"]
    lengths, pl = case["lengths"], case["policy_loss"]
    fields = {"clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio"}
    cfg = policy_loss(
        name=case["loss"],
        loss_agg_mode=case["mode"],
        seq_norm_length=max(lengths),
        **{k: v for k, v in pl.items() if k in fields},
        **({"kl_cov_beta": pl["beta"]} if "beta" in pl else {}),
    )
    model, batch = chain_case(lengths, case["advantages"], case["current_logprobs"], case["old_logprobs"])
    state, _ = one_update(
        model, batch, case["old_logprobs"], cfg, LearnerConfig(micro_batch_size=micro_batch_size)
    )
    want = case["verl_loss"]
    if case["mode"] == "seq-mean-token-sum-norm":
        # documented deviation (pipeline/core/losses.py): covrl divides by n_seqs * L, the port by L only
        want /= len(lengths)
    assert state.loss_sum == pytest.approx(want, abs=2e-6)


def _clipped_and_selected(selection, micro_batch_size):
    """A case where the current ratio clips many band tokens; returns (selected, clipped) flat masks."""
    rng = np.random.default_rng(5)
    lengths = [6, 5, 6, 4, 6, 5]
    n = sum(lengths)
    old = rng.uniform(-2.5, -0.1, n)
    cur = np.minimum(old + rng.uniform(-0.6, 0.6, n), -0.02)
    adv = [1.0, -1.0, 0.7, -0.7, 1.3, -1.3]
    model, batch = chain_case(lengths, adv, cur.tolist(), old.tolist())
    cfg = policy_loss(name="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-100.0, clip_cov_ub=100.0)
    learner = LearnerConfig(micro_batch_size=micro_batch_size, selection_logprobs=selection)
    captured = {}
    selector = get_token_selector("clip_cov")

    def spy(*args, **kwargs):
        captured["sel"] = selector.select(*args, **kwargs)
        return captured["sel"]

    state, _ = one_update(model, batch, old.tolist(), cfg, learner)
    state.selector = type(selector)(spy, selector.needs_current_ratio)
    update_mini_batch(SGD(model), state, np.arange(len(batch)), first=False)
    a = torch.from_numpy(np.repeat(np.asarray(adv, np.float32), lengths))
    cand = clip_cov_candidates(
        torch.from_numpy(cur).float(), torch.from_numpy(old).float(), a, torch.ones(n, dtype=torch.bool), cfg
    )
    return captured["sel"], ~cand, int(0.2 * n)


@pytest.mark.parametrize("micro_batch_size", [64, 2])
@pytest.mark.parametrize("selection", ["current", "step_start"])
def test_clip_cov_never_spends_its_budget_on_clipped_tokens(selection, micro_batch_size):
    selected, clipped, k = _clipped_and_selected(selection, micro_batch_size)
    assert int(clipped.sum()) >= 5, "the case must clip a good share of the tokens"
    assert int(selected.sum()) == k  # the whole budget is spent ...
    assert not bool((selected & clipped).any())  # ... on tokens whose gradient is not already 0


class CountingPolicy(LookupPolicy):
    def __init__(self, vocab):
        super().__init__(vocab)
        self.calls = {"grad": 0, "no_grad": 0}
        inner = self.base_model.forward

        def counted(*a, **kw):
            self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
            return inner(*a, **kw)

        self.base_model.forward = counted


@pytest.mark.parametrize(
    ("loss", "selection", "micro", "extra_passes"),
    [
        ("clip_cov", "current", 64, 0),  # fused: selection from the loss forward itself
        ("kl_cov", "current", 64, 0),
        ("clip_cov", "step_start", 64, 0),
        ("clip_cov", "current", 2, 2),  # 3 micro-batches of 2: the first from its loss forward, 2 lean
        ("clip_cov", "step_start", 2, 2),  # Clip-Cov still needs the current ratio
        ("kl_cov", "step_start", 2, 0),  # ranks by the step-start log-probs: no pass
        ("ppo", "current", 2, 0),
    ],
)
def test_extra_forward_passes(loss, selection, micro, extra_passes):
    lengths = [3, 2, 3, 2, 3, 2]
    cur = [-0.5] * sum(lengths)
    model, batch = chain_case(lengths, [1, -1, 1, -1, 1, -1], cur, cur)
    counting = CountingPolicy(model.head.weight.shape[0])
    counting.load_state_dict(model.state_dict())
    cfg = loss_cfg(loss, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    one_update(counting, batch, cur, cfg, LearnerConfig(micro_batch_size=micro, selection_logprobs=selection))
    assert counting.calls["no_grad"] == extra_passes
    assert counting.calls["grad"] == -(-len(lengths) // micro)
