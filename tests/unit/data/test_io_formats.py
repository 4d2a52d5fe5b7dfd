import json

import datasets
import pytest

from alignkit.data.formats import to_messages
from alignkit.data.io import DataError, Record, read_records


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        read_records(path)


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: expected a JSON object, got list"):
        read_records(path)


def test_missing_field_names_field_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    records = read_records(path)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2"]
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'response'"):
        to_messages(records[1])


def test_all_file_formats_give_the_same_records(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "a.parquet", "saved"):
        assert [r.data for r in read_records(tmp_path / name)] == rows, name
    assert len(read_records(tmp_path / "a.jsonl", limit=2)) == 2
    with pytest.raises(DataError, match="no split 'test'"):
        read_records(tmp_path / "saved", split="test")
    with pytest.raises(DataError, match="unsupported dataset format '.csv'"):
        (tmp_path / "a.csv").write_text("x")
        read_records(tmp_path / "a.csv")
    with pytest.raises(DataError, match="dataset not found"):
        read_records(tmp_path / "nope.jsonl")


def rec(data):
    return Record(data, "f.jsonl:7")


def test_prompt_response_variants():
    expected = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages(rec({"prompt": "Q", "response": "A"})) == expected
    assert to_messages(rec({"input": "Q", "output": "A"})) == expected
    assert to_messages(rec({"prompt": "Q", "completion": "A"})) == expected
    assert (
        to_messages(
            rec({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]})
        )
        == expected
    )
    with_system = to_messages(rec({"prompt": "Q", "response": "A"}), system_prompt="S")
    assert with_system[0] == {"role": "system", "content": "S"}


def test_nemo_conversations_format():
    data = {
        "system": "be nice",
        "mask": "User",
        "conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "hello", "label": None}],
    }
    assert to_messages(rec(data)) == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
        ({"messages": [{"role": "user"}]}, "has no field 'content'"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
        ({"text": "x"}, "no conversation fields"),
        ({"messages": "hello"}, "no assistant message"),
    ],
)
def test_bad_conversations_name_the_line(data, message):
    with pytest.raises(DataError, match=rf"f.jsonl:7: .*{message}"):
        to_messages(rec(data))
