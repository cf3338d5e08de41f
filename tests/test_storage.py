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


def test_a_dead_s3_endpoint_fails_within_the_bounds_and_names_the_endpoint(monkeypatch):
    """A port nobody listens on: the call fails after the configured attempts, not botocore's
    minutes, and the error says which endpoint did not answer."""
    import socket
    import time

    from botocore.exceptions import EndpointConnectionError

    from steps import storage

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens there
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("POSTTRAIN_S3_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("POSTTRAIN_S3_MAX_ATTEMPTS", "2")
    client = storage.s3_client()
    assert client.meta.config.connect_timeout == 1.0 and client.meta.config.retries["total_max_attempts"] == 2
    started = time.monotonic()
    with pytest.raises(EndpointConnectionError, match=f"127.0.0.1:{port}"):
        storage.read_bytes("s3://bucket/key")
    assert time.monotonic() - started < 30  # a DoS guard, far above the ~1 s it takes


def test_s3_limits_come_from_the_environment_and_are_checked(monkeypatch):
    from steps import storage

    assert storage._s3_limits() == (10.0, 60.0, 3)
    monkeypatch.setenv("POSTTRAIN_S3_READ_TIMEOUT_S", "5")
    assert storage._s3_limits() == (10.0, 5.0, 3)
    monkeypatch.setenv("POSTTRAIN_S3_MAX_ATTEMPTS", "zero")
    with pytest.raises(ValueError, match=r"\$POSTTRAIN_S3_MAX_ATTEMPTS must be a number"):
        storage._s3_limits()
