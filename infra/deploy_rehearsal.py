"""A deploy rehearsal on one machine: render the retrain flow's Argo templates against a local S3.

    python infra/deploy_rehearsal.py                       # configs/retrain_prod.yaml, ~1 min
    python infra/deploy_rehearsal.py --out /tmp/rehearsal  # also keep the rendered templates

What it does, in order (infra/README.md walks through it):

1. starts a local S3 server (``moto_server``, installed with the ``dev`` extra) on 127.0.0.1 and a
   free port, with fake credentials, and creates the bucket of the recipe's ``retrain.drops``;
2. writes a temporary Metaflow profile: infra/metaflow_config.template.json with every ``<...>``
   filled in for that S3 (datastore, sysroot, endpoint), a metadata service URL that is never
   contacted, and Kubernetes / Argo / Argo Events settings;
3. drops one data file with ``python -m steps.retrain drop`` and asks ``select_drops`` what the
   next retrain of the recipe would train on;
4. runs ``python flows/retrain_flow.py --config recipe RECIPE --production argo-workflows create
   --only-json`` twice, without and with ``POSTTRAIN_TRIGGER_EVENT``, and checks the
   WorkflowTemplate: the cron schedule from ``retrain.schedule``, the ``prod`` branch, the
   ``@parallel`` train step as a JobSet (control + worker), the image on every container, and the
   event trigger;
5. stops the S3 server and removes the temporary profile, whatever happened.

Nothing reaches a cluster: ``--only-json`` prints what ``argo-workflows create`` would submit.
Real clusters stay the production path. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOW = ROOT / "flows" / "retrain_flow.py"
TEMPLATE = Path(__file__).resolve().parent / "metaflow_config.template.json"
CRON = {"hourly": "0 * * * ?", "daily": "0 0 * * ?", "weekly": "0 0 ? * SUN"}  # what @schedule renders
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1"}
EVENT = "posttrain-new-data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_s3(log_path: Path) -> Iterator[str]:
    """``moto_server`` on 127.0.0.1 and a free port; yields its URL and stops it on exit."""
    server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(server).exists():
        raise SystemExit("moto_server is not installed: pip install -e '.[dev]'")
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}; see {log_path}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def rehearsal_profile(bucket: str, endpoint: str, image: str) -> dict:
    """infra/metaflow_config.template.json with every placeholder filled in for the local S3."""
    profile = {k: v for k, v in json.loads(TEMPLATE.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    registry, _, name = image.rpartition("/")
    profile.update({
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{bucket}/metaflow",
        "METAFLOW_DATATOOLS_S3ROOT": f"s3://{bucket}/metaflow/data",
        "METAFLOW_CARD_S3ROOT": f"s3://{bucket}/metaflow/mf.cards",
        "METAFLOW_S3_ENDPOINT_URL": endpoint,
        "METAFLOW_SERVICE_URL": "http://127.0.0.1:9/api",  # written into the pods' environment, never called here
        "METAFLOW_SERVICE_INTERNAL_URL": "http://metaflow-service.posttrain.svc.cluster.local:8080",
        "METAFLOW_KUBERNETES_NAMESPACE": "posttrain",
        "METAFLOW_KUBERNETES_SERVICE_ACCOUNT": "posttrain",
        "METAFLOW_KUBERNETES_CONTAINER_REGISTRY": registry,
        "METAFLOW_KUBERNETES_CONTAINER_IMAGE": name,
        "METAFLOW_KUBERNETES_SECRETS": "posttrain-aws",
        "METAFLOW_ARGO_EVENTS_EVENT": "metaflow-event",
        "METAFLOW_ARGO_EVENTS_EVENT_SOURCE": "argo-events-webhook",
        "METAFLOW_ARGO_EVENTS_SERVICE_ACCOUNT": "operate-workflow-sa",
        "METAFLOW_ARGO_EVENTS_WEBHOOK_URL": "http://argo-events-webhook.posttrain.svc:12000/metaflow-event",
    })
    left = [k for k, v in profile.items() if "<" in str(v)]
    assert not left, f"placeholders the rehearsal does not fill in: {left}"
    return profile


def render(recipe: Path, env: dict, workdir: Path, *, trigger: bool) -> dict:
    """``argo-workflows create --only-json`` of the production deployment; the WorkflowTemplate."""
    env = {**env, **({"POSTTRAIN_TRIGGER_EVENT": EVENT} if trigger else {})}
    if not trigger:
        env.pop("POSTTRAIN_TRIGGER_EVENT", None)
    result = subprocess.run([sys.executable, str(FLOW), "--config", "recipe", str(recipe), "--production",
                             "argo-workflows", "create", "--only-json"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"argo-workflows create --only-json failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout[result.stdout.index("{"):])


def check_template(template: dict, *, schedule: str, image: str, trigger: bool) -> list[str]:
    """What the rendered WorkflowTemplate gets right, one line each; raises AssertionError otherwise."""
    assert template["kind"] == "WorkflowTemplate", template["kind"]
    annotations = template["metadata"]["annotations"]
    cron = json.loads(annotations["metaflow/cron"])["schedule"]
    assert cron == CRON[schedule], f"schedule {cron!r}, expected {CRON[schedule]!r} (retrain.schedule: {schedule})"
    assert annotations["metaflow/branch_name"] == "prod", annotations["metaflow/branch_name"]
    jobsets = [t for t in template["spec"]["templates"] if "resource" in t]
    assert [t["name"] for t in jobsets] == ["train"], [t["name"] for t in jobsets]
    manifest = jobsets[0]["resource"]["manifest"]
    assert "kind: JobSet" in manifest and "name: control" in manifest and "name: worker" in manifest
    assert f"image: {image}" in manifest, f"the JobSet does not run {image}"
    images = {t["container"]["image"] for t in template["spec"]["templates"] if "container" in t}
    assert images == {image}, f"container images {images}, expected {image}"
    lines = [f"schedule: {cron} (retrain.schedule: {schedule})", "branch: prod",
             "train: an Argo JobSet (control + worker pods)", f"image: {image} on every step"]
    if trigger:
        triggers = json.loads(annotations["metaflow/triggers"])
        assert triggers == [{"name": EVENT, "type": "event"}], triggers
        lines.append(f"trigger: event {EVENT}")
    return lines


def rehearse(recipe: Path, image: str, out: Path | None = None) -> dict:
    """The whole rehearsal; returns ``{"templates": {...}, "checks": [...], "drops": [...]}``."""
    sys.path.insert(0, str(ROOT))
    from steps import retrain, storage
    from steps.config import load_recipe

    spec = load_recipe(recipe)
    drops = spec.retrain.drops
    assert drops and storage.is_s3(drops), f"{recipe}: retrain.drops must be an s3:// prefix, got {drops!r}"
    bucket = storage.split_s3(drops)[0]
    with tempfile.TemporaryDirectory(prefix="posttrain-rehearsal-") as tmp, local_s3(Path(tmp) / "moto.log") as endpoint:
        tmp = Path(tmp)
        home = tmp / "metaflowconfig"
        home.mkdir()
        (home / "config_rehearsal.json").write_text(json.dumps(rehearsal_profile(bucket, endpoint, image), indent=2))
        env = {**os.environ, **FAKE_AWS, "METAFLOW_HOME": str(home), "METAFLOW_PROFILE": "rehearsal",
               "METAFLOW_USER": os.environ.get("METAFLOW_USER", "rehearsal")}
        # The profile is the only Metaflow setting: drop any METAFLOW_* this shell had (they win over it).
        env = {k: v for k, v in env.items() if not k.startswith("METAFLOW_") or k in
               ("METAFLOW_HOME", "METAFLOW_PROFILE", "METAFLOW_USER")}
        env["METAFLOW_S3_ENDPOINT_URL"] = endpoint  # steps/storage.py reads the endpoint from the environment
        os.environ.update({k: env[k] for k in (*FAKE_AWS, "METAFLOW_S3_ENDPOINT_URL")})

        storage.s3_client().create_bucket(Bucket=bucket)
        example = tmp / "events.jsonl"
        example.write_text(json.dumps({"messages": [{"role": "user", "content": "Recommend a comedy."},
                                                    {"role": "assistant", "content": "Try 'Airplane!'."}]}) + "\n")
        result = subprocess.run([sys.executable, "-m", "steps.retrain", "drop", str(example), "--recipe", str(recipe)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        print(result.stdout.rstrip())
        picked = retrain.select_drops(spec, consumed=[], last_run=None)
        assert len(picked) == 1 and picked[0].endswith("-events.jsonl"), picked

        checks, templates = [f"drop: the next retrain picks up {picked}"], {}
        for trigger in (False, True):
            name = "with_trigger" if trigger else "scheduled"
            templates[name] = render(recipe, env, tmp, trigger=trigger)
            checks += check_template(templates[name], schedule=spec.retrain.schedule, image=image, trigger=trigger)
            if out:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"workflow_template_{name}.json").write_text(json.dumps(templates[name], indent=2))
    return {"templates": templates, "checks": checks, "drops": picked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infra/deploy_rehearsal.py", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "retrain_prod.yaml")
    parser.add_argument("--image", default="registry.example.com/posttrain:rehearsal",
                        help="the image the profile names (registry/name:tag)")
    parser.add_argument("--out", type=Path, help="write the rendered WorkflowTemplates here as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        report = rehearse(args.recipe.resolve(), args.image, args.out)
    except (AssertionError, RuntimeError) as error:
        print(f"rehearsal failed: {error}", file=sys.stderr)
        return 1
    print("\n".join(f"ok  {line}" for line in report["checks"]))
    print(f"rehearsal passed in {time.monotonic() - started:.0f} s; local S3 stopped"
          + (f"; templates in {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
