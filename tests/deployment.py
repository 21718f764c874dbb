"""The deployment side of the tests (tests/test_deploy.py, tests/test_container.py): child processes,
docker/nginx.conf run natively on loopback, and a stream of /segment requests sent through it."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import trustme

from tests.helpers import encode, free_port, metric_values, scene

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "docker" / "nginx.conf"
REQUEST_TIMEOUT_S = 60.0
REQUESTS_TOTAL = "mrcnn_requests_total"  # the service's request counter (service/core/metrics.py)


def binary(name: str) -> str | None:
    """An executable on PATH or in the sbin/bin directories (root's tools are not always on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


NGINX = binary("nginx")


def clean_env() -> dict[str, str]:
    """The environment for child processes: no proxies (loopback only), no inherited MRCNN_ settings, no gRPC
    door (its default port is fixed: tests/conftest.py)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("MRCNN_")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["MRCNN_GRPC_PORT"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def http_client(timeout: float = REQUEST_TIMEOUT_S) -> httpx.Client:
    return httpx.Client(timeout=timeout, trust_env=False)


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Poll url until it answers 200; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    last = ""
    with http_client(timeout=5.0) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
                pytest.fail(f"process for {url} exited with {proc.returncode}:\n{tail}")
            try:
                r = c.get(url)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{url} not ready after {timeout:.0f}s ({last}):\n{tail}")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def requests_served(base_url: str) -> int:
    """Requests a replica has answered, by its own /metrics."""
    with http_client(timeout=10.0) as c:
        r = c.get(base_url + "/metrics")
    r.raise_for_status()
    return round(sum(v for (name, _), v in metric_values(r.text).items() if name == REQUESTS_TOTAL))


def world_readable_tmpdir(prefix: str) -> Path:
    """A temp dir that nginx's workers (user nobody when started as root) can traverse."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def write_tls_files(folder: Path) -> trustme.CA:
    """A certificate for 127.0.0.1 as docker-compose.yml mounts one for nginx (``tls.crt``, ``tls.key``), from
    a throwaway CA, which is returned for the clients to trust."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(folder / "tls.key"))
    for name in ("tls.crt", "tls.key"):  # nginx's workers (nobody, when started as root) read them
        (folder / name).chmod(0o644)
    return ca


def rewrite_nginx_conf(text: str, upstream_ports: list[int], listen_port: int, prefix: Path,
                       tls_port: int) -> str:
    """docker/nginx.conf for loopback: upstream servers, listen addresses (plain and TLS), the certificate's
    folder (``prefix``/tls, see write_tls_files), /tmp and log paths."""

    def upstream(m: re.Match) -> str:
        body = m.group(2)
        servers = re.findall(r"^\s*server\s+\S+([^;]*);", body, flags=re.M)
        assert len(servers) == 1, f"expected one templated upstream server line, got {servers}"
        # `resolve` is for Docker's DNS name; loopback addresses are literal.
        params = " ".join(p for p in servers[0].split() if p != "resolve")
        lines = "\n".join(f"        server 127.0.0.1:{p} {params};" for p in upstream_ports)
        body = re.sub(r"^\s*server\s+\S+[^;]*;", lambda _m: lines, body, count=1, flags=re.M)
        return m.group(1) + body + "}"

    text, n = re.subn(r"(upstream\s+mrcnn\s*\{)(.*?)\}", upstream, text, flags=re.S)
    assert n == 1, "docker/nginx.conf must define `upstream mrcnn`"
    # Docker's DNS resolver address: nothing to resolve on loopback.
    text = re.sub(r"^\s*resolver\s[^;]*;\n", "", text, flags=re.M)
    text, n = re.subn(r"\blisten\s+8080\s*;", f"listen 127.0.0.1:{listen_port};", text)
    assert n == 1, "docker/nginx.conf must listen on 8080"
    text, n = re.subn(r"\blisten\s+8443\s+ssl\s*;", f"listen 127.0.0.1:{tls_port} ssl;", text)
    assert n == 1, "docker/nginx.conf must listen on 8443 with TLS"
    text = text.replace("/tmp/", f"{prefix}/")
    text = text.replace("/etc/nginx/tls/", f"{prefix}/tls/")  # after /tmp/: the prefix may be under /tmp
    text = text.replace("/dev/stderr", str(prefix / "error.log"))
    text = text.replace("/dev/stdout", str(prefix / "access.log"))
    return text


class Nginx:
    def __init__(self, upstream_ports: list[int]):
        assert NGINX is not None
        self.prefix = world_readable_tmpdir("mrcnn-nginx-")
        self.port, self.tls_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tls_url = f"https://127.0.0.1:{self.tls_port}"
        self.ca = write_tls_files(self.prefix / "tls")
        conf = self.prefix / "nginx.conf"
        conf.write_text(rewrite_nginx_conf(NGINX_CONF.read_text(), upstream_ports, self.port, self.prefix,
                                           self.tls_port))
        self.access_log = self.prefix / "access.log"
        self.error_log = self.prefix / "error.log"
        check = subprocess.run(
            [NGINX, "-t", "-p", str(self.prefix), "-c", str(conf), "-e", str(self.error_log)],
            capture_output=True, text=True, timeout=30,
        )
        assert check.returncode == 0, f"nginx -t rejected the config:\n{check.stderr}"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.error_log),
             "-g", "daemon off;"],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(self.url + "/lb-healthz", self.proc, 20.0, self.error_log)
        except BaseException:
            self.stop()
            raise

    def upstream_log(self) -> list[str]:
        """The `upstream=` field of every access-log line (one address per attempt)."""
        if not self.access_log.exists():
            return []
        return re.findall(r"upstream=(.*?) ustatus=", self.access_log.read_text(errors="replace"))

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)
        shutil.rmtree(self.prefix, ignore_errors=True)


IMAGES = [encode(scene(s, (96, 128)).image) for s in range(4)]


def segment_status(client: httpx.Client, base_url: str, i: int) -> int | str:
    try:
        r = client.post(
            base_url + "/segment",
            files={"image": (f"img{i}.png", IMAGES[i % len(IMAGES)], "image/png")},
        )
    except httpx.HTTPError as e:
        return repr(e)
    if r.status_code == 200:
        body = r.json()
        if not isinstance(body.get("detections"), list) or body.get("image") != {"width": 128, "height": 96}:
            return f"200 with an unexpected body: {str(body)[:200]}"
    return r.status_code


class Load:
    """POST /segment requests through base_url by `workers` threads: `n` of them, or fewer if stopped
    earlier with stop(). join() gives the statuses of the requests made, in order."""

    def __init__(self, base_url: str, n: int, workers: int = 4):
        self.statuses: list[int | str | None] = [None] * n
        self.done = 0
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._n = n
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(base_url,), daemon=True)
                         for _ in range(workers)]

    def _work(self, base_url: str) -> None:
        with http_client() as c:
            while not self._stop.is_set():
                with self._lock:
                    i = next(self._next)
                if i >= self._n:
                    return
                self.statuses[i] = segment_status(c, base_url, i)
                with self._lock:
                    self.done += 1

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def wait_done(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.done < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.done >= count, f"only {self.done}/{count} requests done after {timeout:.0f}s"

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 300.0) -> list[int | str | None]:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "load threads did not finish"
        # Every index handed out to a worker was answered (workers only check stop between requests).
        with self._lock:
            made = min(next(self._next), self._n)
        return self.statuses[:made]


def all_ok(statuses: list[int | str | None]) -> None:
    bad = {i: s for i, s in enumerate(statuses) if s != 200}
    assert not bad, f"{len(bad)} of {len(statuses)} requests failed: {dict(list(bad.items())[:10])}"


def small_input_model(src: Path, out: Path) -> Path:
    """``src`` with a smaller input-size policy (its metadata's min_size / max_size, which the service
    reads): the same graph, about half the CPU per request, for the tests about load balancing and
    draining rather than about the model's resolution. Without onnx (the serving deps alone): ``src``."""
    try:
        import onnx
    except ImportError:
        return src
    model = onnx.load(str(src))
    props = {p.key: p for p in model.metadata_props}
    props["min_size"].value, props["max_size"].value = "64", "96"
    onnx.save(model, str(out))
    return out
