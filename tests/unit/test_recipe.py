"""Recipe pieces (pipeline/core/recipe.py): dynamic sampling, overlong handling, truncated IS correction.

Expected values are computed by hand in the comments; the loop is driven by a fake sampler.
"""

import math

import numpy as np
import pytest
import torch

from pipeline.core.aggregation import aggregate_loss
from pipeline.core.losses import get_policy_loss
from pipeline.core.ppo_update import ppo_update
from pipeline.core.recipe import (
    fill_informative,
    groups_unit,
    handle_overlong,
    informative_groups,
    next_round_prompts,
    soft_overlong_penalty,
    take_rollout_groups,
    truncated_is_weights,
)
from schemas.batches import (
    FINISH_LENGTH,
    FINISH_STOP,
    PromptBatch,
    Ragged,
    RolloutBatch,
    ScoredBatch,
)
from schemas.config import policy_loss
from schemas.run_config import AlgorithmConfig, ISCorrectionConfig, LearnerConfig, RunConfig
from tests.helpers import loss_cfg, synthetic_train_batch, take_rows, tiny_model

# ------------------------------------------------------------------------------ fakes


def scored_batch(prompt_ids, rewards, g):
    """B prompts with ids ``prompt_ids``; response row i has i % 3 + 1 tokens, all equal to 100 + i,
    sampler log-probs -(100 + i), texts 'r<id>.<sample>'."""
    b = len(prompt_ids)
    n = b * g
    prompts = PromptBatch(
        step=1,
        prompt_ids=np.asarray(prompt_ids, dtype=np.int64),
        tokens=Ragged.from_lists([[1, int(p)] for p in prompt_ids]),
        texts=[f"p{p}" for p in prompt_ids],
        ground_truths=[str(p) for p in prompt_ids],
        data_sources=["a"] * b,
    )
    resp = Ragged.from_lists([[100 + i] * (i % 3 + 1) for i in range(n)])
    rollout = RolloutBatch(
        prompts=prompts,
        group_size=g,
        policy_version=0,
        responses=resp,
        sampler_logprobs=-resp.values.astype(np.float32),
        finish_reasons=(np.arange(n) % 2).astype(np.int8),
        response_texts=[f"r{p}.{s}" for p in prompt_ids for s in range(g)],
    )
    return ScoredBatch(rollout=rollout, rewards=np.asarray(rewards, np.float32), reasons=[None] * n)


class FakeSampler:
    """Serves prompts with consecutive ids; group rewards come from a script of per-group patterns."""

    def __init__(self, patterns, g):
        self.patterns, self.g, self.next_id, self.calls = list(patterns), g, 0, []

    def __call__(self, k):
        self.calls.append(k)
        ids = list(range(self.next_id, self.next_id + k))
        self.next_id += k
        rewards = [r for _ in ids for r in self.patterns.pop(0)]
        return scored_batch(ids, rewards, self.g)


MIXED, SOLVED, ZERO = (1.0, 0.0), (1.0, 1.0), (0.0, 0.0)


# ------------------------------------------------------------------------------ dynamic sampling


def test_informative_groups_are_the_ones_with_unequal_rewards():
    rewards = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0.5, 0.5, 0.2, 0.7], np.float32)
    assert informative_groups(rewards, 3).tolist() == [False, True, True, True]
    assert informative_groups(rewards, 2).tolist() == [False, True, True, False, False, True]


def test_take_rollout_groups_keeps_whole_groups_in_order():
    s = scored_batch([10, 11, 12], [0] * 6, g=2)
    sub = take_rollout_groups(s.rollout, np.array([2, 0]))
    # groups 2 and 0 -> rows 4, 5, 0, 1 (lengths 2, 3, 1, 2)
    assert sub.prompts.prompt_ids.tolist() == [12, 10]
    assert sub.responses.tolist() == [[104, 104], [105, 105, 105], [100], [101, 101]]
    assert sub.sampler_logprobs.tolist() == [-104, -104, -105, -105, -105, -100, -101, -101]
    assert sub.finish_reasons.tolist() == [0, 1, 0, 1]
    assert sub.response_texts == ["r12.0", "r12.1", "r10.0", "r10.1"]
    same = take_rollout_groups(s.rollout, np.array([True, False, True]))
    assert same.prompts.prompt_ids.tolist() == [10, 12]


def test_fill_keeps_exactly_the_informative_groups_and_refills_to_size():
    # need 4. Round 1 (4 prompts, ids 0-3): mixed, solved, zero, mixed -> keep 0, 3.
    # Round 2: missing 2, informative rate 2/4 -> ceil(2 / 0.5 * 1.25) = 5, capped at need = 4 (ids 4-7):
    # solved, mixed, mixed, mixed -> keep 5, 6 (7 is surplus).
    fake = FakeSampler([MIXED, SOLVED, ZERO, MIXED, SOLVED, MIXED, MIXED, MIXED], g=2)
    out = fill_informative(fake, 4, max_rounds=3, divisor=4)
    assert fake.calls == [4, 4]
    assert out.scored.rollout.prompts.prompt_ids.tolist() == [0, 3, 5, 6]
    assert out.scored.rewards.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert out.scored.rollout.response_texts == [
        "r0.0",
        "r0.1",
        "r3.0",
        "r3.1",
        "r5.0",
        "r5.1",
        "r6.0",
        "r6.1",
    ]
    assert out.prompt_ids == list(range(8))
    assert out.sampled_rewards.shape == (16,)
    assert out.metrics == {
        "sampling/rounds": 2.0,
        "sampling/kept_groups": 4.0,
        "sampling/filtered_frac": 3 / 8,  # groups 1, 2, 4 of 8
        "sampling/sampled_groups": 8.0,
        "sampling/surplus_groups": 1.0,
        "sampling/trimmed_groups": 0.0,
        "sampling/fallback_unfiltered": 0.0,
    }


def test_fill_stops_at_the_round_cap_and_trims_to_a_learner_split():
    # need 4, G 2, divisor 4 -> whole units of 2 groups. Round 1: 2 informative (ids 0, 1);
    # round 2 (4 prompts): 1 informative (id 5) -> 3 kept, cap hit -> trimmed to 2 groups.
    fake = FakeSampler([MIXED, MIXED, ZERO, ZERO, ZERO, MIXED, SOLVED, SOLVED], g=2)
    out = fill_informative(fake, 4, max_rounds=2, divisor=4)
    assert groups_unit(2, 4) == 2
    assert out.scored.rollout.prompts.prompt_ids.tolist() == [0, 1]
    assert len(out.scored.rollout) % 4 == 0  # 2 groups x 2 samples
    m = out.metrics
    assert (m["sampling/rounds"], m["sampling/kept_groups"], m["sampling/trimmed_groups"]) == (2.0, 2.0, 1.0)
    assert m["sampling/filtered_frac"] == pytest.approx(5 / 8)
    assert m["sampling/fallback_unfiltered"] == 0.0


def test_fill_falls_back_to_the_first_round_when_nothing_usable():
    # divisor 8, G 2 -> units of 4 groups; only 1 informative group in 1 round -> unfiltered round 1.
    fake = FakeSampler([ZERO, MIXED, SOLVED, ZERO], g=2)
    out = fill_informative(fake, 4, max_rounds=1, divisor=8)
    assert fake.calls == [4]
    assert out.scored.rollout.prompts.prompt_ids.tolist() == [0, 1, 2, 3]
    assert out.metrics["sampling/fallback_unfiltered"] == 1.0
    assert out.metrics["sampling/kept_groups"] == 4.0
    assert out.metrics["sampling/filtered_frac"] == 0.75


def test_next_round_size():
    assert next_round_prompts(missing=3, informative=0, sampled=8, need=8) == 8  # nothing seen: a full round
    assert next_round_prompts(missing=2, informative=4, sampled=8, need=8) == 5  # ceil(2 * 2 * 1.25)
    assert next_round_prompts(missing=1, informative=8, sampled=8, need=8) == 2  # ceil(1.25)
    assert next_round_prompts(missing=7, informative=1, sampled=8, need=8) == 8  # capped at need


# ------------------------------------------------------------------------------ overlong


def test_soft_overlong_penalty_at_the_buffer_edges():
    # max 100, buffer 20, penalty 0.5: 0 up to 80 tokens, then -0.5 * (len - 80) / 20, -0.5 at 100.
    lengths = np.array([0, 79, 80, 81, 90, 99, 100, 120])
    got = soft_overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=20, penalty=0.5)
    want = [0, 0, 0, -0.025, -0.25, -0.475, -0.5, -0.5]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert got.dtype == np.float32
    # buffer == max: the ramp starts at length 0
    np.testing.assert_allclose(soft_overlong_penalty(np.array([0, 5, 10]), 10, 10, 1.0), [0, -0.5, -1.0])
    with pytest.raises(ValueError):
        soft_overlong_penalty(lengths, 100, 101, 1.0)


def test_handle_overlong_modes():
    rewards = np.array([1, 0, 1, 1], np.float32)
    lengths = np.array([3, 10, 9, 10])
    fin = np.array([FINISH_STOP, FINISH_LENGTH, FINISH_STOP, FINISH_LENGTH], np.int8)
    kw = dict(max_new_tokens=10, buffer_tokens=4, penalty=1.0)
    none = handle_overlong(rewards, lengths, fin, mode="none", **kw)
    assert none.loss_mask is None and none.metrics == {} and none.rewards.tolist() == [1, 0, 1, 1]
    mask = handle_overlong(rewards, lengths, fin, mode="mask", **kw)
    assert mask.loss_mask.tolist() == [1, 0, 1, 0] and mask.loss_mask.dtype == np.float32
    assert mask.rewards.tolist() == [1, 0, 1, 1] and mask.metrics == {"overlong/masked_frac": 0.5}
    soft = handle_overlong(rewards, lengths, fin, mode="soft_penalty", **kw)
    # ramp from 6 tokens: 3 -> 0, 10 -> -1, 9 -> -0.75
    np.testing.assert_allclose(soft.rewards, [1, -1, 0.25, 0])
    assert soft.loss_mask is None
    assert soft.metrics["overlong/penalty_mean"] == pytest.approx(-2.75 / 4)


@pytest.mark.parametrize("loss_name", ["ppo", "clip_cov", "kl_cov"])
def test_masked_overlong_rows_get_no_gradient(loss_name):
    torch.manual_seed(0)
    n, t = 4, 5
    logp = (torch.randn(n, t) * 0.3 - 1).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(n, t)
    adv = torch.tensor([1.5, -2.0, 0.7, -0.3])[:, None].expand(n, t).clone()
    resp = torch.ones(n, t, dtype=torch.bool)
    resp[2, 3:] = False
    loss_mask = torch.tensor([1.0, 0.0, 1.0, 0.0])  # rows 1 and 3 truncated
    mask = resp & (loss_mask[:, None] > 0)  # as ppo_update builds it
    cfg = loss_cfg(loss_name, clip_cov_lb=-10.0, clip_cov_ub=10.0, clip_cov_ratio=0.5, kl_cov_ratio=0.5)
    w = torch.full((n, t), 1.5)
    loss, _ = get_policy_loss(loss_name)(
        logp,
        old,
        adv * resp,
        mask,
        cfg,
        normalizer=float(mask.sum()),
        generator=torch.Generator().manual_seed(0),
        token_weights=w,
    )
    loss.backward()
    assert (logp.grad[1] == 0).all() and (logp.grad[3] == 0).all()
    assert (logp.grad[0] != 0).any() and (logp.grad[2] != 0).any()


# ------------------------------------------------------------------------------ IS correction


def test_truncated_is_weights_values_and_stats():
    old = np.array([-1.0, -2.0, -0.5, -3.0], np.float32)
    sampler = np.array([-1.0, -1.0, -2.0, -3.5], np.float32)
    # ratios: 1, e^-1 = 0.3679, e^1.5 = 4.48 -> 2 (clipped), e^0.5 = 1.6487
    w, stats = truncated_is_weights(old, sampler, cap=2.0)
    np.testing.assert_allclose(w, [1.0, math.exp(-1), 2.0, math.exp(0.5)], rtol=1e-6)
    assert stats["mismatch/is_clipped_frac"] == 0.25
    assert stats["mismatch/is_weight_mean"] == pytest.approx(
        (1 + math.exp(-1) + 2 + math.exp(0.5)) / 4, rel=1e-6
    )
    # only valid tokens count in the stats
    _, s2 = truncated_is_weights(old, sampler, cap=2.0, valid=np.array([True, True, False, False]))
    assert s2["mismatch/is_clipped_frac"] == 0.0
    assert s2["mismatch/is_weight_mean"] == pytest.approx((1 + math.exp(-1)) / 2, rel=1e-6)


def test_token_weights_scale_each_tokens_gradient():
    # On-policy PPO (ratio 1, nothing clipped): d loss / d logp_i = -A_i * w_i / n_tokens.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = torch.tensor([[1.0, 0.5, 2.0], [0.25, 1.0, 7.0]])
    loss, _ = get_policy_loss("ppo")(logp, logp.detach(), adv, mask, policy_loss(), token_weights=w)
    loss.backward()
    want = torch.tensor([[-2 * 1.0, -2 * 0.5, -2 * 2.0], [0.25, 1.0, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, want)
    assert loss.item() == pytest.approx((-2 * 3.5 + 1.25) / 5)
    # aggregate_loss: weights are constants and do not change denominators
    lm = torch.ones(2, 3)
    assert aggregate_loss(lm, mask, "token-mean", token_weights=w).item() == pytest.approx((3.5 + 1.25) / 5)
    assert aggregate_loss(lm, mask, "seq-mean-token-mean", token_weights=w).item() == pytest.approx(
        (3.5 / 3 + 1.25 / 2) / 2
    )


# ------------------------------------------------------------------------------ through ppo_update


def small_batch(n=8, seed=0, loss_mask=None):
    return synthetic_train_batch(
        n, seed=seed, prompt_len=(2, 4), response_len=(2, 6), group_size=2, adv_scale=3.0, loss_mask=loss_mask
    )


class SGD:
    def __init__(self, model):
        self.module, self.opt = model, torch.optim.SGD(model.parameters(), lr=0.5)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def _update(batch, algo):
    model = tiny_model()
    metrics = ppo_update(
        SGD(model),
        batch,
        algo=algo,
        learner=LearnerConfig(mini_batches=1, micro_batch_size=3),
        temperature=1.0,
        seed=3,
    ).metrics
    return model, metrics


def test_loss_masked_rows_change_nothing_in_ppo_update():
    """One mini-batch: masking rows (loss_mask 0) gives exactly the update of the batch without them
    (masked rows carry no gradient and count in no denominator)."""
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32)
    algo = AlgorithmConfig()
    masked, m = _update(small_batch(loss_mask=mask), algo)
    subset, _ = _update(take_rows(small_batch(), np.flatnonzero(mask)), algo)
    for a, b in zip(masked.parameters(), subset.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert {"mismatch/is_weight_mean", "mismatch/is_clipped_frac"} <= set(m)


def test_is_correction_reweights_the_update():
    """Sampler log-probs far below the learner's -> every weight is capped at C, so the update equals
    the uncorrected one with advantages scaled by C (SGD is linear in the gradient)."""
    algo_is = AlgorithmConfig(is_correction=ISCorrectionConfig(enabled=True, cap=1.5))
    batch = small_batch()
    low = batch.model_copy(update={"sampler_logprobs": np.full_like(batch.sampler_logprobs, -50.0)})
    corrected, m = _update(low, algo_is)
    assert m["mismatch/is_clipped_frac"] == 1.0 and m["mismatch/is_weight_mean"] == pytest.approx(1.5)
    scaled, _ = _update(batch.model_copy(update={"advantages": batch.advantages * 1.5}), AlgorithmConfig())
    for a, b in zip(corrected.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ config


def test_recipe_config_fields():
    cfg = RunConfig()
    a = cfg.algorithm
    assert (a.dynamic_sampling.enabled, a.dynamic_sampling.max_rounds) == (False, 3)
    assert (a.is_correction.enabled, a.is_correction.cap) == (False, 2.0)
    assert a.overlong.mode == "none"
    ok = RunConfig.model_validate(
        {
            "generator": {"max_new_tokens": 64},
            "algorithm": {"overlong": {"mode": "soft_penalty", "buffer_tokens": 16}},
        }
    )
    assert ok.algorithm.overlong.buffer_tokens == 16
    with pytest.raises(ValueError, match="buffer_tokens"):
        RunConfig.model_validate(
            {
                "generator": {"max_new_tokens": 64},
                "algorithm": {"overlong": {"mode": "soft_penalty", "buffer_tokens": 65}},
            }
        )
    with pytest.raises(ValueError):
        RunConfig.model_validate({"algorithm": {"dynamic_sampling": {"max_rounds": 0}}})


# ------------------------------------------------------------------------------ the driver's use


def test_driver_collect_runs_dynamic_sampling_through_the_roles(monkeypatch):
    """Trainer.collect with fake roles: prompts come from the stream round after round, the kept groups
    are the informative ones, reward/* describe every sampled group."""
    from pipeline.driver import trainer as driver
    from pipeline.driver.roles import Roles
    from pipeline.driver.rollout import DataSource

    g, need = 2, 4
    # prompt id -> group rewards; ids 0-3 in round 1, then 4-7 (groups 1, 2, 5 filtered; 7 surplus)
    script = {0: MIXED, 1: SOLVED, 2: ZERO, 3: MIXED, 4: MIXED, 5: ZERO, 6: MIXED, 7: MIXED}

    class Stream:
        pos = 0

        def next_batch(self, k):
            rows = [
                {"prompt": f"q{i}", "index": i, "ground_truth": "1"} for i in range(self.pos, self.pos + k)
            ]
            self.pos += k
            return rows

    class Tok:
        bos_token = None

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[1, 2] for _ in texts]}

    cfg = RunConfig.model_validate(
        {
            "schedule": {"prompts_per_step": need, "group_size": g},
            "learner": {"mini_batches": 2},
            "algorithm": {"dynamic_sampling": {"enabled": True, "max_rounds": 3}},
        }
    )
    t = object.__new__(driver.Trainer)
    t.cfg, t.data, t._pending = cfg, DataSource(stream=Stream(), eval_rows=[], tokenizer=Tok()), None
    t.roles = Roles()

    def generate(generators, prompts, n):
        ids = prompts.prompt_ids.tolist()
        s = scored_batch(ids, [0.0] * (len(ids) * n), n)
        return s.rollout, {"time/generate": 2.0, "throughput/generate_tokens_per_s": 5.0}

    def score(verifiers, rollout):
        rewards = [r for i in rollout.prompts.prompt_ids.tolist() for r in script[i]]
        stats = {"verifier/count": float(len(rewards)), "time/verify": 1.0}
        return ScoredBatch(
            rollout=rollout,
            rewards=np.array(rewards, np.float32),
            reasons=[None] * len(rewards),
            verifier_stats=stats,
        )

    monkeypatch.setattr(driver.generation, "generate", generate)
    monkeypatch.setattr(driver, "score_rollout", score)
    scored, gen_stats, prompt_ids, m = t.collect(step=1)
    assert scored.rollout.prompts.prompt_ids.tolist() == [0, 3, 4, 6]
    assert prompt_ids == list(range(8))
    assert gen_stats == {"time/generate": 4.0, "throughput/generate_tokens_per_s": 5.0}
    assert scored.verifier_stats == {"verifier/count": 16.0, "time/verify": 2.0}
    assert (
        m["sampling/rounds"] == 2 and m["sampling/kept_groups"] == 4 and m["sampling/filtered_frac"] == 3 / 8
    )
    assert m["reward/mean"] == pytest.approx(7 / 16) and m["reward/solved_groups_frac"] == 1 / 8
    assert m["reward/zero_groups_frac"] == 2 / 8 and m["reward/kept_mean"] == 0.5
