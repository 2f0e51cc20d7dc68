"""Dataset loading (JSONL, Parquet, chat, malformed rows, length filter) and the resumable PromptStream."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data import addition as task
from pipeline.data.datasets import DataError, PromptStream, get_field, load_split, render_prompt
from pipeline.data.tokenizer import build_char_tokenizer
from schemas.data_config import DataConfig, SyntheticTaskConfig


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


class _ChatTok:
    """Minimal stand-in for an HF tokenizer with a chat template (no hub here)."""

    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[0] * (len(t.split()) + add_special_tokens) for t in texts]}


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer(task.SYMBOLS, max_length=64)


def test_jsonl_common_columns(tmp_path):
    f = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "1+2=", "ground_truth": "3", "data_source": "arithmetic", "id": "x"},
            "",  # blank lines are not rows
            {"prompt": "2+2=", "reward_model": {"ground_truth": 4, "style": "rule"}},
            {
                "prompt": "3+3=",
                "ground_truth": None,
                "reward_model": {"ground_truth": "6"},
            },  # null: fall back
        ],
    )
    rows, rep = load_split(DataConfig(train_files=[f]), "train")
    assert rows == [
        {
            "prompt": "1+2=",
            "ground_truth": "3",
            "data_source": "arithmetic",
            "id": "x",
            "extra": {},
            "templated": False,
        },
        {
            "prompt": "2+2=",
            "ground_truth": "4",
            "data_source": "unknown",
            "id": "a-3",
            "extra": {},
            "templated": False,
        },
        {
            "prompt": "3+3=",
            "ground_truth": "6",
            "data_source": "unknown",
            "id": "a-4",
            "extra": {},
            "templated": False,
        },
    ]
    assert (rep.rows_read, rep.loaded, rep.bad_rows, rep.too_long) == (3, 3, 0, 0)
    eval_rows, eval_rep = load_split(DataConfig(train_files=[f]), "eval")
    assert eval_rows == [] and "eval off" in eval_rep.source


def test_parquet_nested_and_column_mapping(tmp_path):
    table = pa.table(
        {
            "question": ["1+1=", "3+4="],
            "meta": [{"answer": "2"}, {"answer": "7"}],
            "src": ["arithmetic", "arithmetic"],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    cfg = DataConfig(
        train_files=[str(tmp_path / "*.parquet")],
        prompt_key="question",
        ground_truth_key="meta.answer",
        data_source_key="src",
    )
    rows, rep = load_split(cfg, "train")
    assert [(r["prompt"], r["ground_truth"], r["data_source"]) for r in rows] == [
        ("1+1=", "2", "arithmetic"),
        ("3+4=", "7", "arithmetic"),
    ]
    assert rep.files == [str(tmp_path / "d.parquet")]


def test_chat_prompts_with_and_without_template(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    f = _jsonl(
        tmp_path / "c.jsonl", [{"prompt": msgs, "ground_truth": "2"}, {"prompt": "2+2=", "ground_truth": "4"}]
    )
    rows, _ = load_split(DataConfig(train_files=[f]), "train", tokenizer=_ChatTok())
    assert rows[0]["prompt"] == "<system>be brief<user>1+1=<assistant>"
    assert rows[1]["prompt"] == "2+2="  # plain strings pass through unless wrap_plain_prompts
    rows, _ = load_split(DataConfig(train_files=[f], wrap_plain_prompts=True), "train", tokenizer=_ChatTok())
    assert rows[1]["prompt"] == "<user>2+2=<assistant>"
    rows, _ = load_split(DataConfig(train_files=[f]), "train", tokenizer=None)
    assert rows[0]["prompt"] == "be brief\n1+1="
    assert render_prompt("x", None) == ("x", False)


def test_chat_prompts_need_a_chat_template(tmp_path, char_tok):
    """Messages given to a model whose tokenizer has no template: refused at load, naming the model and the
    field, even with on_bad_row='skip' (it is the model that is wrong, not a row)."""
    msgs = [{"role": "user", "content": "1+1="}]
    f = _jsonl(tmp_path / "c.jsonl", [{"question": msgs, "ground_truth": "2"}])
    char_tok.name_or_path = "/models/char-tiny"
    for on_bad_row in ("error", "skip"):
        cfg = DataConfig(train_files=[f], prompt_key="question", on_bad_row=on_bad_row)
        with pytest.raises(
            DataError, match=r"data.prompt_key 'question'.*\(/models/char-tiny\) has no chat_template"
        ):
            load_split(cfg, "train", tokenizer=char_tok)
    plain = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "ground_truth": "2"}])
    rows, _ = load_split(DataConfig(train_files=[plain]), "train", tokenizer=char_tok)
    assert rows[0]["prompt"] == "1+1=" and rows[0]["templated"] is False


def test_prompt_ids_are_what_hf_encodes(tmp_path):
    """A tokenizer whose encoding adds BOS and whose template writes it too (Llama-3 style): chat prompts are
    encoded as ``apply_chat_template(tokenize=True)`` encodes them (one BOS), plain prompts with the BOS the
    tokenizer adds; both kinds in one batch."""
    from pipeline.data.datasets import encode_rows

    tok = build_char_tokenizer(task.SYMBOLS, max_length=64)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }};{% endfor %}"
    msgs = [{"role": "user", "content": "12+3="}]
    f = _jsonl(
        tmp_path / "c.jsonl",
        [{"prompt": msgs, "ground_truth": "15"}, {"prompt": "1+2=", "ground_truth": "3"}],
    )
    rows, _ = load_split(DataConfig(train_files=[f]), "train", tokenizer=tok)
    want_chat = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert [r["templated"] for r in rows] == [True, False]
    got = encode_rows(rows, tok)
    assert got[0] == list(want_chat) and got[0].count(tok.bos_token_id) == 1
    assert got[1] == tok("1+2=")["input_ids"] and got[1][0] == tok.bos_token_id


@pytest.mark.parametrize(
    ("bad", "row_no", "field"),
    [
        ('{"prompt": "1+1=", "ground_truth": "2"', 2, "<json>"),
        ({"ground_truth": "2"}, 2, "prompt"),
        ({"prompt": "1+1="}, 2, "ground_truth or reward_model.ground_truth"),
        ({"prompt": "1+1=", "ground_truth": None}, 2, "ground_truth or reward_model.ground_truth"),
        ({"prompt": 5, "ground_truth": "2"}, 2, "prompt"),
        ({"prompt": [{"role": "user"}], "ground_truth": "2"}, 2, "prompt[0]"),
        ({"prompt": "1+1=", "ground_truth": ["2"]}, 2, "ground_truth"),
        ({"prompt": "1+1=", "ground_truth": "2", "data_source": 3}, 2, "data_source"),
        ("[1, 2]", 2, "<row>"),
        ({"prompt": "1+1=", "ground_truth": "2", "extra_info": [1]}, 2, "extra_info"),
        ({"prompt": "1+1=", "ground_truth": "2", "extra": "tests"}, 2, "extra"),
        ({"prompt": "1+1=", "ground_truth": "2", "extra": {"k": 1}, "extra_info": {"k": 2}}, 2, "extra"),
    ],
)
def test_bad_row_error_names_file_row_field(tmp_path, bad, row_no, field):
    f = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "ground_truth": "2"}, bad])
    with pytest.raises(DataError) as err:
        load_split(DataConfig(train_files=[f]), "train")
    msg = str(err.value)
    assert f"{f}: row {row_no}: field '{field}'" in msg and "on_bad_row='skip'" in msg


def test_skip_mode_counts_bad_rows(tmp_path):
    f = _jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": "1+1=", "ground_truth": "2"},
            "{oops",
            {"prompt": ""},
            {"prompt": "2+2=", "ground_truth": 4},
        ],
    )
    rows, rep = load_split(DataConfig(train_files=[f], on_bad_row="skip"), "train")
    assert [r["ground_truth"] for r in rows] == ["2", "4"]
    assert (rep.rows_read, rep.bad_rows, rep.loaded) == (4, 2, 2)
    assert "row 2" in rep.bad_examples[0] and "row 3" in rep.bad_examples[1]
    assert "2 malformed skipped" in rep.summary()


def test_non_utf8_row_names_file_and_row_and_skip_skips_it(tmp_path):
    f = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "1+1=", "ground_truth": "2"}).encode()
    bad = '{"prompt": "caf\u00e9 1+1=", "ground_truth": "2"}'.encode("latin-1")  # 0xe9: not UTF-8
    f.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(DataError) as err:
        load_split(DataConfig(train_files=[str(f)]), "train")
    assert f"{f}: row 2: field '<encoding>': not valid UTF-8" in str(err.value)
    assert "byte 0xe9" in str(err.value) and "on_bad_row='skip'" in str(err.value)
    rows, rep = load_split(DataConfig(train_files=[str(f)], on_bad_row="skip"), "train")
    assert [r["id"] for r in rows] == ["latin1-1", "latin1-3"]
    assert (rep.rows_read, rep.bad_rows, rep.loaded) == (3, 1, 2) and "row 2" in rep.bad_examples[0]


def test_row_extras_reach_the_verifier(tmp_path, char_tok):
    """verl's ``extra_info`` and covrl's ``extra`` become the sample's extras dict: here the code verifier's
    tests live only there (the ground truth is a placeholder), so a correct program scores 1 only if they
    arrive."""
    from actors.verifier import VerifierWorker
    from pipeline.driver.rollout import encode_prompts
    from schemas.verifier_config import VerifierConfig, VerifierSpec

    tests = {"inputs": ["2 3\n"], "outputs": ["5"]}
    f = _jsonl(
        tmp_path / "code.jsonl",
        [
            {"prompt": "1+1=", "ground_truth": "-", "data_source": "apps", "extra_info": {"tests": tests}},
            {"prompt": "1+2=", "ground_truth": "-", "data_source": "apps", "extra": {"tests": tests, "n": 1}},
            {"prompt": "1+3=", "ground_truth": "-", "extra_info": {"split": "a"}, "extra": {"n": 2}},
            {"prompt": "1+4=", "ground_truth": "-", "extra_info": None},
        ],
    )
    rows, _ = load_split(DataConfig(train_files=[f]), "train")
    assert [r["extra"] for r in rows] == [
        {"tests": tests},
        {"tests": tests, "n": 1},
        {"split": "a", "n": 2},
        {},
    ]
    batch = encode_prompts([dict(r, index=i) for i, r in enumerate(rows[:2])], char_tok, step=1)
    worker = VerifierWorker(VerifierConfig(default=VerifierSpec(name="code", options={"wall_s": 5.0})))
    try:
        program = "a, b = map(int, input().split())\nprint(a + b)"
        scores, reasons, _ = worker.score(
            batch.texts, [program] * 2, batch.ground_truths, batch.data_sources, batch.extras
        )
    finally:
        worker.close()
    assert scores.tolist() == [1.0, 1.0], reasons


def test_prompt_length_filter_counts(tmp_path, char_tok):
    f = _jsonl(tmp_path / "l.jsonl", [{"prompt": "1" * n + "=", "ground_truth": "1"} for n in (3, 8, 9, 20)])
    # lengths with <s>: 5, 10, 11, 22
    rows, rep = load_split(DataConfig(train_files=[f], max_prompt_tokens=10), "train", tokenizer=char_tok)
    assert len(rows) == 2 and rep.too_long == 2 and rep.length_checked
    rows, rep = load_split(DataConfig(train_files=[f], max_prompt_tokens=10), "train")
    assert len(rows) == 4 and not rep.length_checked  # no tokenizer: no lengths to check


def test_empty_and_missing_datasets(tmp_path, char_tok):
    f = _jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match="no usable prompts"):
        load_split(DataConfig(train_files=[f]), "train")
    long = _jsonl(tmp_path / "long.jsonl", [{"prompt": "1" * 50, "ground_truth": "1"}])
    with pytest.raises(DataError, match="1 longer than max_prompt_tokens=8"):
        load_split(DataConfig(train_files=[long], max_prompt_tokens=8), "train", tokenizer=char_tok)
    with pytest.raises(DataError, match="not found"):
        load_split(DataConfig(train_files=[str(tmp_path / "nope.jsonl")]), "train")
    with pytest.raises(DataError, match="not found"):
        load_split(DataConfig(train_files=[str(tmp_path / "*.parquet")]), "train")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.format"):
        load_split(DataConfig(train_files=[str(tmp_path / "x.csv")]), "train")
    with pytest.raises(DataError, match="at least one row"):
        PromptStream([])


def test_builtin_synthetic_dataset(char_tok):
    cfg = DataConfig(synthetic=SyntheticTaskConfig(n_train=300, n_eval=50))
    train, rep = load_split(cfg, "train", tokenizer=char_tok)
    held, _ = load_split(cfg, "eval", tokenizer=char_tok)
    assert len(train) == 300 and len(held) == 50 and rep.too_long == 0
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert train[0]["data_source"] == "arithmetic" and "synthetic" in rep.source


def test_synthetic_train_with_eval_files(tmp_path):
    f = _jsonl(tmp_path / "ev.jsonl", [{"prompt": "1+1=", "ground_truth": "2"}])
    cfg = DataConfig(eval_files=[f], synthetic=SyntheticTaskConfig(n_train=30, n_eval=5))
    assert len(load_split(cfg, "train")[0]) == 30
    assert [r["prompt"] for r in load_split(cfg, "eval")[0]] == ["1+1="]


def test_get_field_dotted_and_literal():
    rec = {"a": {"b": {"c": 1}}, "x.y": 2}
    assert get_field(rec, "a.b.c") == 1 and get_field(rec, "x.y") == 2
    assert get_field(rec, "a.z") is get_field(rec, "q")


def _rows(n):
    return [{"id": str(i)} for i in range(n)]


def _ids(batches):
    return [r["id"] for b in batches for r in b]


def test_stream_deterministic_epochs_and_boundaries():
    a, b = PromptStream(_rows(10), seed=7), PromptStream(_rows(10), seed=7)
    seq = _ids(a.next_batch(4) for _ in range(10))
    assert seq == _ids(b.next_batch(4) for _ in range(10))
    for e in range(4):  # every epoch is a permutation; consecutive epochs differ
        assert sorted(seq[10 * e : 10 * e + 10], key=int) == [str(i) for i in range(10)]
    assert seq[:10] != seq[10:20]
    assert PromptStream(_rows(5), shuffle=False).next_batch(7) == [
        {"id": str(i)} for i in (0, 1, 2, 3, 4, 0, 1)
    ]
    big = PromptStream(_rows(3), seed=1).next_batch(10)  # batch larger than the dataset spans epochs
    assert len(big) == 10


@pytest.mark.parametrize("interrupt_after", [1, 2, 5])  # step 1, mid-epoch, exactly at an epoch boundary
def test_stream_resume_equivalence(interrupt_after):
    n_rows, batch, steps = 12, 6, 9  # 2 batches per epoch: after 2 and 4 steps the position is at a boundary
    uninterrupted = PromptStream(_rows(n_rows), seed=3)
    ref = _ids(uninterrupted.next_batch(batch) for _ in range(steps))
    first = PromptStream(_rows(n_rows), seed=3)
    part1 = _ids(first.next_batch(batch) for _ in range(interrupt_after))
    assert interrupt_after != 2 or first.state_dict()["position"] == 0  # the boundary case
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptStream(_rows(n_rows), seed=3)
    resumed.load_state_dict(state)
    part2 = _ids(resumed.next_batch(batch) for _ in range(steps - interrupt_after))
    assert part1 + part2 == ref


def test_stream_resume_at_unnormalised_boundary_and_mismatch():
    ref = PromptStream(_rows(4), seed=0)
    ref.next_batch(4)
    expected = ref.next_batch(4)
    s = PromptStream(_rows(4), seed=0)
    s.load_state_dict({"epoch": 0, "position": 4})  # a state written by code that did not normalise
    assert s.next_batch(4) == expected and s.state_dict()["epoch"] == 2
    with pytest.raises(DataError, match="n_rows"):
        PromptStream(_rows(5), seed=0).load_state_dict(ref.state_dict())
    with pytest.raises(DataError, match="seed"):
        PromptStream(_rows(4), seed=1).load_state_dict(ref.state_dict())


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(1, 9),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=8),
    cut=st.integers(0, 8),
    seed=st.integers(0, 3),
)
def test_stream_resume_equivalence_property(n_rows, sizes, cut, seed):
    """For any batch-size sequence and interruption point, interrupted + resumed == uninterrupted."""
    cut = min(cut, len(sizes))
    ref_stream = PromptStream(_rows(n_rows), seed=seed)
    ref = _ids([ref_stream.next_batch(k) for k in sizes])
    first = PromptStream(_rows(n_rows), seed=seed)
    part1 = _ids([first.next_batch(k) for k in sizes[:cut]])
    resumed = PromptStream(_rows(n_rows), seed=seed)
    resumed.load_state_dict(first.state_dict())
    assert part1 + _ids([resumed.next_batch(k) for k in sizes[cut:]]) == ref


def test_verl_parquet_loads_as_is_and_routes_by_data_source(tmp_path):
    """A parquet file in verl's columns (prompt as chat messages, reward_model struct, extra_info struct,
    ability) loads unchanged; its math source goes to math-verify without any route in the config, a
    source the config routes goes where the config says, and extra_info reaches the verifier (the routed
    plug-in scores from extra_info alone)."""
    from actors.verifier import VerifierWorker
    from pipeline.data.chat_model import make_verl_rows
    from pipeline.data.tasks import verifier_config_for_run
    from pipeline.driver.rollout import encode_prompts
    from schemas.verifier_config import VerifierConfig, VerifierSpec

    own_row = {
        "data_source": "my_source",
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}],
        "ability": "other",
        "reward_model": {"style": "rule", "ground_truth": "-"},
        "extra_info": {"split": "train", "index": 9, "answer": "teal"},
    }
    verl = [*make_verl_rows(3), own_row]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "train.parquet")
    tok = build_char_tokenizer(task.SYMBOLS, max_length=512)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}assistant:"
    data = DataConfig(train_files=[str(tmp_path / "train.parquet")], max_prompt_tokens=None)
    rows, rep = load_split(data, "train", tokenizer=tok)
    assert (rep.loaded, rep.bad_rows) == (4, 0)
    assert [r["ground_truth"] for r in rows] == [r["reward_model"]["ground_truth"] for r in verl]
    assert [r["data_source"] for r in rows] == ["lighteval/MATH"] * 3 + ["my_source"]
    assert rows[0]["prompt"] == f"user:{verl[0]['prompt'][0]['content']};assistant:" and rows[0]["templated"]
    assert rows[3]["prompt"] == "system:be brief;user:name a colour;assistant:"
    # parquet unifies the struct: keys a row lacks come back as None, the row's own keys as written
    assert {k: v for k, v in rows[3]["extra"].items() if v is not None} == own_row["extra_info"]
    assert rows[0]["extra"]["question"] == verl[0]["extra_info"]["question"]

    plugin = VerifierSpec(name="tests.extras_verifier:AnswerInExtras")
    config = verifier_config_for_run(
        VerifierConfig(default=VerifierSpec(name="exact"), routes={"my_source": plugin}), data
    )
    assert config.routes["lighteval/MATH"].name == "math"
    batch = encode_prompts([dict(r, index=i) for i, r in enumerate(rows)], tok, step=1)
    answers = [f"The answer is \\boxed{{{r['ground_truth']}}}." for r in rows[:3]]
    responses = [answers[0], "so it is $\\frac{2}{4}$", answers[2], "teal"]
    worker = VerifierWorker(config)
    try:
        scores, reasons, stats = worker.score(
            batch.texts, responses, batch.ground_truths, batch.data_sources, batch.extras
        )
    finally:
        worker.close()
    assert scores.tolist() == [1.0, 0.0, 1.0, 1.0], reasons
    assert stats["verifier/by_verifier/math/count"] == 3 and stats["verifier/my_source/count"] == 1


def test_known_sources_route_only_file_runs_and_never_over_the_config():
    from pipeline.data.known_sources import MATH_SOURCES
    from pipeline.data.tasks import verifier_config_for_run
    from schemas.verifier_config import VerifierConfig, VerifierSpec

    files = DataConfig(train_files=["x.parquet"])
    mine = VerifierConfig(routes={"openai/gsm8k": VerifierSpec(name="numeric")})
    routes = verifier_config_for_run(mine, files).routes
    assert routes["openai/gsm8k"].name == "numeric"
    assert all(routes[s].name == "math" for s in MATH_SOURCES if s != "openai/gsm8k")
    synthetic = verifier_config_for_run(VerifierConfig(), DataConfig()).routes
    assert not set(MATH_SOURCES) & set(synthetic)


def test_start_prints_each_sources_verifier_and_why(capsys):
    from pipeline.train import print_routes
    from schemas.run_config import RunConfig

    cfg = RunConfig.model_validate(
        {
            "data": {"train_files": ["x.parquet"]},
            "verifier": {"default": {"name": "exact"}, "routes": {"openai/gsm8k": {"name": "numeric"}}},
        }
    )
    rows = [{"data_source": s} for s in ("lighteval/MATH", "lighteval/MATH", "openai/gsm8k", "mine")]
    print_routes(cfg, rows)
    assert capsys.readouterr().out.splitlines() == [
        "[covrl] verifier: data_source 'lighteval/MATH' (2 train rows) -> 'math' (built in)",
        "[covrl] verifier: data_source 'mine' (1 train rows) -> 'exact' (verifier.default)",
        "[covrl] verifier: data_source 'openai/gsm8k' (1 train rows) -> 'numeric' (verifier.routes)",
    ]
