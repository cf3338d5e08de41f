"""Shared test set-up: offline Hugging Face, a Metaflow user, the builtin model built once."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("METAFLOW_USER", "posttrain-tests")
# The session's default run trains in the background while other tests run (see BackgroundRun):
# OpenMP threads that spin while a sibling waits for a core would burn the core that sibling needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# metaflow.Runner imports metaflow's vendored (old) typing_extensions, which replaces
# typing._collect_parameters for the whole process with a version that rejects TypeVar defaults;
# torch modules imported after that fail ("Type parameter ~_T1 without a default follows type
# parameter with a default"). Import it once here and put the standard function back.
import typing  # noqa: E402

_collect_parameters = getattr(typing, "_collect_parameters", None)
import metaflow._vendor.typing_extensions  # noqa: E402,F401

if _collect_parameters is not None:
    typing._collect_parameters = _collect_parameters

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory) -> Path:
    """The builtin tiny Llama (model + tokenizer), built once per test session."""
    from steps.builtin import ensure_builtin_model

    return ensure_builtin_model("tiny-llama", tmp_path_factory.mktemp("builtin-cache"))


@pytest.fixture()
def metaflow_env(tmp_path, monkeypatch) -> Path:
    """A private Metaflow datastore for one test (the Client reads the same one)."""
    sysroot = tmp_path / "metaflow"
    sysroot.mkdir()
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(sysroot))
    monkeypatch.setenv("METAFLOW_USER", "posttrain-tests")
    return sysroot


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real local S3 endpoint: moto in server mode on a free loopback port, for the session.

    Sets the environment (endpoint, fake credentials, region) for boto3 and Metaflow, and
    yields the endpoint URL. If ``$POSTTRAIN_TEST_S3_ENDPOINT`` names a running server
    (``.ci/run`` may start one), that server is used instead.
    """
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    endpoint = os.environ.get("POSTTRAIN_TEST_S3_ENDPOINT")
    proc = None
    if not endpoint:
        port = _free_port()
        server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}; see {log.name}")
                time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in [*env, "METAFLOW_S3_ENDPOINT_URL"]}
    os.environ.update(env, METAFLOW_S3_ENDPOINT_URL=endpoint)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket on the local S3 endpoint; returns its name."""
    from steps.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------------------------
# The session's default run: `python flows/sft_flow.py run`, started in the background


@dataclass(frozen=True)
class FinishedRun:
    """A finished SFTFlow run that several tests inspect. Read it; never register into it."""

    pathspec: str
    sysroot: Path
    """Its Metaflow datastore (``METAFLOW_DATASTORE_SYSROOT_LOCAL``), cards included."""
    storage: Path
    """Its posttrain storage: run roots, the builtin model, ``registry/``."""

    @property
    def env(self) -> dict:
        """The environment that points a Metaflow Client (a notebook kernel) at this run."""
        return {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(self.sysroot)}

    def client_run(self):
        """The run through the Metaflow Client, which is pointed at this run's datastore first
        (other tests point it elsewhere in between)."""
        from metaflow import Run, metadata, namespace

        metadata(f"local@{self.sysroot}")
        namespace(None)
        return Run(self.pathspec)


class BackgroundRun:
    """``python flows/sft_flow.py run`` (the embedded default recipe) in a child process.

    It runs from ``<root>/metaflow``, which holds its datastore, so that its cards land where the
    card client reads them (see ``test_flow.run_flow``); its files go to ``<root>/storage``.
    """

    def __init__(self, root: Path):
        self.root = root
        self.sysroot = root / "metaflow"
        (self.sysroot / ".metaflow").mkdir(parents=True)
        self.log_path = root / "run.log"
        env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(self.sysroot),
               "POSTTRAIN_STORAGE": str(root / "storage"), "METAFLOW_USER": "posttrain-tests",
               "HF_HUB_OFFLINE": "1"}
        with open(self.log_path, "wb") as log:
            # A session of its own, so that stop() reaches the flow's tasks and torchrun too.
            # Niced: the tests in the foreground are chains of short processes that wait on each
            # other; this run is one long computation that can take whatever they leave idle.
            nice = ["nice", "-n", "10"] if shutil.which("nice") else []
            self.proc = subprocess.Popen(
                [*nice, sys.executable, str(PROJECT_ROOT / "flows" / "sft_flow.py"), "run",
                 "--run-id-file", str(root / "run-id")],
                cwd=self.sysroot, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # When it started and ended, and how long tests blocked on it: the terminal summary prints
        # them, so a CI log shows whether this run or the foreground tests set the suite's length.
        # (Its end is the log's last write: no waiter thread, since the suite forks processes.)
        self.started_at, self.waited_s = time.time(), 0.0

    @property
    def ended_at(self) -> float | None:
        return self.log_path.stat().st_mtime if self.proc.poll() is not None else None

    def wait(self, timeout_s: float = 3600) -> FinishedRun:
        """Block until the run ends; fail with the end of its log unless it succeeded."""
        blocked_at = time.monotonic()
        returncode = self.proc.wait(timeout=timeout_s)
        self.waited_s += time.monotonic() - blocked_at
        log = self.log_path.read_text(errors="replace")
        assert returncode == 0, f"the default run failed (exit {returncode}):\n{log[-8000:]}"
        run_id = (self.root / "run-id").read_text().strip()
        return FinishedRun(pathspec=f"SFTFlow/{run_id}", sysroot=self.sysroot, storage=self.root / "storage")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


_background: dict[str, BackgroundRun] = {}


def _start_default_run(tmp_path_factory: pytest.TempPathFactory) -> BackgroundRun:
    if "default" not in _background:
        _background["default"] = BackgroundRun(tmp_path_factory.mktemp("default-run"))
    return _background["default"]


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(config, items):
    """Run the tests that inspect the default run last: it is made in the background meanwhile."""
    items.sort(key=lambda item: "default_run" in item.fixturenames)  # stable: keeps the order


def pytest_collection_finish(session):
    """Start the default run as soon as the session knows that a selected test needs it.

    It is the longest thing in the suite (~6.5 min on 2 cores, mostly one training process), and
    the rest of the suite (flows that mostly wait on process start-up, unit tests) runs meanwhile,
    so the two share the cores instead of taking turns.
    """
    needed = any("default_run" in item.fixturenames for item in session.items)
    if needed and not session.config.option.collectonly:
        # The object behind the tmp_path_factory fixture (no fixture can be requested from a hook).
        _start_default_run(session.config._tmp_path_factory)


_SESSION_START = time.time()


def pytest_terminal_summary(terminalreporter):
    for name, run in _background.items():
        start = run.started_at - _SESSION_START
        end = f"ended at +{run.ended_at - _SESSION_START:.0f} s" if run.ended_at else "still running"
        terminalreporter.write_line(
            f"background {name} run: started at +{start:.0f} s, {end}; tests waited {run.waited_s:.0f} s for it")


def pytest_configure(config):
    """A SIGTERM'd pytest (a CI timeout, `kill`) ends without pytest_sessionfinish: stop the
    background runs first, or their flow and torchrun would go on without anyone waiting."""
    previous = signal.getsignal(signal.SIGTERM)
    session_pid = os.getpid()

    def stop_then_die(signum, frame):
        # Processes forked from pytest (multiprocessing workers) inherit this handler: only the
        # session's own process may stop the runs; a worker just dies as it would have.
        if os.getpid() == session_pid:
            for run in _background.values():
                run.stop()
        signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_then_die)


def pytest_sessionfinish(session):
    for run in _background.values():
        run.stop()  # only if still running: the session was interrupted or stopped early (-x)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> FinishedRun:
    """The embedded default recipe, run once per session as `python flows/sft_flow.py run` runs
    it (no --config; ``$POSTTRAIN_STORAGE`` keeps its files in the session's temporary folder).

    The acceptance test needs this run anyway (it learns the task); the tests that only need
    *a* finished run (cards, notebooks, artifacts, the registered model) inspect it instead of
    making runs of their own.
    """
    return _start_default_run(tmp_path_factory).wait()


# --------------------------------------------------------------------------------------------
# Ingest accounting: every ingest that a test_ingest* module runs is checked


def check_ingest_accounting(manifest: dict) -> list[dict]:
    """records read = distinct valid (kept, or left out by a weight below 1) + duplicates +
    rejects, and every reject names a reason, a detail and its line or row. Returns the rejects."""
    import json as json_

    with open(manifest["rejects_uri"], encoding="utf-8") as handle:
        rejects = [json_.loads(line) for line in handle]
    assert manifest["num_records_read"] == manifest["num_valid"] + manifest["num_duplicates"] + len(rejects), manifest
    assert manifest["num_rejected"] == len(rejects) == sum(manifest["reject_reasons"].values())
    assert sum(source["num_read"] for source in manifest["sources"]) == manifest["num_records_read"]
    for reject in rejects:
        assert reject["reason"] and reject["detail"] and reject["source"], reject
        assert isinstance(reject["position"], int) and reject["position"] >= 0, reject
    return rejects


@pytest.fixture(autouse=True)
def _ingest_accounting_is_checked(request, monkeypatch):
    """In the ingest test modules, every call of ``steps.ingest.ingest`` checks its accounting."""
    if not request.module.__name__.startswith("test_ingest"):
        yield
        return
    import steps.ingest

    original = steps.ingest.ingest

    def checked(*args, **kwargs):
        manifest = original(*args, **kwargs)
        check_ingest_accounting(manifest)
        return manifest

    monkeypatch.setattr(steps.ingest, "ingest", checked)
    if getattr(request.module, "ingest", None) is original:
        monkeypatch.setattr(request.module, "ingest", checked)
    yield
