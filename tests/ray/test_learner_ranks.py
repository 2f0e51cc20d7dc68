"""Real DeepSpeed learner ranks as Ray actors: 2 ranks give the same update as 1 rank (fp32 tolerance),
under ZeRO-2 and ZeRO-3 (where weights are gathered collectively before they go to the generators)."""

import socket

import numpy as np
import pytest
from transformers import LlamaForCausalLM

from actors.learner import Learner, deepspeed_config
from schemas.run_config import AlgorithmConfig, LearnerConfig
from tests.helpers import loss_cfg, random_batch, tiny_model

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_with(ray, model_dir, ranks, zero_stage, loss="clip_cov", **learner):
    cfg = LearnerConfig(
        ranks=ranks, zero_stage=zero_stage, micro_batch_size=4, mini_batches=3, lr=1e-2, threads=1, **learner
    )
    algo = AlgorithmConfig(
        policy_loss=loss_cfg(loss, clip_cov_lb=-10.0, clip_cov_ub=10.0, clip_cov_ratio=0.2)
    )
    port = free_port()
    actors = [
        ray.remote(Learner)
        .options(num_cpus=0.5)
        .remote(cfg, algo, model_dir, rank=r, world_size=ranks, master_port=port, seed=3)
        for r in range(ranks)
    ]
    try:
        batch_ref = ray.put(random_batch(n=24, seed=1))
        stats = ray.get([a.train_step.remote(batch_ref, step=1) for a in actors])
        weights = ray.get([a.get_weights.remote() for a in actors])[0]
        return stats, dict(weights)
    finally:
        for a in actors:
            ray.kill(a)


@pytest.fixture(scope="module")
def one_rank(ray_cluster, model_dir):
    """The single-rank reference update, shared by both ZeRO stages."""
    return train_with(ray_cluster, model_dir, 1, 2)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one_rank(ray_cluster, model_dir, one_rank, zero_stage):
    s1, w1 = one_rank
    s2, w2 = train_with(ray_cluster, model_dir, 2, zero_stage)
    assert set(w1) == set(w2)
    moved = max(
        float(np.abs(w1[k] - LlamaForCausalLM.from_pretrained(model_dir).state_dict()[k].numpy()).max())
        for k in w1
    )
    assert moved > 1e-4, "the step must change the weights"
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=5e-5, rtol=1e-4, err_msg=k)
    # both ranks report identical step metrics (computed over the global batch)
    assert s2[0].metrics["actor/cov/selected_frac"] == pytest.approx(s2[1].metrics["actor/cov/selected_frac"])
    assert s2[0].metrics["entropy/mean"] == pytest.approx(s1[0].metrics["entropy/mean"], rel=1e-5)


def test_fused_cpu_adamw_gives_the_per_op_update(ray_cluster, model_dir):
    """learner.fused_optimizer (the default on CPU) is a faster kernel for the same AdamW update."""
    import torch

    # CPU: torch's fused kernel is asked for; GPU: DeepSpeed's own FusedAdam, no torch switch
    assert deepspeed_config(LearnerConfig())["optimizer"]["params"].get("fused", False) is (
        not torch.cuda.is_available()
    )
    assert "fused" not in deepspeed_config(LearnerConfig(fused_optimizer=False))["optimizer"]["params"]
    _, fused = train_with(ray_cluster, model_dir, 1, 2, weight_decay=0.1)
    _, per_op = train_with(ray_cluster, model_dir, 1, 2, weight_decay=0.1, fused_optimizer=False)
    start = LlamaForCausalLM.from_pretrained(model_dir).state_dict()
    assert max(float(np.abs(fused[k] - start[k].numpy()).max()) for k in fused) > 1e-4
    for k in fused:
        np.testing.assert_allclose(fused[k], per_op[k], atol=1e-6, rtol=1e-5, err_msg=k)


def test_nonfinite_loss_skips_the_update_and_keeps_weights_finite(ray_cluster, model_dir):
    """NaN in one mini-batch: DeepSpeed's overflow check skips exactly that update; the others apply."""
    clean = random_batch(n=24, seed=1)
    adv = clean.advantages.copy()
    adv[5] = np.nan
    poisoned = clean.model_copy(update={"advantages": adv})
    cfg = LearnerConfig(zero_stage=2, micro_batch_size=4, mini_batches=3, lr=1e-2, threads=1)
    actor = (
        ray_cluster.remote(Learner)
        .options(num_cpus=0.5)
        .remote(cfg, AlgorithmConfig(), model_dir, master_port=free_port())
    )
    try:
        stats = ray_cluster.get(actor.train_step.remote(poisoned, step=1))
        weights = dict(ray_cluster.get(actor.get_weights.remote()))
    finally:
        ray_cluster.kill(actor)
    assert stats.metrics["actor/skipped_updates"] == 1
    assert stats.metrics["actor/nonfinite_micro_batches"] == 1
    assert stats.metrics["actor/updates"] == 3
    assert all(np.isfinite(w).all() for w in weights.values())
    initial = LlamaForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(np.abs(weights[k] - initial[k].numpy()).max() > 1e-5 for k in weights), (
        "clean updates still apply"
    )
