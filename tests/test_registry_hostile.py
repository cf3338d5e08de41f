"""Hostile and clumsy input to steps/registry.py, on both backends (a local folder and a real
moto S3 endpoint): manifests whose file list points outside the destination, pulls that fail
halfway, symlinks out of a model folder, hand-edited manifests, odd version and alias
spellings, the debris of killed registrations (``gc``), and the CLI's exit codes.

The invariant behind the first tests: a pull writes only inside its destination and a staging
folder it made itself, and deletes nothing else; a sibling folder is snapshotted (every path,
its bytes and mtime) before and after each hostile pull and must not change at all.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steps import registry as registry_module
from steps import storage
from steps.registry import (
    ChecksumMismatch,
    DestinationExistsError,
    InvalidManifestError,
    NotFoundError,
    Registry,
    RegistryWarning,
    UnsafePathError,
)
from test_registry import (  # noqa: F401  (root is a fixture)
    CONFIG_BYTES,
    KILL_BEFORE_MANIFEST,
    REPO_ROOT,
    make_model_dir,
    root,
    run_cli,
    sha256_of,
)

SECRET_BYTES = b"aws_secret_access_key = hunter2\n"
GOOD_ENTRY = {"sha256": sha256_of(CONFIG_BYTES), "bytes": len(CONFIG_BYTES)}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (and the folder itself): kind, bytes or link target, mtime."""
    found = {".": (None, None, folder.lstat().st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(folder):
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            info = path.lstat()
            content = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None
            found[path.relative_to(folder).as_posix()] = (stat.S_IFMT(info.st_mode), content, info.st_mtime_ns)
    return found


def make_sibling(tmp_path: Path) -> Path:
    """A folder beside every pull's destination, holding what a hostile manifest would aim at."""
    sibling = tmp_path / "sibling"
    (sibling / "nested").mkdir(parents=True)
    (sibling / "secret.txt").write_bytes(SECRET_BYTES)
    (sibling / "nested" / "keep.bin").write_bytes(b"keep me")
    (sibling / "nested" / "config.json").write_bytes(CONFIG_BYTES)
    return sibling


def plant_version(root: str, version: int | str, manifest: bytes | dict, files: dict[str, bytes] | None = None,
                  name: str = "tiny") -> str:
    """Write a version by hand, as a clumsy or hostile person could: files, then manifest.json.

    Returns the manifest's URI."""
    version_uri = storage.join(root, name, "versions", str(version))
    for relpath, data in (files or {}).items():
        storage.write_bytes(storage.join(version_uri, relpath), data)
    manifest_uri = storage.join(version_uri, "manifest.json")
    storage.write_bytes(manifest_uri, manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    return manifest_uri


def leftovers(folder: Path) -> list[str]:
    """Staging or set-aside folders a pull left beside its destination."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


# ---------------------------------------------------------------------- 1. writing outside

def hostile_paths(sibling: Path) -> list[str]:
    """Manifest file paths that would escape a destination, or are too odd to trust."""
    return [
        "../sibling/secret.txt",
        "../../sibling/secret.txt",
        str(sibling / "secret.txt"),               # absolute: once deleted on a wrong checksum
        str(sibling / "nested" / "config.json"),   # absolute, and its bytes match a real entry
        "a/../../sibling/secret.txt",
        "a/../config.json",                         # stays inside, but '..' is refused all the same
        "..",
        ".",
        "",
        "/",
        "./config.json",
        "a/./b",
        "a//b",
        "a/",
        "..\\sibling\\secret.txt",
        "a\\b",
        "a\x00b",
        "config.json\x00",
        "a\nb",
        "x" * 300,                                  # a component no file system holds
    ]


def test_hostile_manifest_paths_are_refused_and_nothing_outside_changes(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    sibling = make_sibling(tmp_path)
    before = snapshot(sibling)
    dest = tmp_path / "pulled"

    paths = hostile_paths(sibling)
    for index, path in enumerate(paths):
        version = index + 2
        # Half with a wrong checksum (the old delete-on-mismatch path), half with the right one.
        entry = {"sha256": "0" * 64 if index % 2 else sha256_of(SECRET_BYTES), "bytes": len(SECRET_BYTES)}
        manifest_uri = plant_version(root, version, {"name": "tiny", "version": version,
                                                     "files": {"config.json": GOOD_ENTRY, path: entry}},
                                     files={"config.json": CONFIG_BYTES})
        for attempt in (lambda: registry.download("tiny", version, dest),
                        lambda: registry.verify("tiny", version),
                        lambda: registry.get("tiny", version)):
            with pytest.raises(UnsafePathError) as caught:
                attempt()
            assert caught.value.where == manifest_uri and caught.value.path == path
            assert str(caught.value).startswith(f"{manifest_uri}: unsafe path ")
            assert len(str(caught.value)) < len(manifest_uri) + 200  # never the whole 300-byte name
        assert not os.path.lexists(dest), path
        assert leftovers(tmp_path) == [], path
        assert snapshot(sibling) == before, f"pulling a manifest listing {path!r} changed the sibling folder"

    # The good version is still there, and 'latest' skips the broken ones (saying so).
    with pytest.warns(RegistryWarning, match=r"skipping broken version \d+ of 'tiny'"):
        assert registry.get("tiny").version == 1
    with pytest.warns(RegistryWarning) as caught_warnings:
        assert [v.version for v in registry.list("tiny")] == [1]
    assert len(caught_warnings) == len(paths)
    with pytest.warns(RegistryWarning):
        registry.download("tiny", "latest", dest)
    assert (dest / "config.json").read_bytes() == CONFIG_BYTES
    assert snapshot(sibling) == before


def test_a_path_that_resolves_outside_through_a_symlink_is_refused(tmp_path):
    folder = tmp_path / "staging"
    folder.mkdir()
    (folder / "link").symlink_to(make_sibling(tmp_path))
    with pytest.raises(UnsafePathError, match="'link/secret.txt': resolves outside"):
        registry_module._target_inside(folder, "link/secret.txt", where="m/manifest.json")
    assert registry_module._target_inside(folder, "a/b.json", where="m/manifest.json") == folder / "a" / "b.json"


@pytest.mark.parametrize("file_name", ["a\\b", "line\nbreak", "tab\there", "del\x7f"])
def test_register_refuses_file_names_no_manifest_may_hold(root, tmp_path, file_name):
    model_dir = make_model_dir(tmp_path / "a")
    try:
        (model_dir / file_name).write_bytes(b"odd")
    except OSError:
        pytest.skip(f"this file system does not hold {file_name[:20]!r}")
    with pytest.raises(UnsafePathError) as caught:
        Registry(root).register("tiny", model_dir, {})
    assert caught.value.where == str(model_dir) and caught.value.path == file_name
    assert not storage.exists(storage.join(root, "tiny", "claims", "1"))


# ---------------------------------------------------------------------- 2. all or nothing

def test_a_pull_that_fails_a_checksum_leaves_nothing_in_dest(root, tmp_path):
    registry = Registry(root)
    version = registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    # The last file copied is the bad one: every other file was already written.
    storage.write_bytes(storage.join(version.uri, "tokenizer", "tokenizer.json"), b"{ }")
    with pytest.raises(ChecksumMismatch, match="tokenizer/tokenizer.json"):
        registry.download("tiny", 1, tmp_path / "new" / "pulled")
    assert not (tmp_path / "new" / "pulled").exists()
    assert leftovers(tmp_path / "new") == []

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChecksumMismatch):
        registry.download("tiny", 1, empty)
    assert list(empty.iterdir()) == [] and leftovers(tmp_path) == []


def test_a_failed_repull_keeps_the_earlier_pull(root, tmp_path):
    registry = Registry(root)
    version = registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    dest = registry.download("tiny", 1, tmp_path / "pulled")
    before = snapshot(dest)
    storage.write_bytes(storage.join(version.uri, "model.safetensors"), b"tampered")
    with pytest.raises(ChecksumMismatch, match="model.safetensors"):
        registry.download("tiny", 1, dest)
    assert snapshot(dest) == before
    assert leftovers(tmp_path) == []


def test_pull_into_an_existing_dest(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    registry.register("tiny", make_model_dir(tmp_path / "b", b"v2 weights"), {})

    # An earlier pull of the same version is replaced by a fresh, verified copy.
    dest = registry.download("tiny", 1, tmp_path / "pulled")
    (dest / "config.json").write_bytes(b"edited by hand")
    assert registry.download("tiny", "1", dest) == dest
    assert (dest / "config.json").read_bytes() == CONFIG_BYTES
    assert leftovers(tmp_path) == []

    def refused(dest: Path, match: str) -> None:
        before = snapshot(dest) if dest.is_dir() and not dest.is_symlink() else dest.lstat().st_mtime_ns
        with pytest.raises(DestinationExistsError, match=match) as caught:
            registry.download("tiny", 1, dest)
        assert caught.value.dest == str(dest.absolute())
        after = snapshot(dest) if dest.is_dir() and not dest.is_symlink() else dest.lstat().st_mtime_ns
        assert after == before and leftovers(dest.parent) == []

    # An earlier pull of another version, a user's folder, a pull with the user's own file in it.
    other = registry.download("tiny", 2, tmp_path / "v2")
    refused(other, r"not an earlier pull of tiny v1")
    users = tmp_path / "users"
    (users / "work").mkdir(parents=True)
    (users / "work" / "notes.txt").write_text("mine")
    refused(users, r"not an earlier pull of tiny v1")
    (dest / "notes.txt").write_text("mine")
    refused(dest, r"holds 'notes.txt', which is not part of the earlier pull of tiny v1")
    (dest / "notes.txt").unlink()
    (dest / "tokenizer" / "extra").mkdir()
    refused(dest, r"holds 'tokenizer/extra'")
    (dest / "tokenizer" / "extra").rmdir()
    (dest / "link").symlink_to(tmp_path / "users")
    refused(dest, r"holds 'link'")
    (dest / "link").unlink()
    # Not a folder: a file, a link to a folder.
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    refused(a_file, "exists and is not a folder")
    link = tmp_path / "link-to-users"
    link.symlink_to(users)
    refused(link, "exists and is not a folder")
    if not storage.is_s3(root):
        inside = Path(root) / "tiny" / "copy"
        with pytest.raises(DestinationExistsError, match="inside the registry"):
            registry.download("tiny", 1, inside)
        assert not inside.exists()
    # After all that, dest is still a good pull of v1.
    assert registry.download("tiny", 1, dest) == dest


# ---------------------------------------------------------------------- 3. symlinks in a model folder

def test_register_refuses_symlinks_that_leave_the_model_folder(root, tmp_path):
    secrets = tmp_path / "home" / ".aws"
    secrets.mkdir(parents=True)
    (secrets / "credentials").write_bytes(SECRET_BYTES)
    registry = Registry(root)
    outside_links = {
        "credentials": secrets / "credentials",                   # a file outside
        "aws": secrets,                                           # a folder outside
        "tokenizer/up.json": Path("../../home/.aws/credentials"),  # relative, climbing out
        "chain": Path("tokenizer/up.json"),                       # inside, to a link that leaves
    }
    for index, (link_name, target) in enumerate(outside_links.items()):
        model_dir = make_model_dir(tmp_path / f"m{index}")
        (model_dir / link_name).symlink_to(target)
        if link_name == "chain":
            (model_dir / "tokenizer" / "up.json").symlink_to("../../home/.aws/credentials")
        with pytest.raises(UnsafePathError, match="outside the folder") as caught:
            registry.register("tiny", model_dir, {})
        assert caught.value.where == str(model_dir)
        assert caught.value.path in (link_name, "tokenizer/up.json")
    assert registry.list("tiny") == [] and not storage.exists(storage.join(root, "tiny", "claims", "1"))
    for uri in storage.list_files(root):
        assert SECRET_BYTES not in storage.read_bytes(uri), uri

    # Links that stay inside: a file link is followed (a copy under its own name), a folder
    # link is skipped (its files are registered under their real path).
    model_dir = make_model_dir(tmp_path / "inside")
    (model_dir / "params.json").symlink_to("config.json")
    (model_dir / "tokenizer-link").symlink_to("tokenizer")
    (model_dir / "loop").symlink_to(".")
    version = registry.register("tiny", model_dir, {})
    assert sorted(version.manifest["files"]) == [
        "config.json", "model.safetensors", "params.json", "tokenizer/tokenizer.json",
    ]
    pulled = registry.download("tiny", version.version, tmp_path / "pulled")
    assert (pulled / "params.json").read_bytes() == CONFIG_BYTES and not (pulled / "params.json").is_symlink()


def test_register_refuses_a_fifo(root, tmp_path):
    model_dir = make_model_dir(tmp_path / "a")
    os.mkfifo(model_dir / "pipe")  # reading it would block forever
    with pytest.raises(UnsafePathError, match="'pipe': is not a regular file"):
        Registry(root).register("tiny", model_dir, {})


# ---------------------------------------------------------------------- 4. hand-edited manifests

def broken_manifests() -> list[tuple[bytes | dict, str]]:
    """``(manifest.json content, the problem the error must name)``."""
    files = {"config.json": GOOD_ENTRY}
    return [
        (b"", "is not JSON (Expecting value at line 1 column 1)"),
        (b"{oops", "is not JSON"),
        (b"\xff\xff", "is not UTF-8 text"),
        (b"[" * 100_000, "is not JSON the registry can read (RecursionError)"),
        (b'{"files": {"a": {"sha256": "0", "bytes": ' + b"7" * 5000 + b"}}}", "is not JSON the registry can read"),
        (b"[1, 2]", "is a JSON array, not an object"),
        (b'"files"', "is a JSON string, not an object"),
        (b"null", "is a JSON null, not an object"),
        ({"name": "tiny"}, "has no 'files'"),
        ({"files": {}}, "'files' is empty; a version holds at least one file"),
        ({"files": []}, "'files' is a JSON array, not an object"),
        ({"files": None}, "'files' is a JSON null, not an object"),
        ({"files": {"config.json": 5}}, "files['config.json'] is a JSON number, not an object"),
        ({"files": {"config.json": {"bytes": 42}}}, "files['config.json'] has no 'sha256'"),
        ({"files": {"config.json": {**GOOD_ENTRY, "sha256": "ab" * 31}}}, "has no 'sha256' of 64"),
        ({"files": {"config.json": {**GOOD_ENTRY, "sha256": GOOD_ENTRY["sha256"].upper()}}}, "lowercase hex"),
        ({"files": {"config.json": {**GOOD_ENTRY, "sha256": "g" * 64}}}, "has no 'sha256' of 64"),
        ({"files": {"config.json": {"sha256": GOOD_ENTRY["sha256"]}}}, "has no 'bytes'"),
        ({"files": {"config.json": {**GOOD_ENTRY, "bytes": -1}}}, "has no 'bytes' (a non-negative integer)"),
        ({"files": {"config.json": {**GOOD_ENTRY, "bytes": "42"}}}, "has no 'bytes'"),
        ({"files": {"config.json": {**GOOD_ENTRY, "bytes": True}}}, "has no 'bytes'"),
        ({"files": {"config.json": {**GOOD_ENTRY, "bytes": 42.0}}}, "has no 'bytes'"),
        ({"files": {**files, "config.json/x": GOOD_ENTRY}}, "'config.json' both as a file and as a folder"),
        ({"files": {**files, "manifest.json": GOOD_ENTRY}}, "a file the registry writes itself"),
    ]


def test_broken_manifests_are_named_and_never_hide_the_good_versions(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {"metrics": {"eval_loss": 2.0}})
    cases = broken_manifests()
    uris = {}
    for index, (content, problem) in enumerate(cases):
        uris[index + 2] = plant_version(root, index + 2, content, files={"config.json": CONFIG_BYTES})
    good = registry.register("tiny", make_model_dir(tmp_path / "b"), {"metrics": {"eval_loss": 1.0}})
    assert good.version == len(cases) + 2
    newest_broken = plant_version(root, good.version + 1, {"files": {}})
    registry.set_alias("tiny", "champion", good.version)

    for (version, uri), (_, problem) in zip(uris.items(), cases):
        with pytest.raises(InvalidManifestError) as caught:
            registry.get("tiny", version)
        assert caught.value.uri == uri and problem in caught.value.problem, (version, str(caught.value))
        assert str(caught.value).startswith(f"{uri}: ") and len(str(caught.value)) < len(uri) + 150
        with pytest.raises(InvalidManifestError):
            registry.verify("tiny", version)
        with pytest.raises(InvalidManifestError):
            registry.download("tiny", version, tmp_path / "pulled")
        assert not (tmp_path / "pulled").exists()

    with pytest.warns(RegistryWarning) as caught_warnings:
        assert [v.version for v in registry.list("tiny")] == [1, good.version]
    assert sorted(str(w.message).split(": ")[1] for w in caught_warnings) == sorted([*uris.values(), newest_broken])
    with pytest.warns(RegistryWarning, match=f"skipping broken version {good.version + 1} of 'tiny'"):
        assert registry.get("tiny", "latest").version == good.version
    assert registry.get("tiny", "champion").version == good.version
    assert registry.list_models() == ["tiny"]

    listed = run_cli("--root", root, "list", "tiny")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert sorted(map(int, rows)) == list(range(1, good.version + 2))
    assert "eval_loss=2" in rows["1"] and "champion" in rows[str(good.version)]
    assert "broken: 'files' is empty" in rows[str(good.version + 1)]
    assert f"warning: skipping broken version {good.version + 1} of 'tiny': {newest_broken}" in listed.stderr
    models = run_cli("--root", root, "list")
    assert models.returncode == 0, models.stderr
    assert models.stdout.splitlines()[1].split() == [
        "tiny", "2", f"(+{len(cases) + 1}", "broken)", str(good.version), f"champion=v{good.version}",
    ]
    shown = run_cli("--root", root, "show", "tiny", str(good.version + 1))
    assert (shown.returncode, shown.stderr) == (1, f"error: {newest_broken}: 'files' is empty; "
                                                   "a version holds at least one file\n")
    shown = run_cli("--root", root, "show", "tiny", "latest")
    assert shown.returncode == 0 and f"warning: skipping broken version {good.version + 1}" in shown.stderr


def test_all_versions_broken_raises_the_newest_error_instead_of_falling_back(root, tmp_path):
    plant_version(root, 1, b"[]", files={"config.json": CONFIG_BYTES})
    newest = plant_version(root, 2, b"{oops")
    registry = Registry(root)
    with pytest.raises(InvalidManifestError, match="is not JSON") as caught:
        registry.get("tiny")
    assert caught.value.uri == newest
    with pytest.warns(RegistryWarning) as caught_warnings:
        assert registry.list("tiny") == []
    assert len(caught_warnings) == 2
    assert registry.register("tiny", make_model_dir(tmp_path / "a"), {}).version == 3
    assert registry.get("tiny").version == 3  # only a newer broken version is warned about


# ---------------------------------------------------------------------- 5. spellings

ODD_VERSION_FOLDERS = ["²", "١٢", "٣", "0", "01", "-1", "1.0", "+2", " 4", "5 ", "6\n", "x", "1e3", "٠"]


def test_only_ascii_decimal_folders_count_as_versions(root, tmp_path):
    registry = Registry(root)
    good = registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    for folder in ODD_VERSION_FOLDERS:
        if "\n" in folder and storage.is_s3(root):
            continue  # moto answers 404 to a key with a newline (real S3 stores it)
        plant_version(root, folder, good.manifest, files={"config.json": CONFIG_BYTES})
        storage.write_bytes(storage.join(root, "tiny", "claims", folder), b"{}")
        storage.write_bytes(storage.join(root, "tiny", "aliases", "champion", "history", f"{folder}.json"),
                            json.dumps({"version": 1, "seq": 9}).encode())
    assert [v.version for v in registry.list("tiny")] == [1]
    assert registry.get("tiny").version == 1 and registry.list_models() == ["tiny"]
    assert registry.aliases("tiny") == {}
    assert registry.register("tiny", make_model_dir(tmp_path / "b"), {}).version == 2
    assert registry.set_alias("tiny", "champion", 2)["seq"] == 1
    assert registry.aliases("tiny") == {"champion": 2}
    assert [v.version for v in registry.list("tiny")] == [1, 2]

    for spelling in ["²", "١", "٢", "𝟐", "2\n", " 2", "+2", "2.0", "1" * 40]:
        with pytest.raises((ValueError, NotFoundError)):  # "2.0" is a fine alias name, just not set
            registry.get("tiny", spelling)
        with pytest.raises(ValueError):
            registry.set_alias("tiny", "champion", spelling)
        with pytest.raises(ValueError):
            registry.promote_if_better("tiny", spelling, metric="x", min_delta=0.0)
    for number in [-1, 10**40, True, 2.0]:
        with pytest.raises(ValueError):
            registry.set_alias("tiny", "champion", number)
    assert registry.get("tiny", "02").version == 2  # ASCII digits with a leading zero still name 2
    promoted = run_cli("--root", root, "promote", "tiny", "١")
    assert promoted.returncode == 2 and "ASCII digits" in promoted.stderr
    assert registry.aliases("tiny") == {"champion": 2}


def test_names_and_aliases_must_match_in_full(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    registry.set_alias("tiny", "champion", 1)
    model_dir = make_model_dir(tmp_path / "b")
    for bad in ["champion\n", "champion\r", "tiny\n", "\nchampion"]:
        with pytest.raises(ValueError, match="invalid"):
            registry.set_alias("tiny", bad, 1)
        with pytest.raises(ValueError, match="invalid"):
            registry.get("tiny", bad)
        with pytest.raises(ValueError, match="invalid name"):
            registry.register(bad, model_dir, {})
    # Planted by hand: a second "champion" with a newline, a model "tiny\n" (moto answers 404
    # to a key with a newline, so S3 gets a carriage return, which '$' never let through).
    end = "\r" if storage.is_s3(root) else "\n"
    storage.write_bytes(storage.join(root, "tiny", "aliases", f"champion{end}", "history", "1.json"),
                        json.dumps({"alias": f"champion{end}", "version": 1, "seq": 1, "when": "x"}).encode())
    plant_version(root, 1, registry.get("tiny", 1).manifest, name=f"tiny{end}")
    assert registry.aliases("tiny") == {"champion": 1}
    assert [entry["alias"] for entry in registry.alias_history("tiny")] == ["champion"]
    assert registry.list_models() == ["tiny"]
    listed = run_cli("--root", root, "list", "tiny")
    assert [line.split()[2] for line in listed.stdout.splitlines()[1:]] == ["champion"]


# ---------------------------------------------------------------------- 6. gc

def kill_a_registration(root: str, model_dir: Path) -> None:
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_MANIFEST, root, str(model_dir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert killed.returncode == 9, killed.stderr


def registry_objects(root: str) -> dict[str, bytes]:
    return {uri: storage.read_bytes(uri) for uri in storage.list_files(root)}


def test_gc_removes_the_debris_of_killed_registrations_and_keeps_young_ones(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    kill_a_registration(root, make_model_dir(tmp_path / "b"))     # claims 2, leaves its files
    old_done = time.time()
    kept_before = registry_objects(root)
    # S3 lists LastModified in whole seconds: keep the two registrations well apart.
    time.sleep(max(0.0, old_done + 4.0 - time.time()))
    kill_a_registration(root, make_model_dir(tmp_path / "c"))     # claims 3: young, "in progress"
    registry.register("tiny", make_model_dir(tmp_path / "d"), {})  # version 4
    registry.set_alias("tiny", "champion", 4)
    if storage.is_s3(root):
        debris_of = {2: [storage.join(root, "tiny", "versions", "2")], 3: [storage.join(root, "tiny", "versions", "3")]}
    else:
        staging = sorted(Path(root, "tiny", ".staging").iterdir(), key=lambda p: p.stat().st_mtime)
        assert len(staging) == 2
        debris_of = {2: [str(staging[0])], 3: [str(staging[1])]}

    assert registry.gc() == []  # the default grace is a day
    assert registry.gc(grace_s=3.0, dry_run=True) == debris_of[2]
    assert registry.gc(grace_s=3.0) == debris_of[2]
    assert registry.gc(grace_s=3.0) == []
    # The young registration is untouched; the old one's files are gone, its claim stays.
    assert storage.list_files(debris_of[3][0])
    remaining = registry_objects(root)
    assert not any(uri.startswith(debris_of[2][0] + "/") for uri in remaining)
    for uri, data in kept_before.items():
        if not uri.startswith(debris_of[2][0] + "/"):
            assert remaining[uri] == data, uri
    assert storage.exists(storage.join(root, "tiny", "claims", "2"))

    dry = run_cli("--root", root, "gc", "--grace-hours", "0", "--dry-run")
    assert (dry.returncode, dry.stdout) == (0, f"would remove {debris_of[3][0]}\n")
    removed = run_cli("--root", root, "gc", "--grace-hours", "0")
    assert (removed.returncode, removed.stdout) == (0, f"removed {debris_of[3][0]}\n")
    assert run_cli("--root", root, "gc", "--grace-hours", "0").stdout == "nothing to remove\n"

    assert [v.version for v in registry.list("tiny")] == [1, 4]
    assert registry.aliases("tiny") == {"champion": 4}
    for version in (1, 4):
        registry.verify("tiny", version)
    assert all(storage.exists(storage.join(root, "tiny", "claims", str(n))) for n in (1, 2, 3, 4))
    assert registry.register("tiny", make_model_dir(tmp_path / "e"), {}).version == 5
    if not storage.is_s3(root):
        assert os.listdir(Path(root) / "tiny" / ".staging") == []


def test_gc_removes_stale_temp_files_and_incomplete_uploads(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    registry.set_alias("tiny", "champion", 1)
    if storage.is_s3(root):
        bucket, key = storage.split_s3(storage.join(root, "tiny", "versions", "2", "model.safetensors"))
        storage.s3_client().create_multipart_upload(Bucket=bucket, Key=key)
        expected = [f"s3://{bucket}/{key} (incomplete upload)"]
        # (moto reports every upload as started in 2010, so its age cannot be tested here)
    else:
        temp_files = [Path(root, "tiny", "claims", f".2.{'a' * 32}.tmp"),
                      Path(root, "tiny", "aliases", "champion", "history", f".2.json.{'b' * 32}.tmp")]
        for path in temp_files:
            path.write_bytes(b"{}")
            os.utime(path, (time.time() - 3 * 86400,) * 2)
        (Path(root, "tiny", "claims") / ".note.tmp").write_bytes(b"not ours")
        expected = [str(path) for path in temp_files]
    assert registry.gc(dry_run=True) == expected
    assert registry.gc() == expected
    assert registry.gc(grace_s=0) == []
    if storage.is_s3(root):
        assert storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    else:
        assert (Path(root, "tiny", "claims") / ".note.tmp").exists()
    assert registry.aliases("tiny") == {"champion": 1}
    with pytest.raises(ValueError, match="grace_s"):
        registry.gc(grace_s=-1)


def test_gc_never_removes_a_hand_named_folder_or_a_complete_version(root, tmp_path):
    registry = Registry(root)
    version = registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    plant_version(root, "backup", version.manifest, files={"config.json": CONFIG_BYTES})
    storage.write_bytes(storage.join(root, "tiny", "versions", "٣", "config.json"), CONFIG_BYTES)
    plant_version(root, 7, b"{broken", files={"config.json": CONFIG_BYTES})
    before = registry_objects(root)
    assert registry.gc(grace_s=0) == []
    assert registry_objects(root) == before


# ---------------------------------------------------------------------- 7. CLI exits

def test_cli_exits_1_for_a_missing_root_or_model(root, tmp_path):
    missing_root = str(tmp_path / "no-such-registry") if not storage.is_s3(root) else \
        f"s3://{storage.split_s3(root)[0]}-missing/registry"
    for args in (["list"], ["list", "tiny"], ["show", "tiny", "1"], ["pull", "tiny", "1", str(tmp_path / "p")],
                 ["promote", "tiny", "1"], ["gc"]):
        result = run_cli("--root", missing_root, *args)
        assert (result.returncode, result.stderr) == (1, f"error: registry root {missing_root!r} does not exist\n")
        assert result.stdout == ""

    # An existing but empty root: an empty table; an unknown model: an error, not an empty table.
    if not storage.is_s3(root):
        Path(root).mkdir()
    empty = run_cli("--root", root, "list")
    assert (empty.returncode, empty.stdout.split()) == (0, ["model", "versions", "latest", "aliases"])
    Registry(root).register("tiny", make_model_dir(tmp_path / "a"), {})
    unknown = f"error: model 'nope' has no complete version in {root!r}\n"
    for args in (["list", "nope"], ["show", "nope", "1"], ["show", "nope", "latest"], ["show", "nope", "champion"],
                 ["pull", "nope", "1", str(tmp_path / "p")]):
        result = run_cli("--root", root, *args)
        assert (result.returncode, result.stderr, result.stdout) == (1, unknown, ""), args
    assert not (tmp_path / "p").exists()
    for args, message in ((["show", "tiny", "prod"], "has no alias 'prod'"), (["list", "../x"], "invalid name"),
                          (["pull", "tiny", "1", str(tmp_path / "a")], "is not an earlier pull of tiny v1")):
        result = run_cli("--root", root, *args)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, args


def test_pull_leaves_no_staging_folder_behind_on_success(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    with pytest.raises(NotFoundError):
        registry.download("tiny", 7, tmp_path / "pulled")
    registry.download("tiny", 1, tmp_path / "deep" / "er" / "pulled")
    assert sorted(p.name for p in (tmp_path / "deep" / "er").iterdir()) == ["pulled"]
