"""Ingestion from s3:// against a real local S3 endpoint (moto's server, see conftest.s3_endpoint)."""

import gzip
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from steps.config import recipe_from_dict
from steps.ingest import ingest, read_conversations
from steps.storage import s3_client


def _conversation(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def _jsonl(records) -> bytes:
    return b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in records)


def test_jsonl_gzip_and_parquet_prefix_from_s3(s3_bucket, tmp_path):
    client = s3_client()
    client.put_object(Bucket=s3_bucket, Key="raw/chats.jsonl",
                      Body=_jsonl([_conversation(i) for i in range(20)] + [b"{oops\n", _conversation(0)]))
    client.put_object(Bucket=s3_bucket, Key="raw/more.jsonl.gz",
                      Body=gzip.compress(_jsonl([_conversation(i) for i in range(20, 40)])))
    for part in range(2):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{"prompt": f"p{part}-{i}", "completion": f"c{i}"} for i in range(10)]),
                       buffer)
        client.put_object(Bucket=s3_bucket, Key=f"raw/parquet/part-{part}.parquet", Body=buffer.getvalue())
    client.put_object(Bucket=s3_bucket, Key="raw/parquet/_SUCCESS", Body=b"")  # not a Parquet file: skipped

    sources = [f"s3://{s3_bucket}/raw/chats.jsonl", f"s3://{s3_bucket}/raw/more.jsonl.gz",
               f"s3://{s3_bucket}/raw/parquet"]
    recipe = recipe_from_dict({"storage": str(tmp_path / "store"), "data": {
        "sources": [{"uri": uri} for uri in sources], "eval_fraction": 0.2, "max_reject_fraction": 0.1}})
    manifest = ingest(recipe, str(tmp_path / "run"))

    assert (manifest["num_records_read"], manifest["num_valid"], manifest["num_duplicates"]) == (62, 60, 1)
    assert manifest["reject_reasons"] == {"malformed_json": 1}
    rejects = [json.loads(line) for line in open(manifest["rejects_uri"])]
    assert [(r["source"], r["position"], r["reason"]) for r in rejects] == [(sources[0], 21, "malformed_json")]
    rows = [r for split in ("train", "eval") for r in read_conversations(manifest["splits"][split]["uris"])]
    assert sorted({r["source"] for r in rows}) == sorted(sources)
    assert sorted(r["messages"][0]["content"] for r in rows if r["source"] == sources[2]) == sorted(
        f"p{part}-{i}" for part in range(2) for i in range(10))

    # The same conversations read from local files give the same fingerprint.
    local = tmp_path / "local.jsonl"
    prompts = [{"prompt": f"p{part}-{i}", "completion": f"c{i}"} for part in range(2) for i in range(10)]
    local.write_bytes(_jsonl([_conversation(i) for i in range(40)] + prompts))
    again = ingest(recipe_from_dict({"storage": str(tmp_path / "store"), "data": {
        "sources": [{"uri": str(local)}], "eval_fraction": 0.2}}), str(tmp_path / "run2"))
    assert again["fingerprint"] == manifest["fingerprint"]


def test_datasets_folders_on_s3_give_the_rows_of_the_local_folders(s3_bucket, tmp_path):
    import datasets

    # A Dataset in two Arrow files, and a DatasetDict whose "test" split comes first by name.
    datasets.Dataset.from_list([_conversation(i) for i in range(30)]).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]),
        "test": datasets.Dataset.from_list([{"prompt": "only a prompt", "completion": None}]),
    }).save_to_disk(str(tmp_path / "dd"))
    assert len(json.loads((tmp_path / "ds" / "state.json").read_text())["_data_files"]) == 2
    client = s3_client()
    for folder in ("ds", "dd"):
        for path in sorted((tmp_path / folder).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), s3_bucket, f"hf/{path.relative_to(tmp_path)}")

    def ingested(sources, name):
        recipe = recipe_from_dict({"storage": str(tmp_path / "store"), "data": {
            "sources": [{"uri": uri} for uri in sources], "eval_fraction": 0.2, "max_reject_fraction": 0.1}})
        manifest = ingest(recipe, str(tmp_path / name))
        rejects = [json.loads(line) for line in open(manifest["rejects_uri"])]
        rows = [r for split in ("train", "eval") for r in read_conversations(manifest["splits"][split]["uris"])]
        return manifest, rejects, rows

    remote, remote_rejects, remote_rows = ingested([f"s3://{s3_bucket}/hf/ds", f"s3://{s3_bucket}/hf/dd"], "s3")
    local, _, _ = ingested([str(tmp_path / "ds"), str(tmp_path / "dd")], "local")
    assert (remote["num_records_read"], remote["num_valid"]) == (51, 50)
    # "test" (row 0 of the DatasetDict) is read before "train", as from a local folder.
    assert [(r["source"], r["position"], r["reason"]) for r in remote_rejects] == [
        (f"s3://{s3_bucket}/hf/dd", 0, "unknown_shape")]
    assert remote["fingerprint"] == local["fingerprint"]
    assert sorted(r["messages"][1]["content"] for r in remote_rows if r["source"].endswith("/ds")) == sorted(
        f"answer {i}" for i in range(30))
    # Each Arrow file went to a temporary folder that is gone once read.
    assert not list(Path(tempfile.gettempdir()).glob("posttrain-ingest-*/data.arrow"))
