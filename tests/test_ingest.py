"""Ingestion: normalization, reject reasons, dedup, a split that is stable when data is appended."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steps.config import recipe_from_dict
from steps.ingest import (InvalidRecord, TooManyRejects, conversation_id, ingest, normalize_record, num_copies,
                          read_conversations, split_of)

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_three_record_shapes_normalize_to_one_schema():
    expected = [{"role": "user", "content": "hi", "train": True},
                {"role": "assistant", "content": "hello", "train": True}]
    assert normalize_record(GOOD) == expected
    assert normalize_record({"prompt": "hi", "completion": "hello"}) == expected
    assert normalize_record({"conversations": [{"from": "human", "value": "hi"},
                                               {"from": "gpt", "value": "hello"}]}) == expected


def test_train_false_is_kept_on_the_message():
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False},
                           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    assert [m["train"] for m in normalize_record(record)] == [True, False, True, True]


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "non_string_content"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "ends_without_assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "train": False}]},
     "no_trained_turn"),
    ({"text": "hello"}, "unknown_shape"),
    (["not", "a", "dict"], "not_an_object"),
])
def test_invalid_records_name_their_reason(record, reason):
    with pytest.raises(InvalidRecord) as err:
        normalize_record(record)
    assert err.value.reason == reason


def _recipe(tmp_path, uris, **data):
    return recipe_from_dict({"storage": str(tmp_path / "store"),
                             "data": {"sources": [{"uri": u} for u in uris], "eval_fraction": 0.3, **data}})


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return str(path)


def _conversations(n, start=0):
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(start, start + n)]


def test_rejects_are_written_with_source_line_and_reason_and_nothing_valid_is_lost(tmp_path):
    lines = _conversations(10) + [b"{not json\n", b"\xff\xfe{}\n", {"messages": [{"role": "user", "content": "q"}]},
                                  _conversations(1)[0]]  # the last one duplicates conversation 0
    uri = _write_jsonl(tmp_path / "d.jsonl", lines)
    manifest = ingest(_recipe(tmp_path, [uri], max_reject_fraction=0.5), str(tmp_path / "run"))
    rejects = [json.loads(l) for l in open(manifest["rejects_uri"])]
    assert [(r["position"], r["reason"]) for r in rejects] == [
        (11, "malformed_json"), (12, "invalid_utf8"), (13, "no_assistant_turn")]
    assert all(r["source"] == uri for r in rejects)
    assert manifest["reject_reasons"] == {"invalid_utf8": 1, "malformed_json": 1, "no_assistant_turn": 1}
    assert manifest["num_duplicates"] == 1 and manifest["num_valid"] == 10 and manifest["num_records_read"] == 14
    kept = [r for s in ("train", "eval") for r in read_conversations(manifest["splits"][s]["uris"])]
    assert sorted(r["messages"][0]["content"] for r in kept) == sorted(f"question {i}" for i in range(10))


def test_too_many_rejects_fail_the_step_with_a_clear_message(tmp_path):
    uri = _write_jsonl(tmp_path / "d.jsonl", _conversations(3) + [b"{bad\n"] * 2)
    with pytest.raises(TooManyRejects, match=r"2 of 5 records \(40.0%\) were rejected.*malformed_json: 2"):
        ingest(_recipe(tmp_path, [uri], max_reject_fraction=0.1), str(tmp_path / "run"))


def test_split_is_stable_when_data_is_appended(tmp_path):
    first = _write_jsonl(tmp_path / "a.jsonl", _conversations(200))
    more = _write_jsonl(tmp_path / "b.jsonl", _conversations(200, start=200))
    small = ingest(_recipe(tmp_path, [first]), str(tmp_path / "run1"))
    big = ingest(_recipe(tmp_path, [first, more]), str(tmp_path / "run2"))

    def ids(manifest, split):
        return {r["id"] for r in read_conversations(manifest["splits"][split]["uris"])}

    assert ids(small, "eval") <= ids(big, "eval") and ids(small, "train") <= ids(big, "train")
    assert 30 < len(ids(small, "eval")) < 90  # eval_fraction 0.3 of 200
    assert small["fingerprint"] != big["fingerprint"]
    assert small["splits"]["eval"]["fingerprint"] != big["splits"]["eval"]["fingerprint"]
    again = ingest(_recipe(tmp_path, [first]), str(tmp_path / "run3"))
    assert again["fingerprint"] == small["fingerprint"]
    assert again["splits"]["eval"]["fingerprint"] == small["splits"]["eval"]["fingerprint"]


def test_split_depends_only_on_the_id():
    record_id = conversation_id(normalize_record(GOOD))
    assert record_id == conversation_id(normalize_record({"prompt": "hi", "completion": "hello"}))
    assert split_of("0" * 64, 0.05) == "eval" and split_of("f" * 64, 0.05) == "train"


def test_gzip_jsonl_and_parquet_sources(tmp_path):
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        for c in _conversations(20):
            f.write(json.dumps(c) + "\n")
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]),
                   folder / "x.parquet")
    manifest = ingest(_recipe(tmp_path, [str(gz), str(folder)]), str(tmp_path / "run"))
    assert manifest["num_valid"] == 40 and manifest["num_rejected"] == 0


def test_lines_are_split_across_read_chunks_and_oversize_lines_skipped(monkeypatch):
    import io

    import steps.ingest

    monkeypatch.setattr(steps.ingest, "READ_CHUNK_BYTES", 7)  # lines and the 30-byte one cross chunks
    data = b'{"a": 1}\n' + b"x" * 30 + b"\n\n{}\r\n" + b"y" * 25
    # Blank lines are counted, not yielded: each line keeps its number in the file.
    assert list(steps.ingest._lines(io.BytesIO(data), max_line_bytes=20)) == [
        (1, b'{"a": 1}'), (2, None), (4, b"{}\r"), (5, None)]


def test_oversize_lines_and_records_are_rejected_with_their_line(tmp_path):
    big = {"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}
    uri = _write_jsonl(tmp_path / "d.jsonl", _conversations(8) + [big, {"prompt": "p", "completion": ""}])
    manifest = ingest(_recipe(tmp_path, [uri], max_record_bytes=200, max_reject_fraction=0.5), str(tmp_path / "run"))
    rejects = [json.loads(line) for line in open(manifest["rejects_uri"])]
    assert [(r["source"], r["position"], r["reason"]) for r in rejects] == [
        (uri, 9, "oversize"), (uri, 10, "empty_content")]
    assert manifest["num_valid"] == 8 and manifest["num_records_read"] == 10


def _split_rows(manifest):
    return {s: [r["id"] for r in read_conversations(manifest["splits"][s]["uris"])] for s in ("train", "eval")}


def test_source_weights_repeat_or_thin_records_without_leaking_into_eval(tmp_path):
    heavy = _write_jsonl(tmp_path / "heavy.jsonl", _conversations(100))
    light = _write_jsonl(tmp_path / "light.jsonl", _conversations(200, start=100) + _conversations(10))
    recipe = recipe_from_dict({"storage": str(tmp_path / "store"), "data": {
        "eval_fraction": 0.3, "sources": [{"uri": heavy, "weight": 2.0}, {"uri": light, "weight": 0.5}]}})
    manifest = ingest(recipe, str(tmp_path / "run"))
    rows = _split_rows(manifest)
    # The 10 repeats of heavy's conversations in light are duplicates; weighting copies are not.
    assert (manifest["num_records_read"], manifest["num_valid"], manifest["num_duplicates"]) == (310, 300, 10)
    heavy_ids = {conversation_id(normalize_record(c)) for c in _conversations(100)}
    light_ids = {conversation_id(normalize_record(c)) for c in _conversations(200, start=100)}
    heavy_train = [i for i in heavy_ids if split_of(i, 0.3) == "train"]
    kept_light = [i for i in light_ids if num_copies(i, 0.5) == 1]
    assert manifest["num_weighted_out"] == 200 - len(kept_light) == 109
    assert manifest["num_weighted_copies"] == len(heavy_train) == 71
    # Train: heavy twice, the kept half of light once. Eval: each conversation once.
    assert sorted(rows["train"]) == sorted(heavy_train * 2 + [i for i in kept_light if split_of(i, 0.3) == "train"])
    assert sorted(rows["eval"]) == sorted([i for i in heavy_ids | set(kept_light) if split_of(i, 0.3) == "eval"])
    assert not set(rows["train"]) & set(rows["eval"])
    assert [(s["uri"], s["num_read"], s["num_conversations"]) for s in manifest["sources"]] == [
        (heavy, 100, 171), (light, 210, 91)]
    # A weight is part of the data: changing it changes the fingerprint.
    recipe.data.sources[0].weight = 1.0
    assert ingest(recipe, str(tmp_path / "run2"))["fingerprint"] != manifest["fingerprint"]


def test_fingerprint_is_of_the_content_not_of_the_path(tmp_path):
    conversations = _conversations(50)
    first = ingest(_recipe(tmp_path, [_write_jsonl(tmp_path / "a.jsonl", conversations)]), str(tmp_path / "r1"))
    moved = ingest(_recipe(tmp_path, [_write_jsonl(tmp_path / "b.jsonl", conversations[::-1])]), str(tmp_path / "r2"))
    assert moved["fingerprint"] == first["fingerprint"]
    assert moved["splits"]["eval"]["fingerprint"] == first["splits"]["eval"]["fingerprint"]


def test_datasets_folders_are_read_row_by_row(tmp_path):
    import datasets

    datasets.Dataset.from_list(_conversations(30)).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]),
        "test": datasets.Dataset.from_list([{"prompt": "only a prompt", "completion": None}]),
    }).save_to_disk(str(tmp_path / "dd"))
    manifest = ingest(_recipe(tmp_path, [str(tmp_path / "ds"), str(tmp_path / "dd")], max_reject_fraction=0.1),
                      str(tmp_path / "run"))
    assert (manifest["num_records_read"], manifest["num_valid"]) == (51, 50)
    rejects = [json.loads(line) for line in open(manifest["rejects_uri"])]
    # DatasetDict splits are read in name order: "test" (row 0) before "train".
    assert [(r["source"], r["position"], r["reason"]) for r in rejects] == [(str(tmp_path / "dd"), 0, "unknown_shape")]


def test_ingest_memory_does_not_grow_with_the_data(tmp_path):
    """Python memory at peak grows by the dedup set only (~0.2 KB a conversation), not by the 8 KB records."""
    import tracemalloc

    filler = "x" * 8000

    def peak_bytes(num_records: int) -> int:
        records = ({"messages": [{"role": "user", "content": f"question {i} {filler}"},
                                 {"role": "assistant", "content": f"answer {i}"}]} for i in range(num_records))
        uri = _write_jsonl(tmp_path / f"{num_records}.jsonl", records)
        tracemalloc.start()
        try:
            manifest = ingest(_recipe(tmp_path, [uri], records_per_shard=100), str(tmp_path / f"run-{num_records}"))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert manifest["num_valid"] == num_records
        return peak

    peak_bytes(10)  # lazy imports and caches of the first call are not the data's
    small, large = peak_bytes(200), peak_bytes(800)
    extra_data_bytes = 600 * len(filler)  # 4.8 MB more read; holding it would add that much
    print(f"peak {small} -> {large} bytes")
    assert large - small < 0.25 * extra_data_bytes
