"""Seed-data loaders and the conversation schema, on small files the tests write."""

from __future__ import annotations

import json

import pytest

from sd2_hf.data import loaders
from sd2_hf.data.loaders import iter_json_array, load_conversations, load_mtbench
from sd2_hf.data.schema import MalformedRow, normalize_messages


def sharegpt_record(i: int, turns: int = 2) -> dict:
    roles = ["human", "gpt"]
    return {
        "id": f"conv{i}",
        "conversations": [
            {"from": roles[t % 2], "value": f"turn {t} of conversation {i} ünïcødé"}
            for t in range(turns)
        ],
    }


def write_jsonl(path, records) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return str(path)


# --- schema -------------------------------------------------------------------------------


def test_roles_are_mapped_to_the_one_form():
    turns = [{"from": r, "value": r} for r in ("system", "human", "chatgpt", "user", "bard")]
    turns += [{"role": "user", "content": "u"}, {"role": "model", "content": "m"}]
    messages = normalize_messages(turns)
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert [m["content"] for m in messages][:3] == ["system", "human", "chatgpt"]


def test_leading_assistant_dropped_and_same_role_turns_merged():
    turns = [
        {"from": "gpt", "value": "continuation of a split conversation"},
        {"from": "human", "value": "first"},
        {"from": "human", "value": "second"},
        {"from": "gpt", "value": "   "},
        {"from": "gpt", "value": "answer"},
    ]
    assert normalize_messages(turns) == [
        {"role": "user", "content": "first\n\nsecond"},
        {"role": "assistant", "content": "answer"},
    ]


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([], "empty_conversation"),
        ("not a list", "missing_field"),
        ([{"from": "human"}], "missing_field"),
        ([{"from": "human", "value": 3}], "non_string_content"),
        ([{"from": "alien", "value": "hi"}], "unknown_role"),
        ([{"from": "human", "value": "a"}, {"from": "system", "value": "b"}], "misplaced_system"),
        ([{"from": "gpt", "value": "only the model"}], "no_user_turn"),
        (["just a string"], "not_an_object"),
    ],
)
def test_malformed_turns_raise_with_reason(turns, reason):
    with pytest.raises(MalformedRow) as err:
        normalize_messages(turns)
    assert err.value.reason == reason


# --- formats ------------------------------------------------------------------------------


def test_sharegpt_json_array_and_jsonl_give_the_same_rows(tmp_path):
    records = [sharegpt_record(i, turns=2 + i % 3) for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2, ensure_ascii=False))
    from_array = load_conversations(str(tmp_path / "a.json"))
    from_lines = load_conversations(write_jsonl(tmp_path / "a.jsonl", records))
    assert from_array.rows == from_lines.rows
    assert [r["id"] for r in from_array.rows] == [r["id"] for r in records]
    assert from_array.rows[4]["messages"][2] == {
        "role": "user",
        "content": records[4]["conversations"][2]["value"],
    }
    assert from_array.total == 5 and not from_array.skipped and from_array.truncated_bytes == 0


def test_alpaca_prompt_and_messages_forms(tmp_path):
    records = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"prompt": "Write a haiku"},
        {"text": "Plain text prompt"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    result = load_conversations(write_jsonl(tmp_path / "mixed.jsonl", records))
    messages = [r["messages"] for r in result.rows]
    assert messages[0] == [
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert messages[1][0]["content"] == "Say hi"
    assert messages[2] == [{"role": "user", "content": "Write a haiku"}]
    assert messages[3] == [{"role": "user", "content": "Plain text prompt"}]
    assert messages[4][1] == {"role": "assistant", "content": "a"}
    # Without a record id, ids are <file stem>-<position in the source>.
    assert [r["id"] for r in result.rows] == [f"mixed-{i}" for i in range(5)]


def test_explicit_format_rejects_other_forms(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, sharegpt_record(0)])
    result = load_conversations(path, format="prompt")
    assert len(result.rows) == 1 and result.skipped == {"missing_field": 1}
    with pytest.raises(ValueError, match="allowed: auto, sharegpt"):
        load_conversations(path, format="chatml")


def test_datasets_dir_and_parquet(tmp_path):
    import datasets

    records = [sharegpt_record(i) for i in range(4)]
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    expected = load_conversations(write_jsonl(tmp_path / "rows.jsonl", records)).rows
    # The distillation output layout: JSONL shards under data/ next to a manifest.
    shards = tmp_path / "distilled" / "data"
    shards.mkdir(parents=True)
    write_jsonl(shards / "train-00000.jsonl", records[:2])
    write_jsonl(shards / "train-00001.jsonl", records[2:])
    (tmp_path / "distilled" / "manifest.json").write_text('{"counts": {"written": 4}}')
    for source in ("saved", "saved_dict", "rows.parquet", "distilled"):
        assert load_conversations(str(tmp_path / source)).rows == expected, source
    # Shards next to a manifest in one folder: datasets reads the manifest as a data file.
    flat = tmp_path / "flat"
    flat.mkdir()
    write_jsonl(flat / "rows.jsonl", records)
    (flat / "manifest.json").write_text('{"counts": {"written": 4}}')
    with pytest.raises(ValueError, match="cannot load .*flat with datasets"):
        load_conversations(str(flat))


# --- truncation, malformed rows, limit, ids -----------------------------------------------


@pytest.mark.parametrize("chunk_chars", [7, 64, 1 << 20])
def test_truncated_json_array_recovers_every_complete_record(tmp_path, monkeypatch, chunk_chars):
    # Small chunks make records and multi-byte characters straddle chunk edges.
    monkeypatch.setattr(loaders, "_CHUNK_CHARS", chunk_chars)
    records = [sharegpt_record(i, turns=2 + i % 2) for i in range(9)]
    complete = json.dumps(records, indent=2, ensure_ascii=False)
    cut = complete.rindex('{\n    "id": "conv8"')
    partial_tail = complete[cut : cut + 57]  # ends mid-string, after a multi-byte character
    path = tmp_path / "cut.json"
    path.write_bytes((complete[:cut] + partial_tail).encode("utf-8")[:-1])  # and mid-character
    result = load_conversations(str(path))
    assert [r["id"] for r in result.rows] == [f"conv{i}" for i in range(8)]
    assert result.total == 8 and not result.skipped
    assert result.truncated_bytes == len(partial_tail.encode("utf-8")) - 1
    assert "bytes of an incomplete final record dropped" in result.summary()


def test_json_array_of_scalars_at_chunk_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "_CHUNK_CHARS", 3)
    (tmp_path / "n.json").write_text(json.dumps([12345, "ab", [1, 2], {"k": 678}, 9]))
    assert list(iter_json_array(tmp_path / "n.json")) == [12345, "ab", [1, 2], {"k": 678}, 9]


def test_malformed_rows_are_counted_by_reason(tmp_path):
    good = sharegpt_record(0)
    lines = [
        good,
        '{"conversations": [{"from": "human", "value": "unterminated\n',
        {"id": "x"},
        {"conversations": []},
        {"conversations": [{"from": "human", "value": {"text": "dict"}}]},
        {"conversations": [{"from": "narrator", "value": "hi"}]},
        {"conversations": [{"from": "gpt", "value": "no prompt"}]},
        '["an", "array"]\n',
        sharegpt_record(1),
    ]
    result = load_conversations(write_jsonl(tmp_path / "bad.jsonl", lines))
    assert [r["id"] for r in result.rows] == ["conv0", "conv1"]
    assert result.skipped == {
        "invalid_json": 1,
        "missing_field": 1,
        "empty_conversation": 1,
        "non_string_content": 1,
        "unknown_role": 1,
        "no_user_turn": 1,
        "not_an_object": 1,
    }
    assert result.total == len(result.rows) + sum(result.skipped.values()) == len(lines)


def test_limit_stops_reading_early(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "_CHUNK_CHARS", 256)
    records = [{"id": "bad"}] + [sharegpt_record(i) for i in range(200)]
    path = tmp_path / "big.json"
    # Everything after the first records is garbage: only a reader that stops early never
    # sees it (the whole-file read counts it as a truncated tail).
    text = json.dumps(records)
    path.write_text(text[: len(text) // 2] + "\x00garbage" * 1000)
    result = load_conversations(str(path), limit=3)
    assert [r["id"] for r in result.rows] == ["conv0", "conv1", "conv2"]
    assert result.total == 4 and result.skipped == {"missing_field": 1}
    assert result.truncated_bytes == 0
    assert load_conversations(str(path)).truncated_bytes > 8000
    assert load_conversations(str(path), limit=0).rows == []


def test_ids_are_stable_and_unique(tmp_path):
    records = [sharegpt_record(0), sharegpt_record(1), sharegpt_record(0), {"prompt": "no id"}]
    records[2]["conversations"][0]["value"] = "a different conversation reusing the id"
    path = write_jsonl(tmp_path / "dup.jsonl", records)
    first, second = load_conversations(path), load_conversations(path)
    ids = [r["id"] for r in first.rows]
    assert ids == ["conv0", "conv1", "conv0#1", "dup-3"]
    assert ids == [r["id"] for r in second.rows]


def test_missing_source_names_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="asset:<name>"):
        load_conversations(str(tmp_path / "nope.json"))


# --- MT-Bench -----------------------------------------------------------------------------


def test_load_mtbench(tmp_path):
    questions = [
        {"question_id": 81 + i, "category": cat, "turns": [f"q{i} first", f"q{i} second"]}
        for i, cat in enumerate(["writing", "math", "coding"])
    ]
    path = write_jsonl(tmp_path / "question.jsonl", questions)
    loaded = load_mtbench(path)
    assert loaded == [
        {"id": str(q["question_id"]), "category": q["category"], "turns": q["turns"]}
        for q in questions
    ]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_mtbench(str(tmp_path / "bad.jsonl"))


def test_gzip_compressed_jsonl_and_json_array_load_like_the_plain_files(tmp_path):
    import gzip

    records = [sharegpt_record(i) for i in range(3)]
    plain = load_conversations(write_jsonl(tmp_path / "rows.jsonl", records))
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with gzip.open(tmp_path / "rows.json.gz", "wt", encoding="utf-8") as f:
        json.dump(records, f)
    for name in ("rows.jsonl.gz", "rows.json.gz"):
        loaded = load_conversations(str(tmp_path / name))
        assert loaded.rows == plain.rows and len(loaded.rows) == 3
