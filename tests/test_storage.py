"""The storage API behaves the same on a local folder and on a real (moto) S3 endpoint."""

import threading

import pytest

from steps import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


def test_join_and_split():
    assert storage.join("s3://b/p/", "x", "/y") == "s3://b/p/x/y"
    assert storage.split_s3("s3://b/p/x") == ("b", "p/x")
    with pytest.raises(ValueError, match="without a bucket"):
        storage.split_s3("s3:///x")


def test_write_read_list_delete(root):
    a, b = storage.join(root, "d", "a.txt"), storage.join(root, "d", "sub", "b.txt")
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"beta")
    assert storage.read_bytes(a) == b"alpha" and storage.exists(b)
    assert storage.list_files(storage.join(root, "d")) == [a, b]
    storage.delete(a)
    assert not storage.exists(a) and storage.list_files(storage.join(root, "d")) == [b]


def test_put_if_absent_has_exactly_one_winner(root):
    uri = storage.join(root, "claims", "7")
    wins = []

    def claim(i):
        wins.append((i, storage.put_if_absent(uri, f"writer {i}".encode())))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in wins if won]
    assert len(winners) == 1
    assert storage.read_bytes(uri) == f"writer {winners[0]}".encode()
    assert storage.put_if_absent(uri, b"late") is False


def test_upload_and_download(root, tmp_path):
    local = tmp_path / "x.bin"
    local.write_bytes(b"\x00\x01" * 1000)
    uri = storage.join(root, "blob", "x.bin")
    storage.upload_file(local, uri)
    assert storage.download_file(uri, tmp_path / "back" / "x.bin").read_bytes() == local.read_bytes()
