"""The verifier role on Ray: one actor, and a pool of two where one dies before or while scoring.

"Scored exactly once" is checked two ways: every score matches its hand-known answer in input order, and
the merged stats count each sample once (``verifier/count == N``; a re-scored chunk that had also been
kept would push it above N).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import psutil
import pytest

from actors.verifier import VerifierWorker
from pipeline.driver.verification import score_with_pool
from schemas.verifier_config import VerifierConfig, VerifierSpec

pytestmark = pytest.mark.ray

CONFIG = VerifierConfig(
    default=VerifierSpec(name="math"),
    routes={
        "synthetic": VerifierSpec(name="arithmetic"),
        "code": VerifierSpec(name="code", options={"wall_s": 3}),
    },
    timeout_s=5.0,
)


def _batch(n: int):
    """n samples, every other one right; a third are synthetic-task rows. ``expected`` is the known score."""
    prompts, responses, truths, sources = [], [], [], []
    for i in range(n):
        correct = i % 2 == 0
        prompts.append(f"q{i}")
        if i % 3 == 2:
            responses.append(f"1+1=2;#{i if correct else i + 1}")
            truths.append(str(i))
            sources.append("synthetic")
        else:
            responses.append(rf"so the answer is \boxed{{{i}/2}}" if correct else "no idea")
            truths.append(str(i / 2))
            sources.append("math")
    expected = np.asarray([1.0 if i % 2 == 0 else 0.0 for i in range(n)], np.float32)
    return prompts, responses, truths, sources, expected


def _actors(ray, m: int):
    remote = ray.remote(num_cpus=0.5, max_restarts=0)(VerifierWorker)
    actors = [remote.remote(CONFIG, replica=r) for r in range(m)]
    ray.get([a.info.remote() for a in actors])
    return actors


def test_single_actor_scores_and_reports(ray_cluster):
    (actor,) = _actors(ray_cluster, 1)
    prompts, responses, truths, sources, expected = _batch(12)
    scores, reasons, stats = ray_cluster.get(actor.score.remote(prompts, responses, truths, sources))
    ray_cluster.kill(actor)
    np.testing.assert_array_equal(scores, expected)
    assert all((r is None) == (s == 1.0) for r, s in zip(reasons, scores))
    assert stats["verifier/count"] == 12 and stats["verifier/synthetic/count"] == 4
    assert stats["verifier/math/errors"] == 0 and stats["verifier/by_verifier/math/count"] == 8


def test_pool_survives_a_killed_actor(ray_cluster):
    actors = _actors(ray_cluster, 2)
    worker_pids = [pid for a in actors for pid in ray_cluster.get(a.info.remote())["worker_pids"]]
    prompts, responses, truths, sources, expected = _batch(40)

    # Both actors up: the batch is split, scored concurrently, reassembled in order.
    scores, reasons, stats = score_with_pool(actors, prompts, responses, truths, sources)
    np.testing.assert_array_equal(scores, expected)
    assert stats["verifier/count"] == 40 and stats["verifier/actor_failures"] == 0

    # Killed while scoring: actor 0's chunk starts with a 1.5 s sandboxed program, the kill lands at 0.5 s.
    big = list(_batch(40))
    big[1][0] = "```python\nimport time\ntime.sleep(1.5)\nprint('ok')\n```"
    big[2][0], big[3][0] = json.dumps({"inputs": [""], "outputs": ["ok"]}), "code"
    timer = threading.Timer(0.5, ray_cluster.kill, args=(actors[0],))
    timer.start()
    scores, reasons, stats = score_with_pool(actors, *big[:4])
    timer.join()
    np.testing.assert_array_equal(scores, big[4])
    assert stats["verifier/count"] == 40 and stats["verifier/code/score_mean"] == 1.0
    assert stats["verifier/actor_failures"] == 1

    # Killed before scoring: the dead actor's chunk goes to the survivor.
    scores, _, stats = score_with_pool(actors, prompts, responses, truths, sources)
    np.testing.assert_array_equal(scores, expected)
    assert stats["verifier/count"] == 40 and stats["verifier/actor_failures"] == 1

    # None left: every sample scores 0 with a reason, none is lost.
    ray_cluster.kill(actors[1])
    scores, reasons, stats = score_with_pool(actors, prompts, responses, truths, sources)
    assert scores.shape == (40,) and not scores.any()
    assert all(r == "error: no verifier actor left alive" for r in reasons)
    assert stats["verifier/count"] == 40 and stats["verifier/errors"] == 40
    # The killed actors' isolation workers exit too (EOF on their pipe): nothing is left running.
    gone, alive = psutil.wait_procs(
        [psutil.Process(p) for p in worker_pids if psutil.pid_exists(p)], timeout=10
    )
    assert alive == []


def test_reward_functions_of_both_shapes_through_an_actor(ray_cluster):
    """The example verl and TRL functions behind a real verifier actor: routed by data source, row extras
    reaching them (verl's ``extra_info``, TRL's columns), the verl dict's other keys as metrics, a TRL
    ``None`` and a raising call each costing only their sample."""
    config = VerifierConfig(
        default=VerifierSpec(name="examples.reward_functions.verl_score:compute_score"),
        routes={"chat": VerifierSpec(name="examples.reward_functions.trl_reward:last_line_matches")},
        timeout_s=5.0,
    )
    actor = ray_cluster.remote(num_cpus=0.5, max_restarts=0)(VerifierWorker).remote(config)
    responses = ["so 12", "no number", "so 3", "so 4", "hi\n7", "7", "far too long\n7"]
    truths = ["12", "5", "5", "not a number", "7", "8", "7"]
    sources = ["gsm8k"] * 4 + ["chat"] * 3
    extras = [{}, {}, {"partial_credit": 0.25}, {}, {}, {"max_chars": 20}, {"max_chars": 5}]
    scores, reasons, stats = ray_cluster.get(actor.score.remote([""] * 7, responses, truths, sources, extras))
    ray_cluster.kill(actor)
    np.testing.assert_array_equal(scores, np.float32([1, 0, 0.25, 0, 1, 0, 0]))
    assert "ValueError" in reasons[3] and "not a number" in reasons[3]
    assert "returned None for this sample" in reasons[6]
    assert [r is None for r in reasons] == [True, True, True, False, True, True, False]
    assert stats["verifier/gsm8k/errors"] == 1 and stats["verifier/chat/errors"] == 0
    # acc over the three verl samples that returned a dict (the raising one reported nothing).
    assert stats["verifier/gsm8k/info/acc/count"] == 3 and stats["verifier/gsm8k/info/acc/mean"] == 1 / 3
    assert stats["verifier/gsm8k/info/answered/mean"] == 2 / 3
    assert stats["verifier/by_verifier/examples.reward_functions.trl_reward.last_line_matches/count"] == 3
