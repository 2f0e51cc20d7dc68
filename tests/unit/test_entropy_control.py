"""Target-entropy controller: config validation, PI behaviour on a synthetic softmax toy policy with
fast entropy dynamics (ToyBandit), bounds, anti-windup, surge handling, exact resumption, and the
KL-Cov no-op warning. Everything is seeded and runs in well under a second per test."""

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.core.entropy_control import EntropyController, apply_overrides
from schemas.config import kl_cov_is_noop, policy_loss
from schemas.control_config import EntropyControlConfig
from tests.toy_bandit import ToyBandit, run_toy

# The toy: 64 states x 10 actions, groups of 8, reward 1 for the best action plus N(0, 0.3) noise.
# Its entropy collapses in ~60 steps at a small fixed ratio, fast enough for a 200-step test.
TOY = dict(lr=0.3, reward_noise=0.3)
R0 = 0.01  # the fixed "small" ratio, and the controller's starting value
BOUNDS = dict(min_value=1e-3, max_value=0.9)
FAST = dict(kp=5.0, ki=0.5)  # gains for the toy's fast dynamics (see docs: how to choose gains)


def _cfg(**kw) -> EntropyControlConfig:
    return EntropyControlConfig(**({"enabled": True} | BOUNDS | FAST | kw))


def _feed(ctrl, entropies, start=1):
    return [ctrl.update(start + i, h) for i, h in enumerate(entropies)]


# ----------------------------------------------------------------------------------- config


def test_config_validation():
    assert EntropyControlConfig().enabled is False  # off by default, no target needed
    with pytest.raises(ValidationError, match="needs a target"):
        EntropyControlConfig(enabled=True)
    with pytest.raises(ValidationError, match="only one"):
        EntropyControlConfig(enabled=True, target=1.0, target_fraction=0.5)
    with pytest.raises(ValidationError, match="must be < max_value"):
        EntropyControlConfig(enabled=True, target=1.0, min_value=0.1, max_value=0.01)
    with pytest.raises(ValidationError, match="<= 1"):
        EntropyControlConfig(enabled=True, target=1.0, max_value=2.0)  # ratio knob
    assert EntropyControlConfig(enabled=True, target=1.0, knob="beta", max_value=20.0).bounds == (0.01, 20.0)
    with pytest.raises(ValidationError, match="strictly increasing"):
        EntropyControlConfig(enabled=True, target=1.0, schedule=[(10, 1.0), (10, 0.5)])
    with pytest.raises(ValidationError, match="> 1"):
        EntropyControlConfig(enabled=True, target=1.0, schedule=[(1, 1.0)])
    with pytest.raises(ValidationError):
        EntropyControlConfig(enabled=True, target=-1.0)
    with pytest.raises(ValidationError):
        EntropyControlConfig(enabled=True, target=1.0, smoothing=1.0)
    with pytest.raises(ValidationError):
        EntropyControlConfig(enabled=True, target=1.0, surge_factor=1.0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        EntropyControlConfig(enabled=True, target=1.0, gain=3)
    cfg = EntropyControlConfig(enabled=True, target_fraction=0.6)
    with pytest.raises(ValidationError):
        cfg.kp = 2.0  # frozen
    assert cfg.mode == "fraction" and cfg.bounds == (1e-5, 0.1)
    # YAML-style lists parse into (step, value) points
    assert EntropyControlConfig(enabled=True, target=1.0, schedule=[[5, 0.5]]).schedule == [(5, 0.5)]


def test_knob_field_and_method_checks():
    ratio = EntropyControlConfig(enabled=True, target=1.0)
    beta = EntropyControlConfig(enabled=True, target=1.0, knob="beta")
    assert ratio.knob_field("clip_cov") == "clip_cov_ratio"
    assert ratio.knob_field("kl_cov") == "kl_cov_ratio"
    assert beta.knob_field("kl_cov") == "kl_cov_beta"
    with pytest.raises(ValueError, match="only valid with kl_cov"):
        beta.knob_field("clip_cov")
    with pytest.raises(ValueError, match="'clip_cov' or 'kl_cov'"):
        EntropyController(ratio, "ppo", 1e-3)
    with pytest.raises(ValueError, match="> 0"):
        EntropyController(ratio, "clip_cov", 0.0)


def test_overrides_apply_to_a_validated_policy_loss_copy():
    ctrl = EntropyController(_cfg(target=1.0), "kl_cov", 2e-3)
    assert ctrl.overrides() == {"kl_cov_ratio": 2e-3}
    base = policy_loss(name="kl_cov")
    new = apply_overrides(base, {"kl_cov_ratio": 0.05})
    assert new.kl_cov_ratio == 0.05 and base.kl_cov_ratio == 2e-3 and new.kl_cov_beta == base.kl_cov_beta
    with pytest.raises(ValidationError):
        apply_overrides(base, {"kl_cov_ratio": 2.0})


def test_schedule_interpolates_from_step_one_and_holds():
    # Absolute: 2.0 at step 1 (the scalar), 1.0 at step 11, 0.5 at step 21, held after.
    ctrl = EntropyController(_cfg(target=2.0, schedule=[(11, 1.0), (21, 0.5)]), "clip_cov", R0)
    assert [ctrl.target_at(s) for s in (1, 6, 11, 16, 21, 500)] == [2.0, 1.5, 1.0, 0.75, 0.5, 0.5]
    # Fraction: needs the initial entropy (first update), then scales it.
    frac = EntropyController(_cfg(target_fraction=1.0, schedule=[(11, 0.5)]), "clip_cov", R0)
    with pytest.raises(ValueError, match="initial entropy"):
        frac.target_at(1)
    out = frac.update(1, 2.0)
    assert out.target == 2.0 and frac.initial_entropy == 2.0
    assert frac.target_at(6) == pytest.approx(1.5) and frac.target_at(11) == pytest.approx(1.0)


# ---------------------------------------------------------------------- direction and basics


def test_direction_below_target_raises_knob_above_lowers_it():
    low = EntropyController(_cfg(target=1.0), "clip_cov", R0).update(1, 0.5)
    high = EntropyController(_cfg(target=1.0), "clip_cov", R0).update(1, 1.5)
    assert low.value > R0 > high.value
    assert low.error == pytest.approx(0.5) and high.error == pytest.approx(-0.5)
    assert low.log_error == pytest.approx(math.log(2.0))
    # Log-space: value = R0 * exp(kp * e + ki * e) on the first step (integral starts at 0)
    assert low.value == pytest.approx(R0 * math.exp((5.0 + 0.5) * math.log(2.0)))
    assert set(low.metrics()) >= {
        "control/value",
        "control/target",
        "control/error",
        "control/integral",
        "control/saturated",
        "control/surge",
    }


def test_steps_must_increase_and_bad_entropy_holds_the_knob():
    ctrl = EntropyController(_cfg(target=1.0), "clip_cov", R0)
    v = ctrl.update(1, 0.8).value
    with pytest.raises(ValueError, match="increase"):
        ctrl.update(1, 0.8)
    out = ctrl.update(2, float("nan"))
    assert out.value == v and "not usable" in out.warning and ctrl.value == v
    assert ctrl.update(3, 0.8).value > v  # keeps integrating afterwards


def test_smoothing_is_an_ema():
    ctrl = EntropyController(_cfg(target=1.0, smoothing=0.5, surge_factor=None), "clip_cov", R0)
    outs = _feed(ctrl, [1.0, 2.0, 2.0])
    assert [o.entropy_smoothed for o in outs] == [1.0, 1.5, 1.75]


# ---------------------------------------------------------------- (a) and (b): toy dynamics


def test_a_uncontrolled_small_ratio_collapses():
    for method, extra in (("clip_cov", {}), ("kl_cov", {"inner_steps": 4, "beta": 3.0})):
        beta = extra.pop("beta", 1.0)
        h = run_toy(method, 200, ratio=R0, beta=beta, **TOY, **extra)["entropy"]
        assert h[-1] < 0.1 * h[0], method  # collapsed to < 10% of the initial entropy
        assert all(np.diff(np.asarray(h)[::20]) < 0), method  # and kept falling


@pytest.mark.parametrize(
    "method, knob, initial, toy",
    [
        ("clip_cov", "ratio", R0, {}),
        ("kl_cov", "ratio", R0, {"inner_steps": 4, "beta": 3.0}),
        ("kl_cov", "beta", 1.0, {"inner_steps": 4, "ratio": 0.5}),
    ],
)
def test_b_controller_holds_sixty_percent_of_initial_entropy(method, knob, initial, toy):
    toy = dict(toy)
    bounds = {} if knob == "ratio" else {"min_value": 0.01, "max_value": 100.0}
    ctrl = EntropyController(_cfg(target_fraction=0.6, knob=knob, **bounds), method, initial, mini_batches=4)
    ratio, beta = toy.pop("ratio", initial), toy.pop("beta", 1.0)
    run = run_toy(method, 200, ratio=ratio, beta=beta, controller=ctrl, **TOY, **toy)
    h = np.asarray(run["entropy"])
    target = 0.6 * h[0]
    assert run["outputs"][-1].target == pytest.approx(target)
    rel = h[100:] / target
    assert rel.min() > 0.85 and rel.max() < 1.15, (rel.min(), rel.max())
    # the uncontrolled twin (same seed, fixed knob) ends far below the band
    free = run_toy(method, 200, ratio=ratio if knob == "beta" else R0, beta=beta, **TOY, **toy)["entropy"]
    assert free[-1] < 0.3 * target
    lo, hi = ctrl.cfg.bounds
    assert all(lo <= v <= hi for v in run["value"])


def test_b_default_gains_also_hold_the_toy():
    cfg = EntropyControlConfig(enabled=True, target_fraction=0.6, **BOUNDS)  # kp=5, ki=0.2
    h = np.asarray(
        run_toy("clip_cov", 200, ratio=R0, controller=EntropyController(cfg, "clip_cov", R0), **TOY)[
            "entropy"
        ]
    )
    rel = h[100:] / (0.6 * h[0])
    assert rel.min() > 0.85 and rel.max() < 1.15, (rel.min(), rel.max())


# ------------------------------------------------------------------------------- (c) bounds


@pytest.mark.parametrize("target_fraction", [1.5, 1e-3])  # above ln(10) / far below what the toy reaches
def test_c_knob_stays_in_bounds_with_unreachable_target(target_fraction):
    ctrl = EntropyController(_cfg(target_fraction=target_fraction), "clip_cov", R0)
    run = run_toy("clip_cov", 150, ratio=R0, controller=ctrl, **TOY)
    lo, hi = ctrl.cfg.bounds
    assert all(lo <= v <= hi for v in run["value"])
    outs = run["outputs"]
    assert all(o.saturated for o in outs[-50:])
    assert outs[-1].value == (hi if target_fraction > 1 else lo)
    warned = [o.warning for o in outs if o.warning and "unreachable" in o.warning]
    assert len(warned) == 1  # once per saturation episode, after SATURATION_WARN_STEPS steps
    if target_fraction > 1:
        assert np.asarray(run["entropy"])[-50:].max() < math.log(10)  # indeed unreachable


def test_c_bounds_hold_for_arbitrary_inputs():
    rng = np.random.default_rng(7)
    for trial in range(20):
        cfg = _cfg(
            target=float(rng.uniform(0.05, 3.0)),
            kp=float(rng.uniform(0, 50)),
            ki=float(rng.uniform(0, 5)),
            smoothing=float(rng.uniform(0, 0.9)),
            integral_limit=None if trial % 3 == 0 else float(rng.uniform(0.1, 10)),
            anti_windup=bool(trial % 2),
            schedule=[(50, float(rng.uniform(0.05, 3.0)))],
        )
        ctrl = EntropyController(cfg, "clip_cov", float(10 ** rng.uniform(-6, 0)))
        hs = np.exp(rng.uniform(-8, 3, 200))
        hs[rng.integers(0, 200, 5)] = 0.0
        for o in _feed(ctrl, hs):
            assert 1e-3 <= o.value <= 0.9 and math.isfinite(o.integral)
            if cfg.integral_limit is not None:
                assert abs(o.integral) <= cfg.integral_limit + 1e-12


# -------------------------------------------------------------------------- (d) anti-windup


def _steps_to_leave_max(**kw) -> int:
    # Entropy stuck at 1.0 while the target is 3.0 (unreachable) for 100 steps, then 0.5 (reachable
    # by lowering the knob). Count the steps after the switch until the knob leaves max_value.
    cfg = _cfg(target=3.0, schedule=[(100, 3.0), (101, 0.5)], kp=1.0, ki=0.3, surge_factor=None, **kw)
    ctrl = EntropyController(cfg, "clip_cov", 0.1)
    outs = _feed(ctrl, [1.0] * 400)
    assert all(o.saturated and o.value == 0.9 for o in outs[20:100])  # long saturation at max
    after = [o.value for o in outs[100:]]
    return next(i + 1 for i, v in enumerate(after) if v < 0.9)


def test_d_anti_windup_releases_the_bound_quickly():
    conditional = _steps_to_leave_max()  # default: conditional integration + clamp ln(1000)
    clamped_only = _steps_to_leave_max(anti_windup=False, integral_limit=4.0)
    wound_up = _steps_to_leave_max(anti_windup=False, integral_limit=None)
    assert conditional == 1
    assert clamped_only <= 10
    assert wound_up > 100  # ~100 * 0.3 * ln 3 of integral to unwind at 0.3 * ln 2 per step
    assert conditional < clamped_only < wound_up


def test_d_anti_windup_on_the_toy():
    # Unreachable target (1.5x initial) for 100 steps, then 0.6x. With anti-windup the knob leaves
    # max within a few steps and entropy reaches the band; unclamped windup keeps it pinned for long.
    def run(**kw):
        cfg = _cfg(target_fraction=1.5, schedule=[(100, 1.5), (101, 0.6)], surge_factor=None, **kw)
        ctrl = EntropyController(cfg, "clip_cov", R0)
        out = run_toy("clip_cov", 200, ratio=R0, controller=ctrl, **TOY)
        after = out["value"][101:]  # value[t] is the knob used at step t + 1
        return next(i + 1 for i, v in enumerate(after) if v < 0.9), np.asarray(out["entropy"])

    fast, h_fast = run()
    slow, h_slow = run(anti_windup=False, integral_limit=None)
    assert fast <= 3 and slow > 20
    target = 0.6 * h_fast[0]
    assert abs(h_fast[-1] / target - 1) < 0.15
    assert h_slow[100 + slow // 2] > h_fast[100 + slow // 2]  # still pinned high while unwinding


# ------------------------------------------------------------------------------- (e) surge


def test_e_surge_flags_and_drops_the_knob_to_min():
    ctrl = EntropyController(_cfg(target=1.0, smoothing=0.8), "kl_cov", 2e-3)
    outs = _feed(ctrl, [1.0, 1.0, 1.05, 2.5, 2.5, 1.5])
    assert [o.surge for o in outs] == [False, False, False, True, True, False]
    s = outs[3]
    assert s.value == 1e-3 and s.saturated and "surge" in s.warning and "kl_cov_ratio" in s.warning
    assert s.entropy_smoothed == 2.5  # EMA reset to the raw value
    assert outs[2].value > s.value
    # after the surge the PI resumes from min_value (integral reset to hold it), not from a wound-up state
    assert outs[5].value < outs[2].value


def test_e_no_surge_on_the_initial_descent():
    # Target far below the starting entropy: the first steps are above 2x target but it is no surge
    # (nothing rose); the line arms once entropy is at or below it.
    ctrl = EntropyController(_cfg(target=0.2), "clip_cov", R0)
    outs = _feed(ctrl, [2.0, 1.0, 0.39, 0.5])
    assert [o.surge for o in outs] == [False, False, False, True]


def test_e_surge_on_the_toy_pulls_entropy_back():
    # Hold 40% of the initial entropy, then at step 120 flatten the logits (entropy jumps to ~ln 10,
    # over 2x the target): surge flagged, knob to min, and entropy is pulled back toward the target.
    def flatten(t, toy: ToyBandit):
        if t == 120:
            toy.z *= 0.02

    ctrl = EntropyController(_cfg(target_fraction=0.4), "clip_cov", R0)
    run = run_toy("clip_cov", 200, ratio=R0, controller=ctrl, schedule_hook=flatten, **TOY)
    outs, h = run["outputs"], np.asarray(run["entropy"])
    assert not any(o.surge for o in outs[:119])
    assert outs[119].surge and outs[119].value == 1e-3 and "surge" in outs[119].warning
    target = 0.4 * h[0]
    assert h[119] > 2 * target
    assert abs(h[-1] / target - 1) < 0.15


# ----------------------------------------------------------------------------- (f) resume


def test_f_state_dict_round_trip_resumes_exactly():
    cfg = _cfg(target_fraction=0.6, schedule=[(80, 0.4)], smoothing=0.5)
    ref = EntropyController(cfg, "kl_cov", R0, mini_batches=1)
    run = run_toy("kl_cov", 160, ratio=R0, beta=3.0, controller=ref, inner_steps=4, **TOY)
    hs, full = run["entropy"], run["outputs"]

    first = EntropyController(cfg, "kl_cov", R0, mini_batches=1)
    _feed(first, hs[:70])
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = EntropyController(cfg, "kl_cov", 0.5, mini_batches=1)  # the config's value may differ now
    resumed.load_state_dict(state)
    assert resumed.value == first.value and resumed.initial_entropy == first.initial_entropy
    assert _feed(resumed, hs[70:], start=71) == full[70:]  # dataclass equality: every field, exactly

    # a fresh controller at step 1 replays the pending no-op warning; resumed ones do not repeat it
    assert full[0].warning and "no-op" in full[0].warning
    assert not any(o.warning and "no-op" in o.warning for o in full[1:])

    other = EntropyController(_cfg(target=1.0, knob="beta", min_value=0.01, max_value=10.0), "kl_cov", 1.0)
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- (g) KL-Cov no-op


def test_g_kl_cov_noop_warning():
    msg = kl_cov_is_noop(1, 1)
    assert msg and "no-op" in msg and "mini_batches" in msg
    assert kl_cov_is_noop(4, 1) is None and kl_cov_is_noop(1, 2) is None
    with pytest.raises(ValueError):
        kl_cov_is_noop(0, 1)

    noop = EntropyController(_cfg(target=1.0), "kl_cov", 2e-3, mini_batches=1, epochs=1)
    outs = _feed(noop, [1.0, 1.0])
    assert "no-op" in outs[0].warning and outs[1].warning is None
    for ctrl in (
        EntropyController(_cfg(target=1.0), "kl_cov", 2e-3, mini_batches=8),
        EntropyController(_cfg(target=1.0), "clip_cov", 2e-3, mini_batches=1),  # Clip-Cov works on-policy
    ):
        assert ctrl.update(1, 1.0).warning is None


def test_g_toy_kl_cov_is_inert_with_one_update_per_rollout():
    # The toy mirrors the reason: with one inner update the penalty's gradient is sign(0) = 0,
    # so KL-Cov at any ratio is exactly plain GRPO.
    a = run_toy("kl_cov", 60, ratio=0.9, beta=10.0, inner_steps=1, **TOY)["entropy"]
    b = run_toy("ppo", 60, **TOY)["entropy"]
    assert a == b


def test_initial_value_outside_bounds_is_clamped_with_warning():
    ctrl = EntropyController(_cfg(target=1.0), "clip_cov", 2e-4)  # below min_value 1e-3
    assert ctrl.value == 1e-3
    assert "outside" in ctrl.update(1, 1.0).warning
