"""The countdown task: solution enumeration, splits, SFT texts, the replaying verifier, selection by config
and the route that sends its rows to its verifier."""

import itertools
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data import countdown as cd
from pipeline.data.datasets import load_split
from pipeline.data.tasks import task_routes, task_spec, verifier_config_for_run
from pipeline.data.tokenizer import build_char_tokenizer
from pipeline.data.verifiers import load_verifier
from pipeline.driver.config_io import ConfigError, dump_config, load_config
from schemas.data_config import CountdownTaskConfig, DataConfig, SyntheticTaskConfig
from schemas.verifier_config import VerifierConfig, VerifierSpec

SMALL = CountdownTaskConfig(n_train=300, n_eval=100, seed=3)


def _multiset_target(p: cd.Problem) -> tuple[tuple[int, ...], int]:
    return tuple(sorted(p.numbers)), p.target


# ------------------------------------------------------------------------------------------ generator


def test_solutions_worked_by_hand():
    # 8,6,4 -> 10: 8+6-4, 8-4+6, 6-4+8; every other pairing misses (8+4=12 -> 18/6/72, 6+4=10 -> 18/2/80,
    # 8-6=2 -> 6/2/8, 6*4=24 -> 32/16/192, 8*4=32, 8*6=48 -> far off).
    assert cd.solve((8, 6, 4), 10) == ("6-4=2;8+2=10;", "8+6=14;14-4=10;", "8-4=4;6+4=10;")
    assert cd.solve([4, 8, 6], 10) == cd.solve((8, 6, 4), 10)  # order of the given numbers is irrelevant
    # equal numbers give one step, not one per copy: 3,3,3 -> 18 only as (3+3)*3
    assert cd.solve((3, 3, 3), 18) == ("3+3=6;6*3=18;",)
    assert cd.solve((1, 1, 1), 50) == ()


def test_default_problem_set_and_solution_counts():
    # pinned: docs/tasks.md reports these. Default (numbers in 1..20): 19152 / 10826 = 1.77 distinct
    # solutions per problem; numbers in 1..9: 1883 / 1319 = 1.43.
    problems = cd.all_problems(CountdownTaskConfig())
    counts = Counter(len(p.solutions) for p in problems)
    assert len(problems) == 10826 and sum(k * n for k, n in counts.items()) == 19152
    assert counts == {1: 6441, 2: 734, 3: 3384, 4: 255, 5: 1, 6: 11}
    small = Counter(len(p.solutions) for p in cd.all_problems(CountdownTaskConfig(max_number=9)))
    assert small == {1: 970, 2: 141, 3: 201, 4: 7}
    four = cd.all_problems(CountdownTaskConfig(numbers=4, max_number=9))
    assert np.mean([len(p.solutions) for p in four]) > 4  # 4 numbers: many more paths


def test_splits_disjoint_deterministic_and_sized():
    train, held = cd.split_problems(SMALL, "train"), cd.split_problems(SMALL, "eval")
    assert len(train) == 300 and len(held) == 100
    keys_train, keys_held = {_multiset_target(p) for p in train}, {_multiset_target(p) for p in held}
    assert len(keys_train) == 300 and not keys_train & keys_held  # disjoint by problem, not by prompt text
    again = CountdownTaskConfig(n_train=300, n_eval=100, seed=3)
    assert cd.make_rows(again, "train") == cd.make_rows(SMALL, "train")
    other = CountdownTaskConfig(n_train=300, n_eval=100, seed=4)
    assert cd.make_rows(other, "train") != cd.make_rows(SMALL, "train")
    everything = CountdownTaskConfig(n_eval=100)  # n_train None: every problem not held out
    assert len(cd.split_problems(everything, "train")) == 10826 - 100
    with pytest.raises(ValueError, match="unknown split"):
        cd.split_problems(SMALL, "test")


def test_every_problem_is_in_range_and_solvable():
    cfg = CountdownTaskConfig(numbers=3, min_number=2, max_number=7, min_target=20, max_target=60)
    for p in cd.all_problems(cfg):
        assert len(p.numbers) == 3 and all(2 <= x <= 7 for x in p.numbers) and 20 <= p.target <= 60
        assert p.solutions and p.solutions == cd.solve(p.numbers, p.target)
        truth = cd.puzzle_text(p.numbers, p.target)
        assert all(cd.score_response(f"{s}#{p.target}", truth) == (1.0, None) for s in p.solutions)


def test_rows_and_sft_texts():
    rows = cd.make_rows(SMALL, "eval")
    assert len({r["id"] for r in rows}) == 100
    for r, p in zip(rows, cd.split_problems(SMALL, "eval"), strict=True):
        assert r["prompt"] == r["ground_truth"] + "=" and r["data_source"] == "countdown"
        assert cd.parse_puzzle(r["ground_truth"]) == (list(p.numbers), p.target)
    prompts, responses = cd.make_sft_texts(SMALL, "train")
    train = cd.split_problems(SMALL, "train")
    assert len(prompts) == len(responses) == 300
    picked_other = 0
    for prompt, resp, p in zip(prompts, responses, train, strict=True):
        steps, _, answer = resp.rpartition("#")
        assert steps in p.solutions and answer == str(p.target)  # ONE valid solution per problem
        assert cd.score_response(resp, prompt[:-1]) == (1.0, None)
        picked_other += steps != p.solutions[0]
    assert picked_other > 0  # drawn at random among the solutions, not always the first
    assert cd.make_sft_texts(CountdownTaskConfig(n_train=300, n_eval=100, seed=3)) == (prompts, responses)
    ref_prompts, ref_responses, index = cd.reference_texts(SMALL, "eval")
    assert len(ref_responses) == sum(len(p.solutions) for p in cd.split_problems(SMALL, "eval"))
    assert index == sorted(index) and set(index) == set(range(100))
    longest = max(len(r) for r in ref_responses + responses)
    assert longest <= cd.max_response_chars(SMALL)


def test_too_many_problems_names_the_fields():
    with pytest.raises(ValueError, match=r"data\.synthetic\.n_eval = 1400 .*exceeds the 1319"):
        cd.make_rows(CountdownTaskConfig(max_number=9, n_eval=1400), "train")
    with pytest.raises(ValueError, match=r"data\.synthetic\.n_train = 11000"):
        task_spec("countdown").check(CountdownTaskConfig(n_train=11000))


# ------------------------------------------------------------------------------------------- verifier

P = "8,6,4>10"


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("8+6=14;14-4=10;#10", None),
        ("6+8=14;14-4=10;#10</s>", None),  # either operand order; EOS text ignored
        ("4-4=0;8+6=14;#14", "number not available in step 1: 4"),  # 4 given once
        ("8+6=14;14-4=10", "no marked answer"),
        ("8+6=14;14-4=10;#", "malformed answer ''"),
        ("8+6=14;14-4=10;#1o", "malformed answer '1o'"),
        ("#10", "no steps before the answer"),
        ("8+6=14;14-4=10#10", "malformed step 2 '14-4=10' (a step ends with ';')"),
        ("8 + 6=14;14-4=10;#10", "malformed step 1 '8 + 6=14'"),
        ("8/4=2;6+2=8;#8", "malformed step 1 '8/4=2'"),  # no division
        ("4-8=-4;-4+14=10;#10", "malformed step 1 '4-8=-4' (values must not be negative)"),
        ("08+6=14;14-4=10;#10", "malformed step 1 '08+6=14'"),  # no leading zeros
        ("8+6=15;15-5=10;#10", "wrong arithmetic in step 1: 8+6=15 (8+6 is 14)"),
        ("8+6=14;14-5=9;#9", "number not available in step 2: 5 (not given, or already used)"),
        ("8+6=14;14-6=8;#8", "number not available in step 2: 6 (not given, or already used)"),  # reused
        ("8+6=14;#14", "unused number(s) [4]: every given number must be used once"),
        ("8+6=14;14*4=56;#56", "wrong final value 56 (target 10)"),
        ("8+6=14;14-4=10;#11", "wrong answer 11 (target 10)"),
        ("8+6=14;14-4=10;10-4=6;#6", "number not available in step 3: 4"),  # extra step
    ],
)
def test_score_response_reasons(response, reason):
    score, why = cd.score_response(response, P)
    assert score == (1.0 if reason is None else 0.0)
    assert (why is None) if reason is None else why.startswith(reason)


def test_intermediate_results_are_used_once_like_numbers():
    # 4 numbers: the two halves are computed first, then combined (intermediates used later, once each)
    assert cd.score_response("9-3=6;5*4=20;20+6=26;#26", "9,3,5,4>26") == (1.0, None)
    reused = cd.score_response("9-3=6;6*6=36;36-5=31;31-4=27;#27", "9,3,5,4>27")
    assert reused[0] == 0.0 and reused[1].startswith("number not available in step 2: 6")
    # an intermediate equal to a given number is interchangeable with it
    assert cd.score_response("8-4=4;4+4=8;#8", "8,4,4>8") == (1.0, None)


def test_bad_ground_truth_is_reported():
    assert cd.score_response("8+6=14;14-4=10;#10", "10") == (
        0.0,
        "bad ground truth '10': expected 'n1,n2,...>target'",
    )


def test_plugin_scores_like_the_pure_function():
    verifier = load_verifier({"name": "countdown"})
    responses = ["8+6=14;14-4=10;#10", "8+6=14;#14", "junk"]
    got = verifier.score([P + "="] * 3, responses, [P] * 3, [{}] * 3)
    assert [tuple(s) for s in got] == [cd.score_response(r, P) for r in responses]
    assert [s.score for s in got] == [1.0, 0.0, 0.0]


def _random_chain(rng: random.Random, numbers: list[int]) -> tuple[list[str], list[str], int]:
    """A random valid chain (either operand order), its canonical form and its final value."""
    pool, written, canonical = list(numbers), [], []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        op = rng.choice([o for o in cd.OPS if o != "-" or a >= b])
        r = cd.apply_op(a, op, b)
        written.append(f"{a}{op}{b}={r};")
        hi, lo = (a, b) if op == "-" else (max(a, b), min(a, b))
        canonical.append(f"{hi}{op}{lo}={r};")
        pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [r]
    return written, canonical, pool[0]


@settings(max_examples=150, deadline=None)
@given(
    numbers=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_enumeration_matches_the_verifier(numbers, seed):
    """Every enumerated solution scores 1 (in any shown number order), and every valid chain written at
    random is, canonicalised, among the enumerated solutions of its final value (the enumeration is
    complete)."""
    rng = random.Random(seed)
    shown = rng.sample(numbers, len(numbers))
    for target, sols in cd.solutions_by_target(tuple(numbers)).items():
        truth = cd.puzzle_text(shown, target)
        for s in sols:
            assert cd.score_response(f"{s}#{target}", truth) == (1.0, None), (s, truth)
    written, canonical, value = _random_chain(rng, numbers)
    assert cd.score_response("".join(written) + f"#{value}", cd.puzzle_text(shown, value)) == (1.0, None)
    assert "".join(canonical) in cd.solve(numbers, value)
    assert cd.score_response("".join(written) + f"#{value + 1}", cd.puzzle_text(shown, value))[0] == 0.0


# ------------------------------------------------------------------------------- config and routing


def test_selected_by_one_switch_addition_stays_default():
    cfg = load_config(None, ["data.synthetic.task=countdown"])
    assert cfg.data.synthetic == CountdownTaskConfig()
    default = load_config(None, [])
    assert default.data.synthetic == SyntheticTaskConfig() and default.data.synthetic.task == "addition"
    assert load_config(None, ["data.synthetic.digits=4"]).data.synthetic.digits == 4  # old overrides work
    four = load_config(None, ["data.synthetic.task=countdown", "data.synthetic.numbers=4"])
    assert four.data.synthetic.numbers == 4


def test_countdown_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.synthetic.task=countdown", "data.synthetic.n_eval=128"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.synthetic.task=sudoku"], "data.synthetic: task must be 'addition' or 'countdown'"),
        (
            ["data.synthetic.task=countdown", "data.synthetic.digits=3"],
            "data.synthetic.digits: not a field of 'countdown'",
        ),
        (["data.synthetic.numbers=3"], "data.synthetic.numbers: not a field of 'addition'"),
        (
            ["data.synthetic.task=countdown", "data.synthetic.numbers=5"],
            "data.synthetic.numbers: Input",
        ),
        (
            ["data.synthetic.task=countdown", "data.synthetic.min_number=5", "data.synthetic.max_number=4"],
            "min_number = 5 must be <= max_number = 4",
        ),
        (
            ["data.synthetic.task=countdown", "data.synthetic.min_target=50", "data.synthetic.max_target=20"],
            "min_target = 50 must be <= max_target = 20",
        ),
    ],
)
def test_bad_task_settings_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_split_sizes_checked_before_start_up_name_the_field():
    from pipeline.train import InputError, check_task

    with pytest.raises(InputError, match=r"data\.synthetic\.n_eval = 20000"):
        check_task(load_config(None, ["data.synthetic.task=countdown", "data.synthetic.n_eval=20000"]))
    check_task(load_config(None, ["data.synthetic.task=countdown"]))  # the defaults pass


def test_builtin_task_rows_route_to_their_verifier():
    countdown_data = DataConfig(synthetic=CountdownTaskConfig())
    assert task_routes(countdown_data) == {"countdown": VerifierSpec(name="countdown")}
    assert task_routes(DataConfig()) == {"arithmetic": VerifierSpec(name="arithmetic")}
    assert task_routes(DataConfig(train_files=["x.jsonl"], synthetic=CountdownTaskConfig())) == {}
    resolved = verifier_config_for_run(VerifierConfig(), countdown_data)
    assert resolved.routes == {"countdown": VerifierSpec(name="countdown")}
    assert resolved.default == VerifierConfig().default
    mine = VerifierConfig(routes={"countdown": VerifierSpec(name="exact")})
    assert verifier_config_for_run(mine, countdown_data).routes == mine.routes  # the user's route wins


def test_countdown_rows_reach_the_countdown_verifier():
    from actors.verifier import VerifierWorker

    data = DataConfig(synthetic=SMALL)
    rows, report = load_split(data, "eval")
    assert "countdown" in report.source and {r["data_source"] for r in rows} == {"countdown"}
    p = cd.split_problems(SMALL, "eval")[0]
    good = p.solutions[0] + f"#{p.target}"
    responses = [good, good.replace("#", "#9"), good.split(";")[0] + f";#{p.target}"]
    worker = VerifierWorker(verifier_config_for_run(VerifierConfig(), data))
    try:
        scores, reasons, stats = worker.score(
            prompts=[rows[0]["prompt"]] * 3,
            responses=responses,
            ground_truths=[rows[0]["ground_truth"]] * 3,
            data_sources=[rows[0]["data_source"]] * 3,
        )
    finally:
        worker.close()
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert reasons[0] is None and reasons[1].startswith("wrong answer") and reasons[2].startswith("unused")
    assert stats["verifier/by_verifier/countdown/count"] == 3 and stats["verifier/countdown/count"] == 3


def test_char_tokenizer_covers_every_countdown_text():
    tok = build_char_tokenizer(cd.SYMBOLS, max_length=64)
    prompts, responses = cd.make_sft_texts(SMALL, "train")
    ids = tok([p + r for p, r in itertools.islice(zip(prompts, responses), 200)])["input_ids"]
    assert all(tok.unk_token_id not in x for x in ids)
