"""Core sharing between a co-located generator and learner (async mode): the flag and the thread governor.

Real files on tmpfs and real processes; the thread setter is recorded so the test does not depend on how
many cores this machine has. The end-to-end effect is measured in bench/bench_async.py, and the async e2e
test (tests/e2e/test_pipeline_e2e.py) runs with the governor on.
"""

import multiprocessing as mp
import os
import uuid

import pytest
import torch

from actors.core_share import BusyFlag, ThreadGovernor, flag_root, generating, remove_key


@pytest.fixture
def key():
    k = f"test-{uuid.uuid4().hex[:8]}"
    yield k
    remove_key(k)


def governor(key, calls):
    return ThreadGovernor(key, threads=4, threads_while_generating=1, set_threads=calls.append)


def test_learner_lends_cores_only_while_a_generator_generates(key):
    calls: list[int] = []
    gov, flag = governor(key, calls), BusyFlag(key, replica=0)
    gov.poll()
    assert calls == [] and gov.current == 4  # nobody generating: keep every thread, no call
    with flag.held():
        assert generating(flag_root() / key)
        gov.poll()
        gov.poll()
        assert calls == [1]  # one switch, not one per poll
    assert not generating(flag_root() / key)
    gov.poll()
    assert calls == [1, 4]
    assert gov.end_step() > 0
    assert gov.end_step() == 0.0


def test_end_of_step_takes_the_threads_back_and_stops_counting(key):
    calls: list[int] = []
    gov, flag = governor(key, calls), BusyFlag(key, replica=0)
    with flag.held():
        gov.poll()
        lent = gov.end_step()  # the step ends while the generator still generates
        assert lent > 0 and calls == [1, 4] and gov.current == 4
        assert gov.end_step() == 0.0  # the idle learner lends nothing
        gov.poll()  # next step, generation still running: lend again
        assert calls == [1, 4, 1]


def test_two_replicas_on_one_node_both_count(key):
    calls: list[int] = []
    gov, a, b = governor(key, calls), BusyFlag(key, 0), BusyFlag(key, 1)
    with a.held():
        with b.held():
            gov.poll()
        gov.poll()  # replica 1 done, replica 0 still generating
        assert calls == [1]
    gov.poll()
    assert calls == [1, 4]


def _hold_and_die(key: str, ready) -> None:
    held = BusyFlag(key, 0).held()
    held.__enter__()  # never exits: the process dies with its flag raised
    ready.set()
    os._exit(0)


def test_flag_of_a_dead_generator_is_ignored_and_cleared_by_its_restart(key):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_and_die, args=(key, ready))
    proc.start()
    proc.join(30)
    assert ready.is_set() and list((flag_root() / key).iterdir())  # the file is still there...
    assert not generating(flag_root() / key)  # ...but its pid is gone
    BusyFlag(key, 0)  # the replica's restart removes it
    assert not list((flag_root() / key).iterdir())


def test_governor_polls_at_every_transformer_block_forward_and_backward(key):
    calls: list[int] = []
    gov = governor(key, calls)
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
    gov.attach(model)
    seen = []
    gov.poll = lambda: seen.append(1)  # count polls
    x = torch.zeros(1, 2)
    for block in model[0]:
        x = block(x)
    assert len(seen) == 3  # forward: before each block
    x.sum().backward()
    assert len(seen) == 6  # backward: at each block's output
    with torch.no_grad():
        model[0][0](torch.zeros(1, 2))
    assert len(seen) == 7  # no-grad passes poll in forward only


def test_config_rejects_more_threads_while_generating_than_threads():
    from schemas.run_config import RunConfig

    with pytest.raises(ValueError, match="learner.threads_while_generating"):
        RunConfig.model_validate({"learner": {"threads": 2, "threads_while_generating": 3}})


def test_an_unwritable_flag_never_fails_generation(key, tmp_path, caplog):
    flag = BusyFlag(key, 0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    flag.dir = blocker / "sub"  # a folder under a plain file cannot be created
    flag.path = flag.dir / "0.1"
    ran = []
    with flag.held():
        ran.append(1)
    with flag.held():
        ran.append(2)
    assert ran == [1, 2]
    assert sum("core sharing off" in r.message for r in caplog.records) == 1  # said once, not per call
