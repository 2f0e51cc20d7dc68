"""Outcome advantages: hand-computed values, degenerate groups, (N,)+ids == (B, G)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.advantages import (
    broadcast_to_tokens,
    compute_advantages,
    get_advantage,
    grpo_advantage,
    reinforce_pp_advantage,
    rloo_advantage,
)


def test_grpo_hand_computed():
    # Group [1, 1, 0, 0]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3)
    # -> GRPO +-0.5 / 0.57735 = +-0.8660; Dr.GRPO (no std) +-0.5.
    s = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    h = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(grpo_advantage(s, eps=0.0), torch.tensor([[h, h, -h, -h]]))
    torch.testing.assert_close(grpo_advantage(s, norm_by_std=False), torch.tensor([[0.5, 0.5, -0.5, -0.5]]))


def test_rloo_hand_computed():
    # [1, 1, 0, 0]: 1 - mean(1, 0, 0) = 2/3; 0 - mean(1, 1, 0) = -2/3.
    s = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rloo_advantage(s), torch.tensor([[2 / 3, 2 / 3, -2 / 3, -2 / 3]]))


def test_reinforce_pp_hand_computed():
    # [0, 1, 2]: mean 1, unbiased var 1 -> [-1, 0, 1] (up to the 1e-8 in the rsqrt).
    torch.testing.assert_close(
        reinforce_pp_advantage(torch.tensor([0.0, 1.0, 2.0])), torch.tensor([-1.0, 0.0, 1.0])
    )
    # Token weighting: lengths [3, 1] on scores [0, 4]: weighted mean 1, var (3*1 + 9) / (4 - 1) = 4
    # -> [(0 - 1) / 2, (4 - 1) / 2] = [-0.5, 1.5].
    out = reinforce_pp_advantage(torch.tensor([0.0, 4.0]), lengths=[3, 1])
    torch.testing.assert_close(out, torch.tensor([-0.5, 1.5]))


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp"])
def test_equal_groups_and_singletons_give_zero(name):
    s = torch.tensor([1.0, 1.0, 1.0, 0.0, 3.0])
    ids = ["a", "a", "a", "b", "c"]  # one all-equal group, two groups of size 1
    fn = get_advantage(name)
    out = fn(s[:3], ids[:3]) if name == "reinforce_pp" else fn(s, ids)
    assert torch.isfinite(out).all()
    assert out.abs().max().item() == 0.0
    assert fn(torch.ones(4, 8), None).abs().max().item() == 0.0


def test_ids_and_2d_agree_and_order_is_free():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 3, (3, 4), generator=g).float()
    ids = np.repeat([10, 20, 30], 4)
    perm = torch.randperm(12, generator=g)
    for name in ("grpo", "rloo"):
        a2 = compute_advantages(name, s)
        a1 = compute_advantages(name, s.reshape(-1)[perm], ids[perm.numpy()])
        torch.testing.assert_close(a1, a2.reshape(-1)[perm])


@settings(max_examples=40, deadline=None)
@given(scores=st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=24), data=st.data())
def test_grpo_rloo_finite_and_zero_sum_per_group(scores, data):
    ids = data.draw(st.lists(st.integers(0, 3), min_size=len(scores), max_size=len(scores)))
    s = torch.tensor(scores)
    for fn in (grpo_advantage, rloo_advantage):
        adv = fn(s, ids)
        assert torch.isfinite(adv).all()
        for gid in set(ids):
            sel = torch.tensor([i == gid for i in ids])
            assert abs(adv[sel].sum().item()) < 1e-4


def test_broadcast_and_errors():
    out = broadcast_to_tokens(torch.tensor([0.5, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="prompt_index"):
        grpo_advantage(torch.zeros(4))
    with pytest.raises(ValueError, match="unknown advantage"):
        get_advantage("ppo")


def test_advantages_from_config_passes_the_configured_settings():
    from pipeline.core.advantages import advantages_from_config
    from schemas.run_config import AdvantageConfig

    s, ids = torch.tensor([1.0, 0.0, 1.0, 1.0]), np.array([0, 0, 1, 1])
    dr_grpo = advantages_from_config(AdvantageConfig(name="grpo", norm_by_std=False), s, ids)
    torch.testing.assert_close(dr_grpo, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    torch.testing.assert_close(
        advantages_from_config(AdvantageConfig(name="rloo"), s, ids), compute_advantages("rloo", s, ids)
    )
