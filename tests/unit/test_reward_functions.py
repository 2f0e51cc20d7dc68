"""verl- and TRL-style reward functions as verifiers: the shape read from the signature at config load,
the refusal of any other signature (naming the import path and the accepted shapes), and the adapters'
calls and results. The functions below are loaded by import path (``<this module>:name``)."""

from __future__ import annotations

import math
import re

import pytest

from pipeline.data.verifiers import VerifierLoadError, load_verifier
from pipeline.data.verifiers.base import Score, check_verifiers, coerce_scores, merge_stats, summarize
from pipeline.data.verifiers.functions import TRL, VERL, detect_shape
from schemas.verifier_config import FormatRewardSpec, VerifierConfig, VerifierSpec

HERE = __name__
CALLS: list[dict] = []


def verl_plain(data_source, solution_str, ground_truth, extra_info=None):
    CALLS.append({"data_source": data_source, "extra_info": extra_info})
    return float(solution_str == ground_truth)


def verl_no_extra(data_source, solution_str, ground_truth):
    return 0.5


def verl_dict(data_source, solution_str, ground_truth, extra_info=None, scale=1.0):
    return {"score": scale * (solution_str == ground_truth), "acc": solution_str == ground_truth, "pred": "x"}


def verl_no_score_key(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}


def trl_kwargs(prompts, completions, **kwargs):
    CALLS.append(kwargs)
    return [None if c == "skip" else float(c == g) for c, g in zip(completions, kwargs["ground_truth"])]


def trl_named(completions, solution):
    return [float(c == s) for c, s in zip(completions, solution)]


def trl_short(prompts, completions, **kwargs):
    return [1.0]


def trl_nan(prompts, completions, **kwargs):
    return [math.nan] * len(completions)


def two_args(x, y):
    return 1.0


def trl_needs_ids(prompts, completions, completion_ids, **kwargs):
    return [0.0] * len(completions)


def verl_positional_only(data_source, solution_str, ground_truth, /):
    return 1.0


class NoScore:
    pass


NOT_CALLABLE = 3


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


@pytest.mark.parametrize(
    "fn, options, shape",
    [
        (verl_plain, {}, VERL),
        (verl_no_extra, {}, VERL),
        (verl_dict, {"scale": 2.0}, VERL),
        (trl_kwargs, {}, TRL),
        (trl_named, {}, TRL),
    ],
)
def test_shape_is_read_from_the_signature(fn, options, shape):
    assert detect_shape(fn, f"{HERE}:{fn.__name__}", options) == shape


@pytest.mark.parametrize(
    "name, options, why",
    [
        ("two_args", {}, r"two_args\(x, y\) takes neither 'solution_str' \(verl\) nor 'completions' \(TRL\)"),
        ("verl_plain", {"scale": 2}, r"cannot be called with options \['scale'\]"),
        ("trl_needs_ids", {}, r"requires \['completion_ids'\], which covrl's verifier does not have"),
        ("verl_positional_only", {}, r"positional-only"),
        ("NoScore", {}, r"class NoScore has no score method"),
        ("NOT_CALLABLE", {}, r"it is a int, not a class or a function"),
    ],
)
def test_a_signature_of_no_accepted_shape_is_refused_at_config_load(name, options, why):
    config = VerifierConfig(routes={"src": VerifierSpec(name=f"{HERE}:{name}", options=options)})
    with pytest.raises(VerifierLoadError) as err:
        check_verifiers(config)
    message = str(err.value)
    assert message.startswith(f"verifier.routes.src: verifier '{HERE}:{name}': ")
    assert re.search(why, message), message
    for shape in (
        "score(prompts, responses, ground_truths, extras)",
        "compute_score(data_source, solution_str, ground_truth, extra_info=None)",
        "f(prompts, completions, **kwargs)",
    ):
        assert shape in message


def test_accepted_functions_pass_the_config_check():
    check_verifiers(
        VerifierConfig(
            default=VerifierSpec(name=f"{HERE}:verl_dict", options={"scale": 2.0}),
            routes={
                "a": VerifierSpec(name=f"{HERE}:trl_kwargs"),
                "b": VerifierSpec(name=f"{HERE}:trl_named"),
            },
        )
    )


def test_verl_adapter_passes_keywords_and_reads_dict_results():
    plain = load_verifier(f"{HERE}:verl_plain")
    got = plain.score(["p", "p"], ["7", "8"], ["7", "7"], [{"k": 1}, {}], data_sources=["gsm8k", "math"])
    assert got == [Score(1.0), Score(0.0)]
    assert CALLS == [
        {"data_source": "gsm8k", "extra_info": {"k": 1}},
        {"data_source": "math", "extra_info": {}},
    ]
    assert load_verifier(f"{HERE}:verl_no_extra").score(["p"], ["r"], ["t"], [{"k": 1}]) == [Score(0.5)]

    scaled = load_verifier({"name": f"{HERE}:verl_dict", "options": {"scale": 2.0}})
    got = scaled.score(["p", "p"], ["7", "8"], ["7", "7"], [{}, {}])
    # Numbers and bools of the dict become info; the string 'pred' is not a metric.
    assert got == [(2.0, None), (0.0, None)] and [s.info for s in got] == [{"acc": 1.0}, {"acc": 0.0}]
    with pytest.raises(ValueError, match=r"returned a dict without a 'score' key \(keys: \['acc'\]\)"):
        load_verifier(f"{HERE}:verl_no_score_key").score(["p"], ["r"], ["t"], [{}])


def test_trl_adapter_passes_columns_as_lists_and_none_fails_the_sample():
    trl = load_verifier(f"{HERE}:trl_kwargs")
    got = trl.score(
        ["p0", "p1", "p2"],
        ["7", "skip", "9"],
        ["7", "7", "8"],
        [{"unit": "m"}, {}, {"unit": "s", "n": 2}],
        data_sources=["a", "b", "a"],
    )
    assert [s.score for s in got] == [1.0, 0.0, 0.0]
    assert got[0].reason is None and got[2].reason is None
    assert got[1].reason == f"reward function '{HERE}:trl_kwargs' returned None for this sample"
    assert CALLS == [
        {
            "ground_truth": ["7", "7", "8"],
            "data_source": ["a", "b", "a"],
            "n": [None, None, 2],
            "unit": ["m", None, "s"],
        }
    ]
    # An option of the same name as an extras column wins (it is the run's setting).
    with_option = load_verifier({"name": f"{HERE}:trl_kwargs", "options": {"unit": "km"}})
    with_option.score(["p"], ["7"], ["7"], [{"unit": "m"}])
    assert CALLS[-1]["unit"] == "km"
    # Without **kwargs only the named columns are passed; a missing one is named with what there is.
    named = load_verifier(f"{HERE}:trl_named")
    assert named.score(["p"], ["x"], ["t"], [{"solution": "x"}]) == [Score(1.0)]
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['solution'\]; these samples have"):
        named.score(["p"], ["x"], ["t"], [{}])
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        load_verifier(f"{HERE}:trl_short").score(["p", "p"], ["a", "b"], ["a", "b"], [{}, {}])


def test_non_finite_results_are_refused_like_any_plug_in():
    """The adapters pass NaN on; ``coerce_scores`` (what the worker applies to every plug-in) refuses it,
    so the sample scores 0 with the reason, as for a class plug-in."""
    nan = {"name": f"{HERE}:verl_dict", "options": {"scale": math.nan}}
    for raw in (
        load_verifier(nan).score(["p"], ["7"], ["7"], [{}]),
        load_verifier(f"{HERE}:trl_nan").score(["p"], ["7"], ["7"], [{}]),
    ):
        with pytest.raises(ValueError, match="non-finite"):
            coerce_scores(raw, 1, "plug-in")


def test_format_wrapper_passes_data_sources_to_a_reward_function():
    config = VerifierConfig(
        default=VerifierSpec(name=f"{HERE}:verl_plain"),
        format_reward=FormatRewardSpec(pattern="#", bonus=0.5),
    )
    from pipeline.data.verifiers.base import DEFAULT_ROUTE, call_score, route_specs

    wrapped = load_verifier(route_specs(config)[DEFAULT_ROUTE])
    got = call_score(wrapped, ["p", "p"], ["#7", "8"], ["#7", "7"], [{}, {}], ["s1", "s2"])
    assert [s.score for s in got] == [1.5, 0.0]
    assert [c["data_source"] for c in CALLS] == ["s1", "s2"]


def test_info_metrics_are_means_over_the_samples_that_report_them_and_merge_by_count():
    infos = [{"acc": 1.0}, None, {"acc": 0.0}, {"acc": 1.0}]
    a = summarize([1, 0, 0], ["ok"] * 3, ["s", "s", "t"], ["v"] * 3, infos[:3])
    assert a["verifier/s/info/acc/mean"] == 1.0 and a["verifier/s/info/acc/count"] == 1.0
    assert a["verifier/info/acc/mean"] == 0.5 and "verifier/t/info/acc/mean" in a
    b = summarize([1], ["ok"], ["s"], ["v"], infos[3:])
    merged = merge_stats([a, b])
    assert merged["verifier/info/acc/mean"] == pytest.approx(2 / 3)
    assert merged["verifier/info/acc/count"] == 3.0 and merged["verifier/s/info/acc/mean"] == 1.0


def test_a_column_a_trl_function_requires_is_checked_against_the_rows_at_load():
    from pipeline.data.verifiers.functions import check_columns

    config = VerifierConfig(
        default=VerifierSpec(name=f"{HERE}:verl_plain"), routes={"qa": VerifierSpec(name=f"{HERE}:trl_named")}
    )
    rows = [
        {"data_source": "qa", "extra": {"solution": "x"}},
        {"data_source": "other", "extra": {}},  # routed to the verl function: needs no column
    ]
    check_columns(config, rows, "train")
    rows.append({"data_source": "qa", "extra": {"answer": "x"}})
    with pytest.raises(VerifierLoadError) as err:
        check_columns(config, rows, "train")
    assert str(err.value) == (
        f"verifier.routes.qa: reward function '{HERE}:trl_named' needs the column(s) ['solution'], but train "
        "row 2 (data_source 'qa') has extras ['answer']; add them to the rows' extra_info, or give those "
        "arguments a default"
    )
