"""Hostile and clumsy data: one bad record is one reject with its reason and line, never a crash;
nothing valid is lost; a source that yields nothing fails the step and names the source.

Every ingest here also checks the invariant: records read = kept + duplicates + rejects (+ those a
weight below 1 left out), and every reject names a specific reason and its line or row.
"""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steps import storage
from steps.config import recipe_from_dict
from conftest import check_ingest_accounting
from steps.ingest import EmptySource, ingest, read_conversations


def _good(i: int) -> bytes:
    return (json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n").encode()


def _recipe(tmp_path, sources, **data):
    return recipe_from_dict({"storage": str(tmp_path / "store"),
                             "data": {"sources": sources, "eval_fraction": 0.3, "max_reject_fraction": 0.5, **data}})


REASONS = {"invalid_unicode", "number_too_long", "too_deeply_nested", "invalid_utf8", "malformed_json", "oversize",
           "no_assistant_turn", "unknown_shape", "not_an_object"}


def _ingest_checked(tmp_path, sources, **data) -> tuple[dict, list[dict]]:
    """Ingest (its accounting is checked by conftest for every ingest here), return (manifest, rejects)."""
    manifest = ingest(_recipe(tmp_path, sources, **data), str(tmp_path / "run"))
    rejects = check_ingest_accounting(manifest)
    assert all(reject["reason"] in REASONS for reject in rejects), rejects
    return manifest, rejects


HOSTILE_LINES = [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}\n',
     "invalid_unicode"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\\udfff"}]}\n',
     "invalid_unicode"),
    (b'{"\\udbff": 1, "messages": []}\n', "invalid_unicode"),
    (b'{"messages": [], "n": ' + b"7" * 5000 + b"}\n", "number_too_long"),
    (b'{"n": -' + b"1" * 100_000 + b"}\n", "number_too_long"),
    (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "too_deeply_nested"),
    (b'{"meta": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}\n", "too_deeply_nested"),
    (b"\xff\xfe not utf-8\n", "invalid_utf8"),
    (b"{oops\n", "malformed_json"),
]


def test_hostile_lines_are_each_one_reject_with_its_own_reason_and_line(tmp_path):
    lines = [_good(i) for i in range(20)]
    for position, (line, _) in enumerate(HOSTILE_LINES):
        lines.insert(2 * position + 1, line)
    (tmp_path / "d.jsonl").write_bytes(b"".join(lines))
    manifest, rejects = _ingest_checked(tmp_path, [{"uri": str(tmp_path / "d.jsonl")}])
    expected = [(lines.index(line) + 1, reason) for line, reason in HOSTILE_LINES]
    assert [(r["position"], r["reason"]) for r in rejects] == expected
    kept = [r for s in ("train", "eval") for r in read_conversations(manifest["splits"][s]["uris"])]
    assert sorted(r["messages"][0]["content"] for r in kept) == sorted(f"question {i}" for i in range(20))


@pytest.mark.parametrize("bom_file", ["plain.jsonl", "packed.jsonl.gz"])
def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path, bom_file):
    data = b"\xef\xbb\xbf" + b"".join(_good(i) for i in range(10))
    path = tmp_path / bom_file
    path.write_bytes(gzip.compress(data) if bom_file.endswith(".gz") else data)
    manifest, rejects = _ingest_checked(tmp_path, [{"uri": str(path)}])
    assert rejects == [] and manifest["num_valid"] == 10


def test_a_bom_inside_a_file_is_still_a_reject(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"".join(_good(i) for i in range(5)) + b"\xef\xbb\xbf" + _good(9))
    _, rejects = _ingest_checked(tmp_path, [{"uri": str(tmp_path / "d.jsonl")}])
    assert [(r["position"], r["reason"]) for r in rejects] == [(6, "malformed_json")]


@pytest.mark.parametrize("blank", [b"\n", b"  \n", b"\r\n", b"\t \r\n"])
def test_blank_lines_cost_next_to_nothing_and_keep_line_numbers(tmp_path, blank):
    """Ten million blank lines (a .gz of a few kB) between two records. A DoS guard, not a speed
    test: the old line-by-line loop took about two minutes here; the bound is 100x the new time."""
    import time

    body = _good(1) + blank * 10_000_000 + b"{oops\n" + _good(2)
    path = tmp_path / "blank.jsonl.gz"
    path.write_bytes(gzip.compress(body, compresslevel=9))
    started = time.process_time()
    manifest, rejects = _ingest_checked(tmp_path, [{"uri": str(path)}], eval_fraction=0.5)
    assert time.process_time() - started < 30
    assert [(r["position"], r["reason"]) for r in rejects] == [(10_000_002, "malformed_json")]
    assert manifest["num_valid"] == 2


@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("kind", ["empty-jsonl", "folder-of-other-files", "empty-folder"])
def test_a_source_that_yields_nothing_fails_naming_it_unless_allowed(tmp_path, request, backend, kind):
    root = tmp_path / "src" if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/src"
    good = storage.join(str(tmp_path) if backend == "local" else root, "good.jsonl")
    storage.write_bytes(good, b"".join(_good(i) for i in range(10)))
    if kind == "empty-jsonl":
        empty = storage.join(root, "empty.jsonl")
        storage.write_bytes(empty, b"\n\n")
    elif kind == "folder-of-other-files":
        empty = storage.join(root, "texts")
        storage.write_bytes(storage.join(empty, "notes.txt"), b"hello\n")
    else:
        empty = storage.join(root, "nothing")
        if backend == "local":
            (tmp_path / "src" / "nothing").mkdir(parents=True)
    with pytest.raises(EmptySource, match=f"data source '{empty}' yielded no records"):
        ingest(_recipe(tmp_path, [{"uri": good}, {"uri": empty}]), str(tmp_path / "run"))
    manifest, _ = _ingest_checked(tmp_path, [{"uri": good}, {"uri": empty, "allow_empty": True}])
    assert [s["num_read"] for s in manifest["sources"]] == [10, 0]


def test_a_local_source_that_does_not_exist_names_itself(tmp_path):
    with pytest.raises(EmptySource, match="data source '.*typo.jsonl' does not exist"):
        ingest(_recipe(tmp_path, [{"uri": str(tmp_path / "typo.jsonl")}]), str(tmp_path / "run"))


def test_a_single_parquet_object_on_s3_is_read(tmp_path, s3_bucket):
    rows = [json.loads(_good(i)) for i in range(12)]
    local = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist(rows), local)
    uri = f"s3://{s3_bucket}/data/one.parquet"
    storage.upload_file(local, uri)
    storage.upload_file(local, f"s3://{s3_bucket}/data/one.parquet.bak/other.parquet")  # not part of it
    manifest, rejects = _ingest_checked(tmp_path, [{"uri": uri}])
    assert manifest["num_records_read"] == 12 and rejects == []
