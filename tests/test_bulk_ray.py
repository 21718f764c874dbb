"""The bulk job on a real Ray cluster of two nodes that the test starts on this machine (``ray start --head``,
then a second ``ray start --address``, one CPU each): the same results as the local job, and a worker node
killed mid-job (its raylet, SIGKILL) does not stop the job, whose output still has every image exactly once.
The cluster is stopped (``ray stop --force``) whatever happens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from bulk.records import FAILURES, IMAGES, SHARDS
from bulk.sources import list_images
from tests.helpers import free_port
from tests.test_bulk import ROOT, assert_same_results, bulk_command, by_file, run_bulk, scenes_folder, shard_paths

pytestmark = pytest.mark.slow
pytest.importorskip("ray")
RAY = str(Path(sys.executable).with_name("ray"))
NUM_IMAGES = 40


class Cluster(NamedTuple):
    address: str
    worker_raylet: int  # the second node's raylet


def raylets(temp_dir: str) -> set[int]:
    """The pids of the raylets of the cluster whose sessions live under ``temp_dir``."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith(b"/raylet") and any(temp_dir.encode() in arg for arg in cmdline):
                found.add(int(proc.name))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}  # workers import bulk
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--temp-dir", temp_dir,
                        "--include-dashboard=false", *common], env=env, check=True, capture_output=True, timeout=120)
        head = raylets(temp_dir)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        (worker,) = raylets(temp_dir) - head
        yield Cluster(f"127.0.0.1:{port}", worker)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scenes_folder(tmp_path_factory.mktemp("bulk_ray"), NUM_IMAGES)


@pytest.fixture(scope="module")
def local_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk_ray_local")
    run_bulk(images, out)
    return out


def test_two_nodes_give_the_local_jobs_results(cluster: Cluster, images: Path, local_run: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_bulk(images, out, "--ray", cluster.address, "--batch-size", "2", "--shard-size", "10")
    assert_same_results(by_file(out), by_file(local_run))
    failures = json.loads((out / FAILURES).read_text())
    assert failures == json.loads((local_run / FAILURES).read_text()) and len(failures) == 3
    for failure in failures:
        assert f"failed: {failure['path']}: {failure['error']}" in done.stderr
    assert len(list((out / SHARDS).glob("ray-*/*.jsonl"))) == NUM_IMAGES // 10


def test_a_worker_node_killed_mid_job_leaves_every_image_once(cluster: Cluster, images: Path, local_run: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(bulk_command(images, out, "--ray", cluster.address, "--batch-size", "2", "--shard-size",
                                        "4", "--actors", "2"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not shard_paths(out):  # both actors are up and working once the first block is written
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before the node could be killed"
        time.sleep(0.05)
    os.kill(cluster.worker_raylet, signal.SIGKILL)
    assert len(shard_paths(out)) < NUM_IMAGES
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    keys = [i.key for i in list_images(str(images))]
    assert sorted(set(shard_paths(out))) == sorted(keys)  # every image has its line (a retried task may repeat one)
    segmented = [image["path"] for image in json.loads((out / IMAGES).read_text())["images"]]
    failed = [failure["path"] for failure in json.loads((out / FAILURES).read_text())]
    assert sorted(segmented + failed) == sorted(keys)  # in the COCO files, every image exactly once
    assert_same_results(by_file(out), by_file(local_run))
