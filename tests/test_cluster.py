"""Cluster configs (`cluster/`), run storage paths, and `cvlab cluster local up|down`."""

from __future__ import annotations

import json
import re
import shlex
import urllib.request
from pathlib import Path

import pytest
import tomllib
import yaml

from orchestrator.cluster import local as local_cluster
from orchestrator.cli import main
from orchestrator.errors import CvlabError
from orchestrator.config.loader import load_spec
from orchestrator.runs.storage import (
    is_remote_storage,
    resolve_storage,
    storage_join,
    storage_uri,
    validate_storage_path,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
EXTRAS = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _extras_named(text: str) -> set[str]:
    """Extras in `pip install ... .[a,b]` / `-e ".[a]"` commands."""
    found = set()
    for group in re.findall(r"\.\[([\w,\- ]+)\]", text):
        found |= {e.strip() for e in group.split(",") if e.strip()}
    return found


def _experiments_named(text: str) -> set[str]:
    return set(re.findall(r"experiments/[\w.\-/]+\.yaml", text))


# ------------------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("name,provider,bucket", [("aws.yaml", "aws", "s3://"), ("gcp.yaml", "gcp", "gs://")])
def test_cloud_cluster_yaml(name, provider, bucket):
    text = (CLUSTER / name).read_text()
    cfg = yaml.safe_load(text)
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "max_workers",
    ):
        assert key in cfg, f"{name} lacks {key}"
    assert cfg["provider"]["type"] == provider
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_workers = [
        t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU") == 8
    ]
    assert gpu_workers, "needs a worker type with 8 GPUs"
    assert all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_workers), "GPU workers autoscale"
    assert sum(t["max_workers"] for t in gpu_workers) <= cfg["max_workers"]
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "cuda12" in _extras_named(setup)
    assert _extras_named(text) <= EXTRAS, f"unknown extras {_extras_named(text) - EXTRAS}"
    head_cmds = "\n".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_cmds and "RAY_AUTH_MODE=token" in head_cmds
    assert "mlflow server" in head_cmds and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head_cmds
    assert "--artifacts-destination " + bucket in head_cmds
    assert "RAY_AUTH_MODE=token" in "\n".join(cfg["worker_start_ray_commands"])
    assert f"run.storage_path={bucket}" in text  # the documented shared storage for checkpoints / Tune
    named = _experiments_named(text)
    assert named and all((REPO / e).is_file() for e in named), named


# ---------------------------------------------------------------------------------------------- KubeRay


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _gpu_groups(cluster_spec: dict) -> list[dict]:
    groups = []
    for group in cluster_spec["workerGroupSpecs"]:
        limits = _containers(group["template"])[0]["resources"]["limits"]
        if str(limits.get("nvidia.com/gpu")) == "8":
            groups.append(group)
    return groups


def test_kuberay_raycluster_manifest():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()))
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1 and clusters[0]["apiVersion"] == "ray.io/v1"
    spec = clusters[0]["spec"]
    assert spec["rayVersion"].startswith("2.60")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _gpu_groups(spec)
    assert groups and groups[0]["maxReplicas"] > groups[0]["minReplicas"]
    # An MLflow server reachable from the Ray pods under the URI they are given.
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "cvlab-mlflow")
    env = {e["name"]: e.get("value") for e in _containers(spec["headGroupSpec"]["template"])[0]["env"]}
    assert (
        env["MLFLOW_TRACKING_URI"]
        == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )
    mlflow = next(d for d in docs if d["kind"] == "Deployment")
    args = " ".join(_containers(mlflow["spec"]["template"])[0]["args"])
    assert "--artifacts-destination=s3://" in args and "--workers" in args


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "rayjob-spot.yaml"])
def test_kuberay_rayjob_runs_an_existing_experiment_with_valid_overrides(manifest):
    """The RayJobs run a shipped experiment with overrides it accepts; the worker count matches the GPU pods
    (for the spot job, a worker range matching the group's minReplicas and maxReplicas: an elastic run)."""
    job = yaml.safe_load((CLUSTER / "kuberay" / manifest).read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert _gpu_groups(spec["rayClusterSpec"]), "needs a GPU worker group"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "orchestrator", "run"]
    experiment = argv[4]
    assert (REPO / experiment).is_file(), experiment
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    # The overrides are valid for that experiment (load_spec raises on unknown keys / bad values).
    loaded = load_spec(REPO / experiment, overrides=overrides)
    groups = _gpu_groups(spec["rayClusterSpec"])
    pods = (sum(g["minReplicas"] for g in groups), sum(g["maxReplicas"] for g in groups))
    assert (loaded.scaling.min_workers, loaded.scaling.max_workers) == (pods[0] * 8, pods[1] * 8)
    assert loaded.scaling.elastic == (pods[0] < pods[1]) == spec["rayClusterSpec"]["enableInTreeAutoscaling"]
    assert is_remote_storage(loaded.run.storage_path)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")


def test_dockerfile_installs_existing_extras():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.\d+", text, re.MULTILINE)
    extras = _extras_named(text)
    assert extras and extras <= EXTRAS
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for item in copied.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which does not exist"


def test_readme_names_existing_files_and_extras():
    text = (CLUSTER / "README.md").read_text()
    assert _experiments_named(text) and all((REPO / e).is_file() for e in _experiments_named(text))
    assert _extras_named(text) <= EXTRAS
    for target in (
        "ray up cluster/aws.yaml",
        "ray up cluster/gcp.yaml",
        "kubectl apply -f cluster/kuberay/rayjob.yaml",
        "cvlab cluster local up",
        "ray job submit",
    ):
        assert target in text, target


# ---------------------------------------------------------------------------------------------- storage


def test_local_storage_is_absolute_and_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve_storage("runs/a")
    assert fs is None and path == str(tmp_path / "runs" / "a") and Path(path).is_dir()
    fs, path = resolve_storage(f"file://{tmp_path}/b")
    assert fs is None and path == str(tmp_path / "b")
    assert storage_join(path, "run1") == str(tmp_path / "b" / "run1")


def test_bucket_uris_open_pyarrow_filesystems():
    import pyarrow.fs as pafs

    fs, path = resolve_storage("s3://my-bucket/runs/?region=us-west-2", create=False)
    assert isinstance(fs, pafs.S3FileSystem) and path == "my-bucket/runs"
    fs, path = resolve_storage("gs://my-bucket/cvlab/runs", create=False)
    assert isinstance(fs, pafs.GcsFileSystem) and path == "my-bucket/cvlab/runs"
    assert storage_join("gs://b/runs/", "x", "/y") == "gs://b/runs/x/y"
    # storage_uri turns a resolved location back into one string that resolves to the same place.
    assert storage_uri(fs, path + "/trial1") == "gs://my-bucket/cvlab/runs/trial1"
    assert storage_uri(None, "/abs/runs") == "/abs/runs"


def test_bad_storage_paths_are_clear_errors(tmp_path):
    with pytest.raises(CvlabError, match="unsupported scheme 'hdfs://'"):
        validate_storage_path("hdfs://namenode/runs")
    with pytest.raises(CvlabError, match="names no bucket"):
        validate_storage_path("s3:///runs")
    with pytest.raises(CvlabError, match="empty"):
        validate_storage_path("  ")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CvlabError, match="cannot be created"):
        resolve_storage(str(blocker / "runs"))


# ------------------------------------------------------------------------------------ local cluster CLI


def _get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _listening_addresses(leaders: list[int]) -> dict[int, set[str]]:
    """port -> the addresses that the processes of these sessions listen on."""
    import psutil

    bound: dict[int, set[str]] = {}
    for leader in leaders:
        for pid in local_cluster.session_members(leader):
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except psutil.Error:
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    bound.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return bound


@pytest.mark.slow
def test_local_cluster_up_with_token_auth_and_mlflow_then_down(tmp_path, monkeypatch, capsys):
    state = tmp_path / "st"
    ports = {flag: local_cluster.free_port() for flag in ("--ray-port", "--dashboard-port", "--mlflow-port")}
    argv = [
        "cluster",
        "local",
        "up",
        "--state-dir",
        str(state),
        "--num-cpus",
        "1",
        "--auth",
        "token",
        "--timeout",
        "240",
    ]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    leaders: list[int] = []
    try:
        assert main(argv) == 0
        out = capsys.readouterr().out
        info = json.loads((state / "state.json").read_text())
        leaders = [info["processes"]["head"], info["processes"]["mlflow"]]
        dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
        assert f"export RAY_ADDRESS={dashboard}" in out
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['--mlflow-port']}" in out
        assert f"export RAY_AUTH_TOKEN_PATH={state}/auth_token" in out
        assert (state / "auth_token").stat().st_mode & 0o077 == 0, "the token file is private"
        assert _get(f"http://127.0.0.1:{ports['--mlflow-port']}/health") == 200
        # The servers bind to 127.0.0.1 itself (one that listens on 0.0.0.0 or :: would also answer there).
        bound = _listening_addresses(leaders)
        assert bound.get(ports["--mlflow-port"]) == {"127.0.0.1"}, bound
        assert bound.get(ports["--dashboard-port"]) == {"127.0.0.1"}, bound

        # Token auth: no token and a wrong token end in one clear message; the right one works.
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the client side must not load ~/.ray tokens itself
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        assert main(["jobs", "list", "--address", dashboard]) == 2
        err = capsys.readouterr().err
        assert (
            "requires an authentication token" in err and "RAY_AUTH_TOKEN" in err and "Traceback" not in err
        )
        monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
        assert main(["jobs", "list", "--address", dashboard]) == 2
        assert "rejected the token" in capsys.readouterr().err
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(state / "auth_token"))
        assert main(["jobs", "list", "--address", dashboard]) == 0
        assert "no jobs" in capsys.readouterr().out

        # A second `up` on the same state dir is refused while the first one runs.
        assert main(["cluster", "local", "up", "--state-dir", str(state), "--ray-port", "1"]) == 2
        assert "still running" in capsys.readouterr().err
        assert main(["cluster", "local", "status", "--state-dir", str(state)]) == 0
    finally:
        if (state / "state.json").exists():
            assert main(["cluster", "local", "down", "--state-dir", str(state)]) == 0
    assert "stopped: ray head" in capsys.readouterr().out
    for leader in leaders:
        assert not local_cluster.running_members(leader), "processes of the local cluster survived `down`"
    assert main(["cluster", "local", "down", "--state-dir", str(state)]) == 2


def test_local_cluster_refuses_a_taken_port(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        code = main(
            [
                "cluster",
                "local",
                "up",
                "--state-dir",
                str(tmp_path),
                "--dashboard-port",
                str(taken),
                "--ray-port",
                str(local_cluster.free_port()),
            ]
        )
    assert code == 2
    err = capsys.readouterr().err
    assert f"port {taken}" in err and "--dashboard-port" in err
    assert not (tmp_path / "state.json").exists()


# --------------------------------------------------------------------------------- multi-node Ray Train


@pytest.mark.slow
def test_two_worker_train_run_spans_two_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Defined here so cloudpickle ships it by value (workers cannot import this test module).
    def _node_report_loop(config):
        import json
        from pathlib import Path

        import ray
        import torch
        import torch.distributed as dist
        from ray import train
        from ray.train.torch import prepare_model

        context = train.get_context()
        node = ray.get_runtime_context().get_node_id()
        nodes = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, node)  # also proves the two workers talk to each other across nodes
        model = prepare_model(torch.nn.Linear(4, 1))
        # Each rank its own input: rank r's gradient alone would be 8 * (r + 1); DDP averages them over the nodes.
        model(torch.full((2, 4), float(context.get_world_rank() + 1))).sum().backward()
        weight = model.module.weight if hasattr(model, "module") else model.weight
        record = {"node": node, "all_nodes": nodes, "grad": float(weight.grad.sum())}
        out = Path(config["out"]) / f"rank{context.get_world_rank()}.json"
        out.write_text(json.dumps(record))
        train.report({"done": 1})

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"cvlab_slot": 1, "node_head": 1}},
    )
    try:
        cluster.add_node(num_cpus=1, resources={"cvlab_slot": 1, "node_other": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        fs, storage = resolve_storage(str(tmp_path / "runs"))
        out = tmp_path / "reports"
        out.mkdir()
        trainer = TorchTrainer(
            _node_report_loop,
            train_loop_config={"out": str(out)},
            # One slot per node and one per worker: the two workers cannot share a node.
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "cvlab_slot": 1}),
            run_config=RunConfig(name="two-nodes", storage_path=storage, storage_filesystem=fs),
        )
        trainer.fit()
        records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert records[0]["node"] != records[1]["node"], records
        assert {r["node"] for r in records} <= alive
        assert records[0]["all_nodes"] == records[1]["all_nodes"] == [records[0]["node"], records[1]["node"]]
        # (node_rank is not checked: Ray Train numbers nodes by IP, and both nodes here share one.)
        # d/dw of sum(w.x + b) over two rows of (r + 1) is 2 (r + 1) per weight: 8 on rank 0 and 16 on rank 1
        # alone; the all-reduced average, 12, on both workers (a missing all-reduce would leave 8 and 16).
        assert [r["grad"] for r in records] == [pytest.approx(12.0)] * 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_local_cluster_refuses_an_unreachable_artifact_bucket(tmp_path, monkeypatch, capsys):
    """`--artifacts-destination s3://...` that cannot be reached: one message with the settings to check, before
    any process starts (the MLflow server would start and answer every upload with HTTP 500)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{local_cluster.free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    code = main(["cluster", "local", "up", "--state-dir", str(tmp_path), "--artifacts-destination",
                 "s3://cvlab-artifacts/mlflow"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--artifacts-destination s3://cvlab-artifacts/mlflow: cannot reach the bucket" in err
    assert "AWS_ENDPOINT_URL" in err and not (tmp_path / "state.json").exists()
