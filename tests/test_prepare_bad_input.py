import json

import pytest
from conftest import openai, sharegpt, write_jsonl
from datasets import load_from_disk

from fusechat import prepare
from fusechat.config import load_config
from fusechat.errors import DataError

SKIP = {"on_bad_record": "skip"}


def run_prepare(config_path):
    out = prepare.run(load_config(config_path))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return load_from_disk(str(out / "dataset")), manifest


def prepare_error(config_path):
    with pytest.raises(DataError) as exc:
        prepare.run(load_config(config_path))
    return str(exc.value)


def assert_nothing_written(tmp_path):
    run_dir = tmp_path / "run"
    assert not (run_dir / "prepared" / "manifest.json").exists()
    if run_dir.exists():
        leftovers = [p.name for p in run_dir.iterdir() if "prepared" in p.name]
        assert leftovers == []


def write_lines(path, lines):
    """JSONL from records, ready-made str lines or raw bytes lines."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def message_line(message, where):
    """The one listed line of a DataError message that starts with ``where``."""
    found = [line.strip() for line in message.splitlines() if line.strip().startswith(f"{where}: ")]
    assert len(found) == 1, (where, message)
    return found[0]


NON_UTF8_PREFIX = b'{"conversations": [{"from": "human", "value": "caf'
NON_UTF8 = NON_UTF8_PREFIX + b'\xe9"}, {"from": "gpt", "value": "ok"}]}'

# (name, line, reason, text the listed error must contain)
BAD_CASES = [
    ("malformed_json", '{"conversations": [{"from": "human", "value": "hi"}', "malformed_json", "not valid JSON"),
    (
        "sharegpt_bot",
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}, {"from": "bot", "value": "x"}]},
        "unknown_role",
        "conversations[2].from",
    ),
    (
        "openai_tool",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
        "unknown_role",
        "messages[1].role",
    ),
    ("empty_sharegpt", sharegpt("question", "   "), "empty_content", "conversations[1].value is empty"),
    ("empty_openai", openai("", "answer"), "empty_content", "messages[0].content is empty"),
    (
        "two_users",
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]},
        "consecutive_user_turns",
        "conversations[0] and conversations[1]",
    ),
    ("no_assistant", sharegpt("is anybody there?"), "no_assistant_turn", "no assistant turn"),
    ("non_utf8", NON_UTF8, "not_utf8", f"not valid UTF-8 (byte 0xe9 at column {len(NON_UTF8_PREFIX) + 1})"),
    ("not_an_object", "[1, 2, 3]", "not_an_object", "must be a JSON object, got list"),
    ("string_record", '"just a string"', "not_an_object", "got str"),
    (
        "late_system",
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "yo"},
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "ok"},
                {"from": "gpt", "value": "fine"},
            ]
        },
        "misplaced_system",
        "conversations[2] is a system message after the conversation started",
    ),
    (
        "starts_with_assistant",
        {"messages": [{"role": "assistant", "content": "welcome"}, {"role": "user", "content": "thanks"}]},
        "starts_with_assistant",
        "messages[0] is an assistant turn before any user turn",
    ),
]
BAD_IDS = [case[0] for case in BAD_CASES]


def good(n):
    return sharegpt(f"question {n}", f"answer {n}", id=f"good{n}")


@pytest.mark.parametrize("name, bad, reason, text", BAD_CASES, ids=BAD_IDS)
def test_bad_record_stops_prepare(tmp_path, make_config, name, bad, reason, text):
    data = write_lines(tmp_path / "train.jsonl", [good(1), bad, good(2)])
    message = prepare_error(make_config([data]))
    assert "1 bad record(s)" in message
    listed = message_line(message, f"{data}:2")
    assert text in listed
    assert f"{data}:1:" not in message
    assert f"{data}:3:" not in message
    assert "on_bad_record: skip" in message
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name, bad, reason, text", BAD_CASES, ids=BAD_IDS)
def test_bad_record_skipped_and_counted(tmp_path, make_config, name, bad, reason, text):
    data = write_lines(tmp_path / "train.jsonl", [good(1), bad, good(2)])
    ds, manifest = run_prepare(make_config([data], data=SKIP))
    counts = manifest["counts"]
    assert counts["records"] == 3
    assert counts["kept"] == 2
    assert counts["skipped"] == {reason: 1}
    assert sorted(ds["id"]) == ["good1", "good2"]
    assert manifest["complete"] is True


def test_all_bad_records_listed_in_one_error(tmp_path, make_config):
    first = write_lines(
        tmp_path / "a.jsonl",
        [
            good(1),  # 1
            "{not json",  # 2
            "",  # 3: blank lines are skipped but still counted for line numbers
            good(2),  # 4
            sharegpt("hi", ""),  # 5
        ],
    )
    second = write_lines(
        tmp_path / "b.jsonl",
        [
            openai("hi", "yo"),  # 1
            openai("hi", "yo", "more", "yes"),  # 2
            b'{"messages": [{"role": "user", "content": "\xff"}]}',  # 3
            {"messages": [{"role": "function", "content": "x"}]},  # 4
        ],
    )
    message = prepare_error(make_config([first, second]))
    assert message.startswith("4 bad record(s) in the training data:")
    assert "not valid JSON" in message_line(message, f"{first}:2")
    assert "conversations[1].value is empty" in message_line(message, f"{first}:5")
    assert "byte 0xff" in message_line(message, f"{second}:3")
    assert "messages[0].role" in message_line(message, f"{second}:4")
    assert "'function'" in message_line(message, f"{second}:4")
    for ok in (f"{first}:1:", f"{first}:3:", f"{first}:4:", f"{second}:1:", f"{second}:2:"):
        assert ok not in message
    assert_nothing_written(tmp_path)


def test_every_bad_case_listed_in_one_error(tmp_path, make_config):
    lines = [case[1] for case in BAD_CASES]
    data = write_lines(tmp_path / "train.jsonl", [good(0), *lines])
    message = prepare_error(make_config([data]))
    assert message.startswith(f"{len(BAD_CASES)} bad record(s)")
    for lineno, (_, _, _, text) in enumerate(BAD_CASES, start=2):
        assert text in message_line(message, f"{data}:{lineno}")
    assert_nothing_written(tmp_path)


def test_long_error_lists_first_records_and_counts_the_rest(tmp_path, make_config):
    n = prepare.MAX_LISTED_ERRORS + 5
    data = write_lines(tmp_path / "train.jsonl", [good(0)] + ["{"] * n)
    message = prepare_error(make_config([data]))
    assert message.startswith(f"{n} bad record(s)")
    assert f"{data}:{prepare.MAX_LISTED_ERRORS + 1}: " in message
    assert f"{data}:{prepare.MAX_LISTED_ERRORS + 2}: " not in message
    assert "... and 5 more" in message
    assert_nothing_written(tmp_path)


def test_skip_counts_each_reason(tmp_path, make_config):
    data = write_lines(
        tmp_path / "train.jsonl",
        [
            good(1),
            "{oops",
            "{oops again",
            "",
            sharegpt("hi", "", id="empty1"),
            openai("   ", "answer", id="empty2"),
            openai("  hi", "\t"),
            good(2),
            {"conversations": [{"from": "bot", "value": "hi"}]},
            {"messages": [{"role": "tool", "content": "x"}]},
            NON_UTF8,
            "42",
            "null",
            sharegpt("just asking"),
            {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            good(3),
            sharegpt("q", "a", "q2", "a2", id="good4"),
        ],
    )
    ds, manifest = run_prepare(make_config([data], data=SKIP))
    counts = manifest["counts"]
    assert counts["skipped"] == {
        "malformed_json": 2,
        "empty_content": 3,
        "unknown_role": 2,
        "not_utf8": 1,
        "not_an_object": 2,
        "no_assistant_turn": 1,
        "starts_with_assistant": 1,
        "consecutive_user_turns": 1,
    }
    assert counts["records"] == 17
    assert counts["kept"] == 4
    assert counts["rows"] == 4
    assert sorted(ds["id"]) == ["good1", "good2", "good3", "good4"]
    assert counts["trailing_user_turns_dropped"] == 0


def test_skipped_records_are_listed_with_file_and_line(tmp_path, make_config):
    data = write_lines(tmp_path / "train.jsonl", [good(1), "{oops", good(2), sharegpt("just asking")])
    out = prepare.run(load_config(make_config([data], data=SKIP)))
    manifest = json.loads((out / "manifest.json").read_text())
    listed = [json.loads(line) for line in (out / manifest["skipped_records"]).read_text().splitlines()]
    assert [(r["where"], r["reason"]) for r in listed] == [
        (f"{data}:2", "malformed_json"), (f"{data}:4", "no_assistant_turn")]
    assert all(r["message"] for r in listed)


def test_skip_with_no_good_record_is_an_error(tmp_path, make_config):
    data = write_lines(tmp_path / "train.jsonl", ["{", sharegpt("alone")])
    message = prepare_error(make_config([data], data=SKIP))
    assert "no usable conversation" in message
    assert str(data) in message
    assert "2 records read" in message
    assert_nothing_written(tmp_path)


def test_json_array_syntax_error_names_file_and_line(tmp_path, make_config):
    data = tmp_path / "train.json"
    data.write_text(
        "[\n"  # 1
        f"  {json.dumps(good(1))},\n"  # 2
        f"  {json.dumps(good(2))}\n"  # 3: no comma
        f"  {json.dumps(good(3))}\n"  # 4: the parser stops here
        "]\n",
        encoding="utf-8",
    )
    message = prepare_error(make_config([data]))
    assert f"{data}:4: " in message
    assert "not valid JSON" in message
    assert_nothing_written(tmp_path)


def test_json_array_syntax_error_also_stops_skip_mode(tmp_path, make_config):
    data = tmp_path / "train.json"
    data.write_text(f"[\n  {json.dumps(good(1))},\n  {{\"conversations\": [}}\n]\n", encoding="utf-8")
    message = prepare_error(make_config([data], data=SKIP))
    assert f"{data}:3: " in message
    assert_nothing_written(tmp_path)


def test_bad_record_in_json_array_named_by_index(tmp_path, make_config):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([good(1), good(2), sharegpt("hi", "yo", "x", "", id="bad")], indent=2))
    message = prepare_error(make_config([data]))
    assert "conversations[3].value is empty" in message_line(message, f"{data}[2]")
    assert_nothing_written(tmp_path)


def test_trailing_user_turn_dropped_and_counted(tmp_path, make_config):
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [
            sharegpt("first question", "first answer", "unanswered follow-up", id="trailing"),
            openai("hello", "hi there", "are you still there", id="trailing2"),
            good(1),
        ],
    )
    ds, manifest = run_prepare(make_config([data]))
    counts = manifest["counts"]
    assert counts["records"] == 3
    assert counts["kept"] == 3
    assert counts["skipped"] == {}
    assert counts["trailing_user_turns_dropped"] == 2
    rows = {row["id"]: row for row in ds}
    assert set(rows) == {"trailing", "trailing2", "good1"}
    assert "first answer" in rows["trailing"]["text"]
    assert "unanswered follow-up" not in rows["trailing"]["text"]
    assert rows["trailing"]["text"].endswith("first answer</s>")
    assert "are you still there" not in rows["trailing2"]["text"]
    assert rows["trailing2"]["text"].endswith("hi there</s>")


@pytest.mark.parametrize(
    "fmt, record",
    [("sharegpt", openai("hi", "yo")), ("openai", sharegpt("hi", "yo"))],
    ids=["sharegpt_given_openai", "openai_given_sharegpt"],
)
def test_explicit_format_with_record_of_other_format(tmp_path, make_config, fmt, record):
    data = write_jsonl(tmp_path / "train.jsonl", [good(1) if fmt == "sharegpt" else openai("q", "a"), record])
    message = prepare_error(make_config([data], data={"format": fmt}))
    assert f"{data}:2: " in message
    assert f"data.format is {fmt}" in message


def test_pretty_printed_single_object_json_is_an_error(tmp_path, make_config):
    data = tmp_path / "one.json"
    data.write_text(json.dumps(sharegpt("hi", "yo"), indent=2))
    assert "must hold a list of conversations" in prepare_error(make_config([data]))
