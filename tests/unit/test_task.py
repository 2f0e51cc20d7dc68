"""The synthetic carry-chain task: splits, reference responses, scorer and format check."""

import numpy as np
import pytest

from pipeline.data import addition as task
from schemas.data_config import SyntheticTaskConfig


def test_reference_response_example():
    assert task.make_prompt(345, 678) == "345+678="
    assert task.make_response(345, 678, 3) == "5+8+0=13;4+7+1=12;3+6+1=10;#1023"
    assert task.make_response(100, 200, 3) == "0+0+0=0;0+0+0=0;1+2+0=3;#300"


def test_max_response_chars_bounds_all_responses():
    longest = max(len(task.make_response(a, b, 3)) for a, b in [(999, 999), (555, 555), (100, 100)])
    assert longest <= task.max_response_chars(3)


def test_splits_disjoint_deterministic_and_sized():
    cfg = SyntheticTaskConfig(n_train=5000, n_eval=500, seed=3)
    train, held = task.split_pairs(cfg, "train"), task.split_pairs(cfg, "eval")
    assert train.shape == (5000, 2) and held.shape == (500, 2)
    assert not set(map(tuple, train.tolist())) & set(map(tuple, held.tolist()))
    assert len(set(map(tuple, train.tolist()))) == 5000
    assert train.min() >= 100 and train.max() <= 999
    again = task.split_pairs(SyntheticTaskConfig(n_train=5000, n_eval=500, seed=3), "train")
    assert np.array_equal(train, again)
    other = task.split_pairs(SyntheticTaskConfig(n_train=5000, n_eval=500, seed=4), "train")
    assert not np.array_equal(train, other)


def test_rows_shape_and_ground_truth():
    cfg = SyntheticTaskConfig(n_train=20, n_eval=10)
    rows = task.make_rows(cfg, "eval")
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    for r in rows:
        assert set(r) == {"prompt", "ground_truth", "data_source", "id"}
        a, b = r["prompt"].rstrip("=").split("+")
        assert r["ground_truth"] == str(int(a) + int(b)) and r["data_source"] == "arithmetic"
    prompts, responses = task.make_sft_texts(cfg, "train")
    assert all(task.score_response(resp, str(eval(p[:-1])))[0] == 1.0 for p, resp in zip(prompts, responses))


def test_too_many_problems_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        SyntheticTaskConfig(digits=1, n_train=90, n_eval=20)


@pytest.mark.parametrize(
    ("response", "gt", "expected"),
    [
        ("5+8+0=13;4+7+1=12;3+6+1=10;#1023", "1023", (1.0, None)),
        ("5+8+0=13;4+7+1=12;3+6+1=10;#1023</s>", "1023", (1.0, None)),
        ("garbage #1023 ", "1023", (1.0, None)),  # only the marked answer counts
        ("5+8+0=13;4+7+1=12;3+6+1=10;#1022", "1023", (0.0, "wrong answer 1022")),
        ("5+8+0=13;4+7+1=12;3+6+1=10;1023", "1023", (0.0, "no marked answer")),
        ("#", "1023", (0.0, "empty answer")),
        ("#12a", "1023", (0.0, "malformed answer '12a'")),
        ("#1#1023", "1023", (1.0, None)),  # the last mark wins
    ],
)
def test_score_response(response, gt, expected):
    assert task.score_response(response, gt) == expected


def test_format_ok():
    good = "5+8+0=13;4+7+1=12;3+6+1=10;#1023"
    assert task.format_ok(good) and task.format_ok(good, digits=3) and task.format_ok(good + "</s>")
    assert not task.format_ok(good, digits=4)
    assert not task.format_ok("5+8+0=13;#")
    assert not task.format_ok("1023")
    assert not task.format_ok("5+8+2=15;#15")  # carry is 0 or 1
    assert not task.format_ok(good + "x")
