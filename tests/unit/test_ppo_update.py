"""The learner's update is split-invariant: micro-batch size and data-parallel width do not change it.

Uses a tiny Llama built from a config and a plain torch optimizer (the real DeepSpeed path is tested
end to end in test_pipeline_e2e.py); "ranks" here are threads that average gradients, as DeepSpeed does.
"""

import threading

import numpy as np
import pytest
import torch

from pipeline.core.model_forward import make_micro_batch, micro_batches, response_logprobs
from pipeline.core.ppo_update import ppo_update
from schemas.run_config import AlgorithmConfig, LearnerConfig
from tests.helpers import SGDTrainable, loss_cfg, random_batch, synthetic_train_batch, tiny_model


def test_response_logprobs_match_naive_forward():
    model = tiny_model()
    batch = random_batch()
    mb = make_micro_batch(batch, np.arange(len(batch)))
    lp, ent = response_logprobs(model, mb, temperature=0.7)
    for i in range(len(batch)):
        seq = torch.tensor([batch.sequences.row(i).tolist()])
        full = torch.log_softmax(model(seq).logits[0] / 0.7, -1)
        p = int(batch.prompt_lengths[i])
        resp = seq[0, p:]
        want = full[p - 1 : p - 1 + len(resp)].gather(1, resp[:, None])[:, 0]
        torch.testing.assert_close(lp[i, : len(resp)], want, atol=1e-5, rtol=1e-5)
        assert (lp[i, len(resp) :] == 0).all()


def run_update(model, batch, loss_name, micro, mini=3, selection="current", tokens=None):
    algo = AlgorithmConfig(
        policy_loss=loss_cfg(
            loss_name, clip_cov_lb=-10.0, clip_cov_ub=10.0, clip_cov_ratio=0.2, kl_cov_ratio=0.2
        )
    )
    learner = LearnerConfig(
        micro_batch_size=micro, mini_batches=mini, selection_logprobs=selection, micro_batch_tokens=tokens
    )
    return ppo_update(SGDTrainable(model), batch, algo=algo, learner=learner, temperature=1.0, seed=7).metrics


@pytest.mark.parametrize("selection", ["step_start", "current"])
@pytest.mark.parametrize("loss_name", ["ppo", "clip_cov", "kl_cov"])
def test_micro_batch_size_does_not_change_the_update(loss_name, selection):
    batch = random_batch()
    a, b = tiny_model(), tiny_model()
    ma = run_update(a, batch, loss_name, micro=3, selection=selection)
    mb = run_update(b, batch, loss_name, micro=64, selection=selection)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4)
    assert ma["actor/loss"] == pytest.approx(mb["actor/loss"], rel=1e-4, abs=1e-6)
    moved = sum((pa - pb0).abs().sum() for pa, pb0 in zip(a.parameters(), tiny_model().parameters()))
    assert moved > 1e-3, "the update must actually change the weights"
    if loss_name != "ppo":
        assert ma["actor/cov/selected_frac"] == pytest.approx(mb["actor/cov/selected_frac"], rel=1e-5)
        assert ma["actor/cov/selected_frac"] > 0


def test_micro_batches_fixed_and_by_token_budget():
    rows = np.array([4, 0, 2, 1, 3])
    lengths = np.array([5, 9, 3, 12, 7])  # by row id
    assert [p.tolist() for p in micro_batches(rows, 2)] == [[4, 0], [2, 1], [3]]
    parts = micro_batches(rows, 2, lengths=lengths, token_budget=20)
    # longest first: row 3 (12) alone since 2 x 12 > 20; rows 1, 4 (9, 7) -> 2 x 9; rows 0, 2 (5, 3) -> 2 x 5
    assert [p.tolist() for p in parts] == [[3], [1, 4], [0, 2]]
    assert sorted(np.concatenate(parts).tolist()) == sorted(rows.tolist())
    assert all(len(p) * lengths[p].max() <= 20 or len(p) == 1 for p in parts)
    assert [p.tolist() for p in micro_batches(rows, 2, lengths=lengths, token_budget=5)] == [
        [3],
        [1],
        [4],
        [0],
        [2],
    ]
    with pytest.raises(ValueError, match="lengths"):
        micro_batches(rows, 2, token_budget=10)


@pytest.mark.parametrize("loss_name", ["ppo", "clip_cov", "kl_cov"])
def test_dynamic_micro_batching_does_not_change_the_update(loss_name):
    batch = synthetic_train_batch(24, seed=3, response_len=(1, 30))  # widely varying lengths
    a, b = tiny_model(), tiny_model()
    ma = run_update(a, batch, loss_name, micro=4)
    mb = run_update(b, batch, loss_name, micro=4, tokens=60)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4)
    assert ma["actor/loss"] == pytest.approx(mb["actor/loss"], rel=1e-4, abs=1e-6)


class ThreadRanks:
    """W threads with a shared barrier: all_gather and gradient averaging like a DP group."""

    def __init__(self, world):
        self.world, self.barrier = world, threading.Barrier(world)
        self.slots = [None] * world
        self.models = [None] * world

    def all_gather(self, rank, x):
        self.slots[rank] = x
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def trainable(self, rank, model):
        ranks = self

        class T(SGDTrainable):
            def step(self):
                ranks.barrier.wait()
                if rank == 0:  # average grads across ranks (DeepSpeed's all-reduce mean)
                    for ps in zip(*[m.parameters() for m in ranks.models]):
                        g = (
                            sum(p.grad if p.grad is not None else torch.zeros_like(p) for p in ps)
                            / ranks.world
                        )
                        for p in ps:
                            p.grad = g.clone()
                ranks.barrier.wait()
                return super().step()

        self.models[rank] = model
        return T(model)


@pytest.mark.parametrize("loss_name", ["ppo", "clip_cov", "kl_cov"])
def test_two_ranks_equal_one_rank(loss_name):
    torch.set_num_threads(1)
    batch = random_batch()
    single = tiny_model()
    run_update(single, batch, loss_name, micro=4)
    ranks = ThreadRanks(2)
    models = [tiny_model(), tiny_model()]
    algo = AlgorithmConfig(
        policy_loss=loss_cfg(
            loss_name, clip_cov_lb=-10.0, clip_cov_ub=10.0, clip_cov_ratio=0.2, kl_cov_ratio=0.2
        )
    )
    learner = LearnerConfig(micro_batch_size=4, mini_batches=3)
    errors = []

    def work(rank):
        try:
            ppo_update(
                ranks.trainable(rank, models[rank]),
                batch,
                algo=algo,
                learner=learner,
                temperature=1.0,
                seed=7,
                rank=rank,
                world_size=2,
                all_gather=lambda x: ranks.all_gather(rank, x),
            )
        except Exception as e:  # surfaced below
            errors.append(e)
            ranks.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for p1, p2 in zip(single.parameters(), models[0].parameters()):
        torch.testing.assert_close(p1, p2, atol=2e-5, rtol=1e-4)
    for p1, p2 in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p1, p2)


def test_entropy_change_is_measured_when_asked():
    batch = random_batch()
    algo = AlgorithmConfig()
    res = ppo_update(
        SGDTrainable(tiny_model()),
        batch,
        algo=algo,
        learner=LearnerConfig(mini_batches=2),
        temperature=1.0,
        seed=1,
        measure_entropy_change=True,
        inspect_top_k=5,
    )
    m = res.metrics
    covs = [t["cov"] for t in res.top_tokens]
    assert len(covs) == 5 and covs == sorted(covs, reverse=True) and covs[0] > 0
    assert m["entropy/measured_change"] == pytest.approx(m["entropy/after_update"] - m["entropy/mean"])
    assert m["entropy/measured_change"] != 0.0
    assert m["actor/updates"] == 2


@pytest.mark.parametrize("micro", [3, 64])
def test_kl_cov_penalty_is_zero_on_the_first_update(micro):
    """Before the first optimizer step the policy is the old one, so KL-Cov's beta*|logp - old| term is 0
    with gradient 0: one mini-batch of KL-Cov is exactly the unclipped policy gradient, i.e. PPO's update
    (no ratio is clipped at ratio 1), whatever float noise the separately computed old log-probs carry."""
    batch = random_batch()
    a, b = tiny_model(), tiny_model()
    run_update(a, batch, "kl_cov", micro=micro, mini=1)
    run_update(b, batch, "ppo", micro=micro, mini=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["ppo", "kl_cov"])
def test_gradient_checkpointing_gives_the_same_update(loss_name):
    from pipeline.core.model_forward import enable_gradient_checkpointing

    batch = random_batch()
    plain, ckpt = tiny_model(), tiny_model()
    enable_gradient_checkpointing(ckpt)
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    mp = run_update(plain, batch, loss_name, micro=5)
    mc = run_update(ckpt, batch, loss_name, micro=5)
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert mp["actor/loss"] == pytest.approx(mc["actor/loss"], rel=1e-5, abs=1e-7)
    moved = sum((a - b).abs().sum() for a, b in zip(ckpt.parameters(), tiny_model().parameters()))
    assert moved > 1e-3, "the update must actually change the weights"


def test_gradient_checkpointing_names_the_field_for_a_model_without_it():
    from pipeline.core.model_forward import enable_gradient_checkpointing
    from tests.helpers import LookupPolicy

    with pytest.raises(ValueError, match="learner.gradient_checkpointing: LookupPolicy"):
        enable_gradient_checkpointing(LookupPolicy(8))
