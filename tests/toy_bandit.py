"""A tiny synthetic softmax policy with fast entropy dynamics, to test the entropy controller
(``pipeline.core.entropy_control``) in milliseconds. Test code, not part of covrl."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.entropy_control import EntropyController


class ToyBandit:
    """A batch of independent softmax "states" (prompts) over a few actions (responses) with fast
    entropy dynamics, for tests and docs. Not used in training.

    Reward 1 for each state's best action, else 0; per step every state samples ``group`` actions,
    GRPO advantages ``(r - mean) / (std + 1e-6)`` per state, per-sample covariance
    ``(A_i - mean A)(log pi_i - mean log pi)`` over the batch (as ``token_covariance``), and a
    logit update ``z[s, a_i] += lr * A_i / group`` (sampled natural-PG step) split into
    ``inner_steps`` optimizer updates on the same rollout (like mini-batches):

    - 'clip_cov': the top ``max(1, int(ratio * n))`` samples by covariance get no update
      (the deterministic top-k stands in for Clip-Cov's random draw inside its covariance band);
    - 'kl_cov': those samples get ``- beta * sign(log pi - old log pi)`` added to their advantage
      (the gradient of ``beta * |logp - old_logp|`` on the sampled logit): zero at the first inner
      update, as on-policy KL-Cov is a no-op;
    - 'ppo': no selection (plain GRPO step).
    """

    def __init__(
        self,
        n_states: int = 64,
        n_actions: int = 10,
        group: int = 8,
        lr: float = 1.0,
        inner_steps: int = 1,
        logit_scale: float = 0.5,
        reward_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.z = logit_scale * self.rng.standard_normal((n_states, n_actions))
        self.best = self.rng.integers(0, n_actions, n_states)
        self.group, self.lr, self.inner_steps, self.reward_noise = group, lr, inner_steps, reward_noise

    @staticmethod
    def _log_softmax(z: np.ndarray) -> np.ndarray:
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    def entropy(self) -> float:
        """Mean entropy over states, nats."""
        lp = self._log_softmax(self.z)
        return float(-(np.exp(lp) * lp).sum(-1).mean())

    def step(self, method: str, ratio: float = 0.0, beta: float = 1.0) -> None:
        s_n, g = self.z.shape[0], self.group
        lp0 = self._log_softmax(self.z)
        p = np.exp(lp0)
        u = self.rng.random((s_n, g, 1))
        actions = np.minimum((u > np.cumsum(p, -1)[:, None, :]).sum(-1), p.shape[1] - 1)  # (S, G)
        rewards = (actions == self.best[:, None]).astype(float)
        if self.reward_noise:
            rewards = rewards + self.reward_noise * self.rng.standard_normal(rewards.shape)
        adv = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)
        rows = np.repeat(np.arange(s_n), g)
        cols, a = actions.reshape(-1), adv.reshape(-1)
        old = lp0[rows, cols]
        cov = (a - a.mean()) * (old - old.mean())
        sel = np.zeros(a.size, dtype=bool)
        if method in ("clip_cov", "kl_cov"):
            k = min(max(1, int(ratio * a.size)), a.size)
            sel[np.argsort(-cov, kind="stable")[:k]] = True
        elif method != "ppo":
            raise ValueError(f"method must be 'ppo', 'clip_cov' or 'kl_cov', got {method!r}")
        for _ in range(self.inner_steps):
            w = a.copy()
            if method == "clip_cov":
                w[sel] = 0.0
            elif method == "kl_cov":
                now = self._log_softmax(self.z)[rows, cols]
                w[sel] -= beta * np.sign(now - old)[sel]
            dz = np.zeros_like(self.z)
            np.add.at(dz, (rows, cols), w)
            self.z += (self.lr / (g * self.inner_steps)) * dz


def run_toy(
    method: str,
    steps: int,
    *,
    ratio: float = 1e-3,
    beta: float = 1.0,
    controller: EntropyController | None = None,
    schedule_hook=None,
    **toy_kwargs: Any,
) -> dict[str, list]:
    """Run ``ToyBandit`` for ``steps`` steps with the driver's timing: at step t the entropy of the
    policy before the update is measured, the update uses the knob of step t, then the controller
    (if any) gives the knob for step t + 1. Returns per-step ``entropy``, ``value`` and ``outputs``.
    ``schedule_hook(step, toy)`` may perturb the toy before step ``step`` (tests)."""
    toy = ToyBandit(**toy_kwargs)
    knob = {"ratio": ratio, "beta": beta}
    name = None if controller is None else ("beta" if controller.field == "kl_cov_beta" else "ratio")
    out: dict[str, list] = {"entropy": [], "value": [], "outputs": []}
    for t in range(1, steps + 1):
        if schedule_hook is not None:
            schedule_hook(t, toy)
        if controller is not None:
            knob[name] = controller.value
        h = toy.entropy()
        toy.step(method, **knob)
        out["entropy"].append(h)
        out["value"].append(knob[name] if name else knob["ratio"])
        if controller is not None:
            out["outputs"].append(controller.update(t, h))
    return out
