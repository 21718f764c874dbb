"""The Docker image for real: built from the project's Dockerfile and run by a Docker engine.

The test session starts its own dockerd (Debian's docker.io, as root) on its own socket, with its data
and state under one temporary directory, no iptables and no default bridge; builds and containers use
the host's network. No image registry can be reached here, so `python:3.11-slim-bookworm` is replaced
by a stand-in made the same way from Debian's packages (debootstrap, `docker import`) and passed as
`--build-arg PYTHON_IMAGE`; the Dockerfile itself is the one a user builds against Docker Hub. The
stand-in and the image are built once per session; the engine is stopped by its process id at the end
and everything it made is removed.

What runs in containers is what a user runs: the CPU image as built, read-only root filesystem, the
HEALTHCHECK of the Dockerfile (only its interval and start period shortened at `docker run`), `docker
stop` and `docker kill`, the demo model and a model mounted read-only. If dockerd cannot start, these
tests fail with its log; only a test that needs nginx or docker-compose is skipped when that binary is
missing (scripts/install_deploy_deps.sh installs every binary used here).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.deployment import (
    NGINX,
    NGINX_CONF,
    ROOT,
    Load,
    Nginx,
    all_ok,
    binary,
    http_client,
    requests_served,
    stop_process,
    write_tls_files,
)
from tests.helpers import free_port, iou

# Every test here builds or runs the image with a real Docker engine.
pytestmark = pytest.mark.docker

DOCKERD = binary("dockerd")
# The client of Debian's docker.io, which builds with BuildKit by itself (a newer client needs the buildx
# plugin for that). BuildKit builds only the stages the target needs: the legacy builder would also
# build base-gpu, whose CUDA base cannot be pulled here.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else binary("docker")
DEBOOTSTRAP = binary("debootstrap")
COMPOSE = binary("docker-compose")

STANDIN = "standin/python:3.11-slim-bookworm"
IMAGE = "mrcnn-service:cpu"  # docker-compose.yml's image name, so compose runs this build
DEMO_MODEL = ROOT / "models" / "demo" / "model.onnx"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's system bundle, where python:*-slim has it
UID = 10001  # the Dockerfile's USER

TMPFS_SIZE = "8g"  # a cap: ~2.5 GB is used at the most
ENGINE_START_TIMEOUT_S = 60.0
READY_BOUND_S = 90.0  # docker run -> /readyz 200 (model load and warm-up, three containers at once)
HEALTHY_TIMEOUT_S = 30.0
# The runtime layer: the virtualenv copied from the builder (measured 441 MiB: OpenCV 172, ONNX Runtime 78,
# numpy 71, Pillow 21, the gRPC door's grpcio 18, OpenTelemetry, protobuf and tritonclient's stubs 11; pip and
# setuptools removed, 23 MiB). Torch (~700 MiB) or a second OpenCV (~170) would blow it.
VENV_BUDGET_MIB = 480


# --------------------------------------------------------------------------------------------------
# the engine


class Engine:
    """A dockerd of this session: its socket, data root and exec root under `root`, host networking only.

    The exec root holds unix sockets (containerd's), whose paths are limited to ~108 bytes: `root` must
    be short, hence a directory of its own in /tmp rather than pytest's deep temporary paths. `root` is
    a tmpfs: image layers, the build cache and the stand-in's root filesystem (tens of thousands of
    files, ~2 GB) are written without fsync and vanish with one umount, where deleting them from this
    machine's disk took 1.5 min.
    """

    def __init__(self, root: Path):
        assert DOCKERD and DOCKER, "dockerd and docker not found (scripts/install_deploy_deps.sh installs them)"
        self.root = root
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(root)],
                               capture_output=True, text=True, timeout=30)
        assert mount.returncode == 0, f"cannot mount a tmpfs for the engine (root needed): {mount.stderr}"
        self.host = f"unix://{root / 'docker.sock'}"
        self.log = root / "dockerd.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        # BuildKit; a client config of its own (no credential helpers of the host's ~/.docker).
        self.env.update(DOCKER_HOST=self.host, DOCKER_BUILDKIT="1", DOCKER_CONFIG=str(root / "client"))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [DOCKERD, "--iptables=false", "--bridge=none", "--host", self.host,
                 "--data-root", str(root / "data"), "--exec-root", str(root / "x"),
                 "--pidfile", str(root / "dockerd.pid")],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.run("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.5)
        pytest.fail(f"dockerd not answering on {self.host} after {ENGINE_START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def run(self, *args: str, check: bool = True, timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
        """`docker --host <our socket> ARGS`; a failure (when checked) fails the test with its output."""
        res = subprocess.run([DOCKER, "--host", self.host, *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} exited with {res.returncode}:\n{res.stdout[-2000:]}\n"
                        f"{res.stderr[-3000:]}")
        return res

    def build(self, context: Path, tag: str, *args: str, log: Path) -> None:
        """A BuildKit build with the host's network (no bridge here); its plain progress goes to `log`."""
        with open(log, "w") as out:
            res = subprocess.run(
                [DOCKER, "--host", self.host, "build", "--network", "host", "--progress", "plain", "-t", tag,
                 *args, str(context)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=1200,
            )
        if res.returncode != 0:
            pytest.fail(f"docker build -t {tag} failed:\n{log.read_text(errors='replace')[-5000:]}")

    def stop(self) -> None:
        """Remove what the tests left, stop dockerd by its pid (it stops its containerd), unmount, delete."""
        if self.proc.poll() is None:
            ids = self.run("ps", "-aq", check=False).stdout.split()
            if ids:
                self.run("rm", "-f", *ids, check=False)
            self.run("network", "prune", "-f", check=False)  # a compose network's bridge lives on the host
            self.run("volume", "prune", "-f", check=False)
        stop_process(self.proc, signal.SIGTERM, timeout=30.0)
        containerd_pid = self.root / "x" / "containerd" / "containerd.pid"
        if containerd_pid.exists():  # only if dockerd died without stopping it
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(containerd_pid.read_text().strip()), signal.SIGKILL)
        unmount_under(self.root)
        subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def unmount_under(root: Path) -> None:
    """Lazily unmount whatever is still mounted below root (deepest first), so that it can be deleted."""
    prefix = str(root) + "/"
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    root = Path(tempfile.mkdtemp(prefix="mrcnn-dk-", dir="/tmp"))
    try:
        e = Engine(root)
    except BaseException:
        subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        e.wait_ready()
        yield e
    finally:
        e.stop()


# --------------------------------------------------------------------------------------------------
# the stand-in base and the image


def debian_mirror() -> str:
    """The host's Debian mirror for bookworm, from /etc/apt/sources.list(.d): one-line or deb822 entries."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list")),
             *sorted((apt / "sources.list.d").glob("*.sources"))]
    for f in (f for f in files if f.is_file()):
        text = f.read_text()
        one_line = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, flags=re.M)
        if one_line:
            return one_line.group(1)
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, flags=re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, flags=re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
    pytest.fail("no Debian bookworm mirror in /etc/apt/sources.list or /etc/apt/sources.list.d")


def pip_index_config() -> str:
    """The host's pip index settings as a pip.conf for the stand-in: index-url, extra-index-url and
    trusted-host from `pip config list` (files and PIP_* variables). Only http(s) indexes travel:
    a file:// index on this machine's disk is not in the build."""
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    settings: dict[str, list[str]] = {}
    for m in re.finditer(r"^[\w:]*\.(index-url|extra-index-url|trusted-host)='(.*)'$", res.stdout, flags=re.M):
        settings.setdefault(m.group(1), []).extend(m.group(2).split())
    lines = ["[global]", f"cert = {CA_BUNDLE}"]
    for key, values in settings.items():
        kept = [v for v in dict.fromkeys(values) if key == "trusted-host" or v.startswith(("http://", "https://"))]
        if kept:
            lines.append(f"{key} = {' '.join(kept)}")
    return "\n".join(lines) + "\n"


def host_ca_bundle() -> Path:
    """The CA bundle the host's pip trusts (PIP_CERT, else the system bundle): with it, pip in a build
    reaches the package index exactly as the host's pip does (through the same TLS-inspecting egress)."""
    path = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or CA_BUNDLE)
    assert path.is_file(), f"no CA bundle at {path}"
    return path


def make_standin(engine: Engine, work: Path) -> None:
    """`python:3.11-slim-bookworm` from Debian's packages: Python 3.11 with venv, useradd/groupadd (passwd),
    `python` on PATH, the host's CA bundle and pip index configuration; imported as STANDIN."""
    rootfs = work / "rootfs"
    log = work / "debootstrap.log"
    with open(log, "wb") as out:
        res = subprocess.run(
            [DEBOOTSTRAP, "--variant=minbase", "--include=python3,python3-venv,passwd", "bookworm", str(rootfs),
             debian_mirror()],
            stdout=out, stderr=subprocess.STDOUT, timeout=900,
        )
    if res.returncode != 0:
        pytest.fail(f"debootstrap failed:\n{log.read_text(errors='replace')[-4000:]}")
    try:
        # apt's downloads and package lists, as python:*-slim leaves none
        for leftover in [*rootfs.glob("var/cache/apt/archives/*.deb"), *rootfs.glob("var/lib/apt/lists/*_*")]:
            leftover.unlink()
        (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        bundle = rootfs / str(CA_BUNDLE).lstrip("/")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host_ca_bundle(), bundle)
        (rootfs / "etc/pip.conf").write_text(pip_index_config())
        changes = [f"ENV {k}={v}" for k, v in {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "PIP_CERT": CA_BUNDLE,
            "SSL_CERT_FILE": CA_BUNDLE,
        }.items()] + ['CMD ["python3"]']
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        engine.run("import", *[a for c in changes for a in ("--change", c)], "-", STANDIN, stdin=tar.stdout,
                   timeout=600)
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0, "tar of the stand-in root filesystem failed"
    finally:
        unmount_under(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)


# Debian's nginx and Prometheus in place of docker-compose.yml's images, with their entry points.
SERVER_STANDINS = """\
FROM {base} AS servers
RUN apt-get update \\
    && apt-get install -y --no-install-recommends nginx wget prometheus \\
    && rm -rf /var/lib/apt/lists/*

FROM servers AS lb
CMD ["nginx", "-g", "daemon off;"]

FROM servers AS prometheus
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""


def compose_images(engine: Engine) -> dict[str, str]:
    """The image each service of docker-compose.yml names, from `docker-compose config`."""
    assert COMPOSE
    res = subprocess.run([COMPOSE, "config"], cwd=ROOT, env=engine.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return dict(re.findall(r"^  ([\w-]+):\n(?:    .*\n)*?    image: (\S+)$", res.stdout, flags=re.M))


def make_server_standins(engine: Engine) -> None:
    """docker-compose.yml's nginx and Prometheus images, tagged as it names them, from SERVER_STANDINS."""
    work = engine.root / "servers"
    work.mkdir()
    (work / "Dockerfile").write_text(SERVER_STANDINS.format(base=STANDIN))
    images = compose_images(engine)
    for service in ("lb", "prometheus"):
        engine.build(work, images[service], "--target", service, log=work / f"build-{service}.log")


class Images:
    """The stand-ins and the image, built once per session in a thread of their own from the moment the
    engine is up: the rest of the session's set-up (the tiny model's export, CPU-bound) runs meanwhile,
    and so does the image build alongside the nginx / Prometheus stand-ins' (both mostly downloads)."""

    def __init__(self, engine: Engine):
        self.timings: dict[str, float] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, args=(engine,), daemon=True)
        self._thread.start()

    def _timed(self, step: str, fn: Callable[..., None], *args: object, **kw: object) -> None:
        t0 = time.monotonic()
        fn(*args, **kw)
        self.timings[step] = time.monotonic() - t0

    def _build(self, engine: Engine) -> None:
        try:
            self._timed("python stand-in (debootstrap + import)", make_standin, engine, engine.root)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                jobs = [pool.submit(self._timed, "image build", engine.build, ROOT, IMAGE, "--build-arg",
                                    f"PYTHON_IMAGE={STANDIN}", log=engine.root / "build.log")]
                if COMPOSE:
                    jobs.append(pool.submit(self._timed, "nginx + Prometheus stand-ins", make_server_standins,
                                            engine))
                for job in jobs:
                    job.result()
        except BaseException as e:  # pytest.fail raises a BaseException: it is re-raised by wait()
            self._error = e

    def wait(self) -> Images:
        self._thread.join(timeout=1800)
        assert not self._thread.is_alive(), "the image builds did not finish in 30 min"
        if self._error is not None:
            raise self._error
        return self


@pytest.fixture(scope="session")
def images(engine: Engine) -> Images:
    """Started here, waited for by whoever needs an image (Images.wait)."""
    return Images(engine)


# --------------------------------------------------------------------------------------------------
# containers


class Container:
    """One container of the image on the host's network, listening on a free port of its own."""

    def __init__(self, engine: Engine, name: str, *args: str, env: dict[str, str] | None = None):
        self.engine, self.name = engine, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # No gRPC door: on the host's network every container would claim its fixed default port.
        env = {"MRCNN_PORT": str(self.port), "MRCNN_GRPC_PORT": "0", "MRCNN_INTRA_OP_THREADS": "1", **(env or {})}
        self.started = time.monotonic()
        engine.run(
            "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
            # The Dockerfile's HEALTHCHECK, probed every second instead of every 10 s after 60 s.
            "--health-interval", "1s", "--health-start-period", "5s",
            *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], *args, IMAGE,
        )
        self.ready_after: float | None = None

    def inspect(self, template: str) -> str:
        return self.engine.run("inspect", "-f", template, self.name).stdout.strip()

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.engine.run("exec", self.name, *cmd, check=check)

    def logs(self) -> str:
        res = self.engine.run("logs", "--tail", "60", self.name, check=False)
        return res.stdout + res.stderr

    def wait_ready(self, timeout: float = READY_BOUND_S) -> None:
        deadline = self.started + timeout
        with http_client(timeout=5.0) as c:
            while time.monotonic() < deadline:
                if self.inspect("{{.State.Running}}") != "true":
                    pytest.fail(f"container {self.name} exited ({self.inspect('{{.State.ExitCode}}')}):\n"
                                f"{self.logs()}")
                with contextlib.suppress(httpx.HTTPError):
                    if c.get(self.url + "/readyz").status_code == 200:
                        self.ready_after = time.monotonic() - self.started
                        return
                time.sleep(0.2)
        pytest.fail(f"container {self.name} not ready after {timeout:.0f}s:\n{self.logs()}")


@dataclass
class Fleet:
    demo: Container  # the image as built: the bundled demo model
    mounted: Container  # the tiny model mounted read-only, MRCNN_MODEL_PATH; stopped by a test
    spare: Container  # the demo model again; killed behind nginx by a test


@pytest.fixture(scope="module")
def fleet(engine: Engine, images: Images, tiny_onnx_model) -> Fleet:
    """Three containers started at once (their model loads overlap); removed with the engine."""
    images.wait()
    models = engine.root / "models"
    models.mkdir(mode=0o755)
    shutil.copyfile(tiny_onnx_model, models / "tiny.onnx")
    (models / "tiny.onnx").chmod(0o644)  # readable by uid 10001 in the container
    fleet = Fleet(
        demo=Container(engine, "mrcnn-demo"),
        mounted=Container(engine, "mrcnn-mounted", "-v", f"{models}:/models:ro",
                          env={"MRCNN_MODEL_PATH": "/models/tiny.onnx", "MRCNN_DRAIN_GRACE_S": "2"}),
        spare=Container(engine, "mrcnn-spare"),
    )
    for c in (fleet.demo, fleet.mounted, fleet.spare):
        c.wait_ready()
    return fleet


def shapes_png(index: int) -> bytes:
    """A held-out image of the demo model's synthetic shapes (seed 1000, never used in training)."""
    from model.data.shapes import generate

    buf = io.BytesIO()
    Image.fromarray(generate(1000, index).image).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


def assert_same_detections(got: list[dict], want: list[dict]) -> None:
    """One-to-one: same label, score within 1e-4, box within 0.05 px, mask IoU >= 0.99."""
    assert len(got) == len(want), (len(got), len(want))
    unmatched = list(range(len(got)))
    for w in want:
        close = [i for i in unmatched if got[i]["label"] == w["label"] and abs(got[i]["score"] - w["score"]) <= 1e-4
                 and np.abs(np.subtract(got[i]["box"], w["box"])).max() <= 0.05]
        assert close, f"no container detection matches {w['label']} {w['score']:.5f} {w['box']}"
        g = got[close[0]]
        unmatched.remove(close[0])
        mask_iou = iou(decode_mask(g["mask"]), decode_mask(w["mask"]))
        assert mask_iou >= 0.99, f"{w['label']} {w['score']:.5f}: mask IoU {mask_iou:.4f}"


# --------------------------------------------------------------------------------------------------
# the CPU image


def test_image_size_and_runtime_layer(fleet: Fleet, images: Images, capsys):
    """The runtime layer (the venv) within its budget; no pip in it. Sizes and build times printed."""
    size_mib = int(fleet.demo.engine.run("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout) / 2**20
    site = "/opt/venv/lib/python3.11/site-packages"
    venv_kib = int(fleet.demo.exec("du", "-sk", "/opt/venv").stdout.split()[0])
    largest = fleet.demo.exec("sh", "-c", f"du -sk {site}/* | sort -n | tail -8").stdout.split("\n")
    with capsys.disabled():
        print(f"\nimage {IMAGE} (stand-in base): {size_mib:.0f} MiB; runtime venv {venv_kib / 1024:.0f} MiB "
              f"(budget {VENV_BUDGET_MIB})")
        for line in reversed([ln for ln in largest if ln.strip()]):
            kib, path = line.split()
            print(f"  {int(kib) / 1024:6.1f} MiB  {Path(path).name}")
        for step, seconds in images.timings.items():
            print(f"  {step}: {seconds:.0f} s")
    assert venv_kib / 1024 <= VENV_BUDGET_MIB
    no_pip = fleet.demo.exec("python", "-m", "pip", "--version", check=False)
    assert no_pip.returncode != 0 and "No module named pip" in no_pip.stderr, no_pip.stdout + no_pip.stderr


def test_ready_within_bound(fleet: Fleet, capsys):
    with capsys.disabled():
        print("\nready after (s): " + ", ".join(f"{c.name} {c.ready_after:.1f}"
                                                 for c in (fleet.demo, fleet.mounted, fleet.spare)))
    assert all(c.ready_after is not None and c.ready_after <= READY_BOUND_S
               for c in (fleet.demo, fleet.mounted, fleet.spare))


def test_segment_matches_native_service(fleet: Fleet):
    """The container's /segment answers what the service run here, in-process, answers for the same model."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.core.settings import Settings

    images = [shapes_png(i) for i in range(2)]
    with http_client() as c:
        served = [c.post(fleet.demo.url + "/segment", files={"image": ("s.png", b, "image/png")}) for b in images]
    with TestClient(create_app(Settings(model_path=DEMO_MODEL))) as native:
        expected = [native.post("/segment", files={"image": ("s.png", b, "image/png")}) for b in images]
    for got, want in zip(served, expected, strict=True):
        assert got.status_code == want.status_code == 200, (got.text[:300], want.text[:300])
        got_body, want_body = got.json(), want.json()
        assert got_body["model"] == want_body["model"] == {"name": "shapes-demo", "version": "0.2"}
        assert want_body["detections"], "the demo model finds no shape: nothing is compared"
        assert_same_detections(got_body["detections"], want_body["detections"])


def test_runs_as_uid_10001_without_torch(fleet: Fleet):
    status = fleet.demo.exec("cat", "/proc/1/status").stdout  # PID 1: the server itself (exec-form CMD)
    assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, flags=re.M), status
    assert re.search(rf"^Gid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, flags=re.M), status
    assert "python -m service" in fleet.demo.exec("cat", "/proc/1/cmdline").stdout.replace("\0", " ")
    torch = fleet.demo.exec("python", "-c", "import torch", check=False)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stderr


def test_healthcheck_reaches_healthy(fleet: Fleet):
    test = json.loads(fleet.demo.inspect("{{json .Config.Healthcheck.Test}}"))
    assert "/healthz" in " ".join(test)  # the Dockerfile's own probe
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while (status := fleet.demo.inspect("{{.State.Health.Status}}")) != "healthy":
        assert status == "starting" and time.monotonic() < deadline, (
            status, fleet.demo.inspect("{{json .State.Health.Log}}"))
        time.sleep(0.5)


def test_read_only_root_filesystem(fleet: Fleet):
    assert fleet.demo.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    write = fleet.demo.exec("sh", "-c", "echo x > /opt/mrcnn/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    fleet.demo.exec("sh", "-c", "echo x > /tmp/x")  # the tmpfs
    with http_client() as c:  # and it serves
        assert c.post(fleet.demo.url + "/segment", files={"image": ("s.png", shapes_png(2), "image/png")}
                      ).status_code == 200


def test_mounted_model_is_served(fleet: Fleet):
    mounts = json.loads(fleet.mounted.inspect("{{json .Mounts}}"))
    assert [(m["Destination"], m["RW"]) for m in mounts] == [("/models", False)]
    with http_client() as c:
        info = c.get(fleet.mounted.url + "/v1/model").json()
        r = c.post(fleet.mounted.url + "/segment", files={"image": ("s.png", shapes_png(0), "image/png")})
    assert info["name"] == "tiny" and info["classes"] == ["circle", "square", "triangle", "star"], info
    assert r.status_code == 200 and r.json()["model"]["name"] == "tiny", r.text[:300]


def test_docker_stop_drains_in_flight_requests(fleet: Fleet):
    """`docker stop` under a stream of requests: readiness turns 503 while requests are still served
    (MRCNN_DRAIN_GRACE_S=2), the clients stop sending when they see it, as a load balancer does, every
    request they made is answered 200, and the server exits 0 by itself well before docker's SIGKILL."""
    c = fleet.mounted
    load = Load(c.url, 1000, workers=4).start()
    load.wait_done(4, timeout=180)
    stop_result: list[subprocess.CompletedProcess] = []
    stopper = threading.Thread(target=lambda: stop_result.append(c.engine.run("stop", "-t", "40", c.name)))
    done_at_signal = load.done
    signalled = time.monotonic()
    stopper.start()
    readiness = []
    with http_client(timeout=5.0) as probe:
        while time.monotonic() - signalled < 20:
            try:
                readiness.append(probe.get(c.url + "/readyz").status_code)
            except httpx.HTTPError:
                readiness.append(0)
            if readiness[-1] != 200:
                break
            time.sleep(0.02)
    load.stop()
    stopper.join(timeout=60)
    stopped = time.monotonic()
    statuses = load.join()
    all_ok(statuses)
    assert readiness[-1] == 503, f"readiness during the drain: {readiness[-5:]}"
    assert len(statuses) > done_at_signal, "no request was in flight at docker stop"
    assert stop_result and c.inspect("{{.State.ExitCode}}") == "0", c.logs()
    assert c.inspect("{{.State.OOMKilled}}") == "false"
    assert stopped - signalled < 20, f"docker stop took {stopped - signalled:.1f}s"


@pytest.mark.skipif(NGINX is None, reason="nginx binary not found (scripts/install_deploy_deps.sh installs it)")
def test_nginx_fails_over_when_a_container_is_killed(fleet: Fleet):
    survivor, victim = fleet.demo, fleet.spare
    nginx = Nginx([survivor.port, victim.port])
    try:
        load = Load(nginx.url, 1000, workers=4).start()
        load.wait_done(4, timeout=180)
        victim_served = requests_served(victim.url)
        victim.engine.run("kill", victim.name)
        load.wait_done(load.done + 6, timeout=180)
        load.stop()
        all_ok(load.join())
        assert victim_served > 0, "the victim served nothing before it was killed"
        assert victim.inspect("{{.State.Running}}") == "false"
        victim_addr = f"127.0.0.1:{victim.port}"
        retried = [u for u in nginx.upstream_log() if "," in u and u.split(",")[0].strip() == victim_addr]
        assert retried, "no request was retried on the other container"
    finally:
        nginx.stop()


# --------------------------------------------------------------------------------------------------
# docker-compose.yml with stand-ins for its nginx and Prometheus images

def nginx_conf_for_debian(text: str) -> str:
    """docker/nginx.conf without the upstream server's `resolve` (nginx >= 1.27.3; Debian's is 1.22):
    nginx then resolves `mrcnn` once, at start, through Docker's DNS, to the replicas running then."""
    text, n = re.subn(r"(^\s*server\s+mrcnn:\d+)\s+resolve\b", r"\1", text, flags=re.M)
    assert n == 1, "docker/nginx.conf's upstream server line changed"
    return text


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not found (scripts/install_deploy_deps.sh installs it)")
def test_compose_brings_up_the_stack(engine: Engine, images: Images):
    """`docker-compose up` of the real docker-compose.yml (Grafana left out: no Debian package for a
    stand-in): two replicas of this image behind nginx on the published port, Prometheus discovering
    both replicas through Docker's DNS. Only the nginx config is swapped (see nginx_conf_for_debian)."""
    images.wait()
    assert compose_images(engine)["mrcnn"] == IMAGE
    work = engine.root / "compose"
    work.mkdir()
    (work / "nginx.conf").write_text(nginx_conf_for_debian(NGINX_CONF.read_text()))
    override = work / "override.yml"
    override.write_text(f"services:\n  lb:\n    volumes:\n      - {work / 'nginx.conf'}:/etc/nginx/nginx.conf:ro\n")
    lb_port, tls_port, prom_port = free_port(), free_port(), free_port()
    write_tls_files(work / "tls")  # the certificate nginx terminates TLS with, mounted from MRCNN_TLS_DIR
    env = {**engine.env, "COMPOSE_PROJECT_NAME": "mrcnntest", "MRCNN_HTTP_PORT": str(lb_port),
           "MRCNN_HTTPS_PORT": str(tls_port), "MRCNN_TLS_DIR": str(work / "tls"), "PROMETHEUS_PORT": str(prom_port)}
    compose = [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    up = run("up", "-d", "--no-build", "mrcnn", "lb", "prometheus")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        replicas = run("ps", "-q", "mrcnn").stdout.split()
        assert len(replicas) == 2, replicas  # deploy.replicas
        upstreams = set()
        upload = {"image": ("s.png", shapes_png(0), "image/png")}
        deadline = time.monotonic() + READY_BOUND_S
        with http_client() as c:
            while len(upstreams) < 2:
                assert time.monotonic() < deadline, (upstreams, run("logs", "--tail", "30").stdout[-4000:])
                with contextlib.suppress(httpx.HTTPError):
                    r = c.post(f"http://127.0.0.1:{lb_port}/segment", files=upload)
                    if r.status_code == 200:
                        # $upstream_addr lists every replica tried ("a:8000, b:8000" after a retry);
                        # the last one answered.
                        upstreams.add(r.headers["x-upstream"].split(",")[-1].strip())
                        continue
                time.sleep(0.5)
        deadline = time.monotonic() + 60
        with http_client(timeout=10.0) as c:
            while True:
                targets = c.get(f"http://127.0.0.1:{prom_port}/api/v1/targets").json()["data"]["activeTargets"]
                up_targets = {t["labels"]["instance"] for t in targets
                              if t["labels"]["job"] == "mrcnn" and t["health"] == "up"}
                if len(up_targets) == 2:
                    break
                assert time.monotonic() < deadline, targets
                time.sleep(1)
        assert {u.rsplit(":", 1)[0] for u in upstreams} == {t.rsplit(":", 1)[0] for t in up_targets}
    finally:
        down = run("down", "-v", "--timeout", "40", timeout=300)
        assert down.returncode == 0, down.stderr
