"""`search.run --address` on a genuine multi-node Ray cluster on this machine.

ray.cluster_utils.Cluster starts a head (0 CPUs: no trial can run there) and two 1-CPU worker nodes, each its
own raylet, object store and worker processes. The search drivers are real `python -m search.run` processes
connected to that head. One cluster serves the whole module; the tests that change it (kill a node, add a
GPU node or a misconfigured one) put it back as they found it: two healthy 1-CPU workers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from search import tracking

REPO = Path(__file__).resolve().parents[1]
# Node deaths are noticed by the head's health checks: every 0.5 s, dead after 3 misses (Ray's defaults take
# ~15-30 s). Test speed only; Ray's behaviour is otherwise the stock one.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
DRIVER_TIMEOUT_S = 420


class LocalCluster:
    """The module's cluster: its address, its worker nodes, and the changes tests make to it."""

    def __init__(self, cluster, root: Path):
        self.cluster, self.root = cluster, root

    @property
    def address(self) -> str:
        return self.cluster.address

    def worker_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}

    def add_worker(self, **node_args):
        node = self.cluster.add_node(num_cpus=node_args.pop("num_cpus", 1), **node_args)
        self.cluster.wait_for_nodes()
        return node

    def kill(self, node_id: str) -> None:
        """SIGKILL every process of that node (raylet, object store, its workers): a machine that died."""
        (node,) = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        self.cluster.remove_node(node, allow_graceful=False)

    def remove(self, node) -> None:
        if node in self.cluster.worker_nodes:
            self.cluster.remove_node(node)
        self.cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local Ray: this module's drivers connect to the cluster instead
        ray.shutdown()
    # A short private temp dir: Ray's unix sockets live under it (108-byte path limit), and Ray records "the
    # current cluster" there, so no other ray.init() on this shared machine joins this cluster by accident.
    root = Path(tempfile.mkdtemp(prefix="pcr", dir="/tmp"))
    # Nodes and drivers inherit this environment: the fake credentials are the local S3 server's (s3_bucket).
    env = {"RAY_TMPDIR": str(root), "OMP_NUM_THREADS": "1", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS})
        local = LocalCluster(cluster, root)
        local.add_worker()
        local.add_worker()
        yield local
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_bucket(ray_cluster) -> str:
    """A real S3 API on 127.0.0.1 (moto's server) with an empty bucket; the --storage-path URI to use."""
    pytest.importorskip("moto", reason="moto (test extra) not installed: rerun `make install`")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://%s:%d" % server.get_host_and_port()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="pcam-tune")
        yield f"s3://pcam-tune/ray?region=us-east-1&endpoint_override={endpoint}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, cache root): 240 synthetic patches in the Kaggle layout, one cache for every search here."""
    from datasets.cache import prepare_dataset
    from datasets.synthetic import write_kaggle_layout

    root = tmp_path_factory.mktemp("cluster-data")
    write_kaggle_layout(root / "pcam", n=240, seed=0)
    prepare_dataset(root / "pcam", root / "cache", progress=False)
    return root / "pcam", root / "cache"


def start_driver(tmp: Path, cluster: LocalCluster, data, name: str, *extra, log: str = "driver.log"):
    data_dir, cache_dir = data
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "search.run", "--name", name, "--address", cluster.address,
            "--results-dir", str(tmp / "results"), "--cache-dir", str(cache_dir), *extra]
    if "--resume" not in extra:
        args += ["--space", "smoke", "--data-dir", str(data_dir)]
    # Own session, so a SIGKILL of the group takes the driver alone: the trials live in the nodes' raylets.
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=open(tmp / log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_ok(proc, log: Path) -> str:
    try:
        code = proc.wait(timeout=DRIVER_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert code == 0, out[-4000:]
    return out


def children(uri: str, name: str) -> dict:
    """trial_id -> MLflow child run of the search's parent ({} until the driver has created them)."""
    mlf = tracking.client(uri)
    exp = mlf.get_experiment_by_name(name)
    parents = mlf.search_runs([exp.experiment_id], filter_string=f"tags.{tracking.ROLE_TAG} = 'parent'") if exp else []
    return tracking.child_runs(mlf, exp.experiment_id, parents[0].info.run_id) if parents else {}


def poll_children(proc, log: Path, uri: str, name: str, until, timeout: float = 300):
    """Poll the search's MLflow children until ``until(children)`` returns something; return that."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"condition not met in {timeout} s:\n" + log.read_text()[-3000:]
        # The driver creates the store's tables before the Tuner's first table; read only after that.
        if "== Status ==" in log.read_text():
            found = until(children(uri, name))
            if found:
                return found
        time.sleep(0.3)


def trial_results(experiment: Path, trial_id: str) -> list[dict]:
    """Every result the trial reported, in order, across retries and resumes (Ray's result.json)."""
    (trial_dir,) = [p for p in experiment.iterdir() if p.is_dir() and f"_{trial_id}_" in p.name]
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def assert_one_child_per_trial_no_epoch_twice(uri: str, name: str, board: pd.DataFrame) -> dict:
    mlf = tracking.client(uri)
    exp = mlf.get_experiment_by_name(name)
    runs = mlf.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == len(board) + 1  # one parent, one child per trial
    kids = children(uri, name)
    assert set(kids) == set(board["trial_id"])
    for trial_id, run in kids.items():
        steps = [m.step for m in mlf.get_metric_history(run.info.run_id, "val_auc")]
        assert steps == list(range(1, len(steps) + 1)), (trial_id, steps)  # each epoch once, in order
    return kids


def resumed_from_checkpoint(results: list[dict]) -> dict:
    """The first result after Ray restarted the trial (a retry or a resume), which must continue the epochs."""
    epochs = [r["epoch"] for r in results]
    assert epochs == sorted(set(epochs)), f"an epoch ran twice: {epochs}"
    restarts = [r for r in results[1:] if r["iterations_since_restore"] == 1]
    assert len(restarts) == 1, [(r["epoch"], r["iterations_since_restore"]) for r in results]
    assert restarts[0]["epoch"] > 1  # restored from a checkpoint, not trained from scratch
    return restarts[0]


# --------------------------------------------------------------------------------------------------------------
# No cluster needed: the address, the resource arithmetic, storage URIs.

def test_ray_client_address_is_refused_with_the_ray_jobs_command(capsys, monkeypatch, tmp_path):
    from search import run as search_run

    argv = ["--space", "smoke", "--address", "ray://head.example:10001", "--name", "x", "--results-dir", str(tmp_path)]
    assert search_run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Ray Client mode" in err
    assert ("ray job submit --address http://head.example:8265 --working-dir . -- python -m search.run --space smoke "
            f"--name x --results-dir {tmp_path}") in err
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")  # Ray Client through the environment: same answer
    assert search_run.main(["--space", "smoke", "--results-dir", str(tmp_path)]) == 2
    assert "ray job submit --address http://10.0.0.1:8265" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_ray_job_must_not_write_results_into_its_temporary_working_dir(capsys, monkeypatch, tmp_path):
    from search import run as search_run

    # What Ray sets for the driver of `ray job submit --working-dir .`: it runs in a temporary copy of that dir.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    monkeypatch.chdir(tmp_path)
    assert search_run.main(["--space", "smoke", "--address", "127.0.0.1:6379"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--results-dir, --storage-path would be inside this Ray Job's temporary working directory" in err
    assert "\n" not in err and not any(tmp_path.iterdir())


def _args(**kw):
    from argparse import Namespace

    return Namespace(**{"cpus_per_trial": None, "gpus_per_trial": None, "max_concurrent": None, **kw})


def test_trial_resources_come_from_the_nodes_a_trial_can_run_on():
    from datasets.errors import UserError
    from search.cluster import Node, trial_resources

    head = Node("h" * 56, "10.0.0.1", 0, 0)
    cpu_workers = [head, Node("a" * 56, "10.0.0.2", 1, 0), Node("b" * 56, "10.0.0.3", 1, 0)]
    assert trial_resources(_args(), cpu_workers, 4, "c") == (1.0, 0.0, 2)
    assert trial_resources(_args(), cpu_workers, 1, "c") == (1.0, 0.0, 1)
    big = [head, Node("a" * 56, "x", 16, 0), Node("b" * 56, "y", 16, 0)]
    assert trial_resources(_args(), big, 100, "c") == (2.0, 0.0, 16)  # 2 CPUs each on nodes above 4 CPUs
    gpu = [head, Node("g" * 56, "x", 8, 2), Node("k" * 56, "y", 8, 2)]
    assert trial_resources(_args(), gpu, 100, "c") == (2.0, 0.5, 8)  # half a GPU, a quarter of the node's CPUs
    assert trial_resources(_args(gpus_per_trial=0.25, max_concurrent=3), gpu, 100, "c") == (1.0, 0.25, 3)
    assert trial_resources(_args(gpus_per_trial=0), gpu, 100, "c") == (2.0, 0.0, 8)
    for kw, expected in (({"cpus_per_trial": 2}, "no node of c has 2 CPUs (a trial runs on one node; the "
                                                 "largest has 1); ask for at most 1"),
                         ({"gpus_per_trial": 0.5}, "--gpus-per-trial 0.5 but c has no GPU")):
        with pytest.raises(UserError, match=re.escape(expected)):
            trial_resources(_args(**kw), cpu_workers, 4, "c")
    with pytest.raises(UserError, match=r"no node of c has 4 GPU\(s\).*largest: 2 GPU"):
        trial_resources(_args(gpus_per_trial=4), gpu, 4, "c")  # 4 GPUs in all, but 2 per node
    with pytest.raises(UserError, match="has 9 CPUs beside its GPUs"):
        trial_resources(_args(cpus_per_trial=9), gpu, 4, "c")


def test_checkpoint_uris_keep_the_storage_scheme_bucket_and_query(tmp_path):
    from datasets.errors import UserError
    from search.storage import check_storage_path, join, local_checkpoint, uri_for

    s3 = "s3://bucket/pcam?region=eu-west-1&endpoint_override=http://127.0.0.1:9000"
    assert uri_for("bucket/pcam/exp/trial_1/checkpoint_000002", s3) == \
        "s3://bucket/pcam/exp/trial_1/checkpoint_000002?region=eu-west-1&endpoint_override=http://127.0.0.1:9000"
    assert uri_for("bkt/p/exp/t/c", "gs://bkt/p") == "gs://bkt/p/exp/t/c"
    assert join(s3, "exp") == "s3://bucket/pcam/exp?region=eu-west-1&endpoint_override=http://127.0.0.1:9000"
    assert join("/data/ray/", "exp") == "/data/ray/exp"
    assert uri_for(str(tmp_path / "exp" / "t"), str(tmp_path)) == str(tmp_path / "exp" / "t")  # a plain folder
    (tmp_path / "exp" / "t").mkdir(parents=True)
    (tmp_path / "exp" / "t" / "checkpoint.pt").write_bytes(b"x")
    with local_checkpoint(uri_for(str(tmp_path / "exp" / "t"), tmp_path.as_uri())) as folder:
        assert (folder / "checkpoint.pt").read_bytes() == b"x"
    with pytest.raises(UserError, match="pyarrow cannot open it"):
        check_storage_path("nosuchfs://bucket/x")
    with pytest.raises(UserError, match="cannot read the checkpoint nosuchfs://b/c"):
        with local_checkpoint("nosuchfs://b/c"):
            pass


# --------------------------------------------------------------------------------------------------------------
# On the cluster.


def test_trials_spread_over_both_workers_and_survive_the_death_of_one(ray_cluster, cluster_data, tmp_path):
    """Two trials start, one per worker node. As soon as one has finished an epoch, its node is SIGKILLed;
    Ray retries that trial from its checkpoint on the surviving node, where it continues at the next epoch."""
    name, uri = "node-death", f"sqlite:///{tmp_path}/results/mlflow.db"
    workers = ray_cluster.worker_ids()
    # No ASHA stop (grace = max epochs): the killed trial must have epochs left to continue.
    proc = start_driver(tmp_path, ray_cluster, cluster_data, name, "--num-samples", "2", "--max-epochs", "4",
                        "--grace-period", "4", "--seed", "1")
    log = tmp_path / "driver.log"
    try:
        victim_trial, victim_node = poll_children(proc, log, uri, name, lambda kids: next(
            ((t, r.data.tags["nodes"]) for t, r in kids.items() if r.data.tags.get("nodes")), None))
        ray_cluster.kill(victim_node)
        out = wait_ok(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        ray_cluster.add_worker()  # back to two workers for the next tests
    survivor = (workers - {victim_node}).pop()

    # Resources came from the cluster: two 1-CPU workers, the head has none.
    assert "2 at once (1 CPU, 0 GPU each)" in out
    board = pd.read_csv(tmp_path / "results" / name / "leaderboard.csv").set_index("trial_id")
    assert (board["status"] == "completed").all() and (board["epochs_run"] == 4).all()
    assert board.loc[victim_trial, "nodes"] == f"{victim_node}>{survivor}"  # moved to the surviving node
    (other,) = set(board.index) - {victim_trial}
    assert board.loc[other, "nodes"] == survivor
    assert f"{victim_node[:8]}>{survivor[:8]}" in out  # the printed leaderboard shows it too

    experiment = tmp_path / "results" / "ray" / name
    results = trial_results(experiment, victim_trial)
    restart = resumed_from_checkpoint(results)
    before = [r for r in results if r["node_id"] == victim_node]
    assert before and restart["node_id"] == survivor and restart["epoch"] == before[-1]["epoch"] + 1
    assert {r["node_id"] for r in results if r["epoch"] >= restart["epoch"]} == {survivor}

    kids = assert_one_child_per_trial_no_epoch_twice(uri, name, board.reset_index())
    victim = kids[victim_trial]
    assert victim.data.tags["nodes"] == f"{victim_node}>{survivor}" and victim.data.tags["retries"] == "1"
    assert victim.info.status == "FINISHED" and victim.data.tags[tracking.OUTCOME_TAG] == "completed"
    best = json.loads((tmp_path / "results" / name / "best_config.json").read_text())
    assert best["trial_id"] in board.index and Path(best["checkpoint_path"], "checkpoint.pt").is_file()


def test_driver_killed_then_resume_on_the_cluster_with_s3_storage(ray_cluster, cluster_data, s3_bucket, tmp_path):
    """The search's driver is SIGKILLed mid-search (its trials die with it); `--resume` against the same cluster
    continues every trial from its checkpoint. --storage-path is an s3:// URI (a local S3 server, query string
    and all), so the trials' checkpoints, the resume, the ROC plot and refit --from-checkpoint all go through
    the object store."""
    import pyarrow.fs

    from search.refit import best as refit_best

    name, uri, storage = "driver-death", f"sqlite:///{tmp_path}/results/mlflow.db", s3_bucket
    proc = start_driver(tmp_path, ray_cluster, cluster_data, name, "--num-samples", "2", "--max-epochs", "4",
                        "--grace-period", "4", "--seed", "2", "--storage-path", storage)
    log = tmp_path / "driver.log"

    def two_epochs_logged(kids):  # by then Ray's experiment state holds at least the epoch-1 checkpoint
        mlf = tracking.client(uri)
        return next(((t, n) for t, r in kids.items()
                     if (n := len(mlf.get_metric_history(r.info.run_id, "val_auc"))) >= 2), None)

    try:
        trial, epoch_seen = poll_children(proc, log, uri, name, two_epochs_logged)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (tmp_path / "results" / name / "leaderboard.csv").exists()  # it died mid-search

    out = wait_ok(start_driver(tmp_path, ray_cluster, cluster_data, name, "--resume", "--storage-path", storage,
                               log="resume.log"), tmp_path / "resume.log")
    assert f"resuming search {name!r}" in out
    board = pd.read_csv(tmp_path / "results" / name / "leaderboard.csv")
    assert len(board) == 2 and (board["status"] == "completed").all() and (board["epochs_run"] == 4).all()
    assert_one_child_per_trial_no_epoch_twice(uri, name, board)
    mlf = tracking.client(uri)
    (parent,) = mlf.search_runs([mlf.get_experiment_by_name(name).experiment_id],
                                filter_string=f"tags.{tracking.ROLE_TAG} = 'parent'")
    assert parent.info.status == "FINISHED"

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    (result_file,) = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{name}", recursive=True))
                      if f.path.endswith("/result.json") and f"_{trial}_" in f.path]
    with fs.open_input_stream(result_file) as f:
        results = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    assert not (tmp_path / "results" / "ray").exists()  # nothing went to the local default
    restarts = [r for r in results[1:] if r["iterations_since_restore"] == 1]
    # Continued from its latest checkpoint in Ray's last state snapshot (epoch_seen, or the one before if
    # the kill beat that snapshot), not from epoch 1.
    assert restarts and restarts[0]["epoch"] >= epoch_seen > 1

    best = json.loads((tmp_path / "results" / name / "best_config.json").read_text())
    base, query = storage.split("?")
    assert best["experiment_path"] == f"{base}/{name}?{query}"
    assert best["checkpoint_path"].startswith(f"{base}/{name}/") and best["checkpoint_path"].endswith(f"?{query}")
    assert (tmp_path / "results" / name / "roc_best.png").stat().st_size > 1000  # read from the URI
    assert refit_best.main(["--results-dir", str(tmp_path / "results"), "--name", name, "--from-checkpoint",
                            "--no-mlflow"]) == 0
    assert json.loads((tmp_path / "results" / name / "refit.json").read_text())["from_checkpoint"]


def search_in_process(argv: list[str]) -> dict:
    """search.run in this process (connects to the cluster like any driver); a UserError propagates."""
    import ray

    from search import run as search_run

    search_run._set_env()
    try:
        return search_run.run_search(search_run.make_plan(argv), progress=False)
    finally:
        ray.shutdown()


def common_args(cluster: LocalCluster, data, tmp: Path, name: str) -> list[str]:
    return ["--space", "smoke", "--name", name, "--address", cluster.address, "--data-dir", str(data[0]),
            "--cache-dir", str(data[1]), "--results-dir", str(tmp / "results")]


def test_half_gpu_trials_pack_two_per_gpu_and_a_third_waits(ray_cluster, cluster_data, tmp_path):
    """A node declaring one logical GPU (Ray accepts num_gpus= on a machine without CUDA). With 0.5 GPU per
    trial Ray runs two trials on it at once and holds the third back, though --max-concurrent would allow 3
    and the node has 3 CPUs: the GPU is what is scheduled. The trials' compute falls back to the CPU there
    (torch sees no CUDA device on this machine); the scheduling is what this test checks."""
    gpu_node = ray_cluster.add_worker(num_cpus=3, num_gpus=1)
    name = "half-gpu"
    try:
        record = search_in_process(common_args(ray_cluster, cluster_data, tmp_path, name) + [
            "--gpus-per-trial", "0.5", "--cpus-per-trial", "1", "--max-concurrent", "3", "--num-samples", "3",
            "--max-epochs", "1"])
    finally:
        ray_cluster.remove(gpu_node)
    board = pd.read_csv(tmp_path / "results" / name / "leaderboard.csv")
    assert len(board) == 3 and (board["nodes"] == gpu_node.node_id).all()  # GPU trials only fit there
    kids = children(record["tracking_uri"], name)
    assert {r.data.params["lr"] for r in kids.values()} and len(kids) == 3
    # The driver opens a trial's child run when Ray starts the trial and closes it when the trial ends.
    (s1, e1), (s2, e2), (s3, _) = sorted((r.info.start_time, r.info.end_time) for r in kids.values())
    assert s2 < e1  # two at once on one GPU
    assert s3 >= min(e1, e2)  # the third waited for half a GPU to come free


def test_impossible_requests_fail_in_one_line_before_any_trial(ray_cluster, cluster_data, tmp_path, capsys):
    from search import run as search_run

    cases = {("--gpus-per-trial", "0.5"): "has no GPU; use --gpus-per-trial 0",
             ("--cpus-per-trial", "2"): "no node of the Ray cluster at"}
    try:
        for (option, value), expected in cases.items():
            name = f"impossible-{option[2:6]}"
            code = search_run.main(common_args(ray_cluster, cluster_data, tmp_path, name) + [option, value])
            err = capsys.readouterr().err.strip()
            assert code == 2 and err.startswith("error: ") and "\n" not in err and expected in err, err
            assert not (tmp_path / "results" / "ray" / name).exists()  # no trial started
        assert "has 2 CPUs (a trial runs on one node; the largest has 1)" in err  # the total is 2, a node has 1
    finally:
        import ray

        ray.shutdown()
    assert not (tmp_path / "results" / "mlflow.db").exists()  # refused before the MLflow parent run


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_preflight_names_the_node_without_the_pretrained_weights(ray_cluster, cluster_data, tmp_path):
    """A worker whose torch hub cache ($TORCH_HOME) is empty and whose download fails (its weights mirror is a
    closed port): the search stops before any trial, naming that node."""
    from datasets.errors import UserError
    from trainables.weights import MIRROR_ENV, missing_weights

    if missing_weights(["mobilenet_v2"]):
        pytest.skip("mobilenet_v2 weights not installed on this machine (make install imports them)")
    bare = ray_cluster.add_worker(env_vars={"TORCH_HOME": str(tmp_path / "empty-torch-home"),
                                            MIRROR_ENV: f"http://127.0.0.1:{closed_port()}/"})
    name = "no-weights"
    try:
        with pytest.raises(UserError) as err:
            search_in_process(common_args(ray_cluster, cluster_data, tmp_path, name)[2:] + [
                "--space", "finetune", "--backbone", "mobilenet_v2"])
    finally:
        ray_cluster.remove(bare)
    msg = str(err.value)
    assert msg.startswith(f"pre-flight check failed: node {bare.node_id[:8]} (") and "\n" not in msg
    assert "mobilenet_v2-b0353104.pth" in msg and str(tmp_path / "empty-torch-home") in msg
    assert "downloading them failed (URLError: [Errno 111] Connection refused)" in msg
    assert "python -m trainables.weights import FILE --backbone mobilenet_v2` on that node" in msg
    assert "also failing" not in msg  # the two healthy workers passed
    assert not (tmp_path / "results" / "ray" / name).exists() and not (tmp_path / "results" / "mlflow.db").exists()


def test_preflight_names_a_node_without_the_right_cache(ray_cluster, cluster_data, tmp_path):
    """The pre-flight task on each worker: a cache folder it cannot see, then a different cache in its place."""
    import ray

    from datasets.cache import prepare_dataset
    from datasets.errors import UserError
    from datasets.synthetic import write_kaggle_layout
    from search import cluster

    cache = prepare_dataset(cluster_data[0], cluster_data[1], progress=False)
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    try:
        hosts = cluster.trial_hosts(cluster.alive_nodes(), 1, 0)
        assert {n.node_id for n in hosts} == ray_cluster.worker_ids()  # not the 0-CPU head
        needs = cluster.Needs(cache_path=str(tmp_path / "moved" / cache.path.name), fingerprint=cache.fingerprint,
                              pretrained=(), storage_path=str(tmp_path / "ray"), data_dir=str(cluster_data[0]))
        with pytest.raises(UserError) as err:
            cluster.preflight(hosts, needs)
        msg = str(err.value)
        assert "cannot see the data cache" in msg and "--cache-dir /shared/pcam-cache" in msg
        assert "python -m datasets.prepare --data-dir" in msg and "also failing: node " in msg
        assert any(msg.startswith(f"pre-flight check failed: node {n.node_id[:8]}") for n in hosts)

        # A different dataset's cache where the driver's should be (a stale copy on the nodes).
        write_kaggle_layout(tmp_path / "other", n=40, seed=1)
        other = prepare_dataset(tmp_path / "other", tmp_path / "other-cache", progress=False)
        shutil.copytree(other.path, tmp_path / "moved" / cache.path.name)
        with pytest.raises(UserError) as err:
            cluster.preflight(hosts, needs)
        assert f"fingerprint {other.fingerprint[:12]}, the driver's is {cache.fingerprint[:12]}" in str(err.value)

        cluster.preflight(hosts, cluster.Needs(**{**needs.__dict__, "cache_path": str(cache.path)}))  # all good
    finally:
        ray.shutdown()
