"""Deployment tests: the compose topology run natively, with the real servers, on loopback.

The containers of docker-compose.yml are reproduced as processes on 127.0.0.1:
- two service replicas (`python -m service --model ... --host 127.0.0.1 --port P`),
- nginx started with docker/nginx.conf, rewriting only the upstream addresses, the listen address and
  the /tmp and log paths (nginx is run with `-p <tmpdir>`, so it needs no root and writes nothing
  outside the temporary directory),
- Prometheus started with docker/prometheus.yml, the DNS discovery of the replicas replaced by their
  loopback addresses and the storage in a temporary directory.

The servers come from Debian's packages (scripts/install_deploy_deps.sh); a test is skipped only when
its binary is missing. All traffic goes to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.deployment import (
    IMAGES,
    NGINX,
    NGINX_CONF,
    REQUEST_TIMEOUT_S,
    REQUESTS_TOTAL,
    ROOT,
    Load,
    Nginx,
    all_ok,
    binary,
    clean_env,
    http_client,
    requests_served,
    rewrite_nginx_conf,
    small_input_model,
    stop_process,
    wait_http,
    world_readable_tmpdir,
    write_tls_files,
)
from tests.helpers import free_port

DOCKER = ROOT / "docker"
PROMETHEUS_YML = DOCKER / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "mrcnn.json"
DATASOURCE_YML = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_YML = DOCKER / "grafana" / "provisioning" / "dashboards" / "mrcnn.yml"

# Names exported by service/ (prometheus-client).
METRICS = [
    "mrcnn_request_duration_seconds",
    "mrcnn_queue_wait_seconds",
    "mrcnn_inference_duration_seconds",
    "mrcnn_batch_size",
    "mrcnn_queue_depth",
    REQUESTS_TOTAL,
    "mrcnn_detections_total",
]

STARTUP_TIMEOUT_S = 90.0


PROMETHEUS = binary("prometheus")
PROMTOOL = binary("promtool")
COMPOSE = binary("docker-compose")

_INSTALL_HINT = "(scripts/install_deploy_deps.sh installs it)"
needs_nginx = pytest.mark.skipif(NGINX is None, reason=f"nginx binary not found {_INSTALL_HINT}")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason=f"prometheus binary not found {_INSTALL_HINT}"
)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool binary not found {_INSTALL_HINT}")
needs_compose = pytest.mark.skipif(COMPOSE is None, reason=f"docker-compose binary not found {_INSTALL_HINT}")


# --------------------------------------------------------------------------------------------------
# helpers


def _replica_env() -> dict[str, str]:
    """Several replicas share this machine's cores, as in docs/deployment.md: one ORT thread each."""
    return {**clean_env(), "MRCNN_INTRA_OP_THREADS": "1"}


class Replica:
    """One service process on 127.0.0.1."""

    def __init__(self, model: Path, workdir: Path, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self._log_fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=ROOT, env=_replica_env(), stdout=self._log_fh, stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        wait_http(self.url + "/readyz", self.proc, STARTUP_TIMEOUT_S, self.log)

    def served(self) -> int:
        return requests_served(self.url)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self._log_fh.close()


# ---- configuration rewrites (only addresses and paths) -------------------------------------------


def rewrite_prometheus_yml(text: str, replica_ports: list[int], listen_port: int) -> str:
    """docker/prometheus.yml for loopback: the replicas' DNS discovery becomes static targets."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "dns_sd_configs:"]
    assert len(starts) == 1, "docker/prometheus.yml must discover the replicas with one dns_sd_configs"
    i = starts[0]
    indent = len(lines[i]) - len(lines[i].lstrip())
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
        j += 1
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in replica_ports)
    pad = " " * indent
    lines[i:j] = [f"{pad}static_configs:", f"{pad}  - targets: [{targets}]"]
    out = "\n".join(lines) + "\n"
    return out.replace("localhost:9090", f"127.0.0.1:{listen_port}")


# ---- servers -------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, replica_ports: list[int], workdir: Path):
        assert PROMETHEUS is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(rewrite_prometheus_yml(PROMETHEUS_YML.read_text(), replica_ports, self.port))
        self.log = workdir / "prometheus.log"
        self._log_fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            cwd=workdir, env=clean_env(), stdout=self._log_fh, stderr=subprocess.STDOUT,
        )
        try:
            wait_http(self.url + "/-/ready", self.proc, 30.0, self.log)
        except BaseException:
            self.stop()
            raise

    def api(self, path: str, **params: str) -> dict:
        with http_client(timeout=10.0) as c:
            r = c.get(self.url + "/api/v1/" + path, params=params)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)
        self._log_fh.close()


# ---- traffic -------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = world_readable_tmpdir("mrcnn-deploy-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def deploy_model(tiny_onnx_model, workdir) -> Path:
    return small_input_model(Path(tiny_onnx_model), workdir / "tiny-64.onnx")


@pytest.fixture(scope="module")
def replicas(deploy_model, workdir) -> Iterator[list[Replica]]:
    started = [Replica(deploy_model, workdir, f"replica{i}") for i in range(2)]
    try:
        for r in started:
            r.wait_ready()
        yield started
    finally:
        for r in started:
            r.stop()


@pytest.fixture(scope="module")
def lb(replicas) -> Iterator[Nginx]:
    if NGINX is None:
        pytest.skip(f"nginx binary not found {_INSTALL_HINT}")
    n = Nginx([r.port for r in replicas])
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def prometheus(replicas, workdir) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip(f"prometheus binary not found {_INSTALL_HINT}")
    p = Prometheus([r.port for r in replicas], workdir)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def spare_replica(deploy_model, workdir, request) -> Iterator[Replica]:
    """A replica of its own, for the tests that kill or drain one."""
    r = Replica(deploy_model, workdir, f"spare-{request.node.name}")
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop(signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# config


def _provisioned_datasource_uid() -> str:
    m = re.search(r"^\s*uid:\s*['\"]?([\w-]+)", DATASOURCE_YML.read_text(), flags=re.M)
    assert m, "the provisioned data source must have a fixed uid"
    return m.group(1)


def _dashboard_targets() -> list[tuple[str, dict]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for t in sub.get("targets", []):
                out.append((sub["title"], t))
    return out


def _promql(expr: str) -> str:
    """Grafana's template variables, substituted as Grafana does for the default selection."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$instance", ".*")
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


@pytest.mark.docker
@needs_compose
def test_compose_config_accepted(tmp_path):
    env = clean_env()
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker/compose.gpu.yml"]):
        args = [COMPOSE, *itertools.chain.from_iterable(("-f", f) for f in files), "config"]
        res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{' '.join(args)}:\n{res.stderr}"
        assert "replicas: 2" in res.stdout
        services = subprocess.run([*args, "--services"], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=60)
        assert services.returncode == 0, services.stderr
        assert set(services.stdout.split()) == {"mrcnn", "lb", "prometheus", "grafana"}
    gpu = res.stdout
    assert "VARIANT: gpu" in gpu and "CUDAExecutionProvider" in gpu and "driver: nvidia" in gpu
    # Scaling is a variable away.
    env["MRCNN_REPLICAS"] = "3"
    res = subprocess.run([COMPOSE, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "replicas: 3" in res.stdout, res.stderr


def test_dashboard_json_uses_provisioned_datasource():
    uid = _provisioned_datasource_uid()
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    for panel in panels:
        assert panel.get("datasource", {}).get("uid") == uid, f"panel {panel['title']!r}"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for t in panel["targets"]:
            assert t.get("datasource", {}).get("uid") == uid, f"panel {panel['title']!r} {t['refId']}"
            assert t["expr"].strip()
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            assert var["datasource"]["uid"] == uid
    # What the issue asks the dashboard to show, per replica and in total.
    exprs = [t["expr"] for _, t in _dashboard_targets()]
    joined = "\n".join(exprs)
    for metric in METRICS:
        assert metric in joined, f"no panel uses {metric}"
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(mrcnn_request_duration_seconds_bucket" in joined
        assert f"histogram_quantile({q}, sum by (instance, le) (rate(mrcnn_request_duration_seconds" in joined
    assert "sum by (instance) (rate(mrcnn_requests_total" in joined
    assert "sum(rate(mrcnn_requests_total" in joined
    assert "sum by (status)" in joined and "sum by (instance, status)" in joined
    # The provider loads the directory compose mounts the dashboard into.
    provider = DASHBOARD_PROVIDER_YML.read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    m = re.search(r"^\s*path:\s*(\S+)", provider, flags=re.M)
    assert m and f"./docker/grafana/dashboards:{m.group(1)}" in compose


def test_dashboard_metrics_exist_in_the_service():
    """Every metric the dashboard queries is one the service registers (service/core/metrics.py)."""
    from service.core.metrics import Metrics

    families = {f.name for f in Metrics().registry.collect()}
    suffixes = ("", "_total", "_bucket", "_sum", "_count", "_info")
    used = set(re.findall(r"\bmrcnn_\w+", "\n".join(t["expr"] for _, t in _dashboard_targets())))
    assert used
    exported = {f + sfx for f in families for sfx in suffixes}
    assert not used - exported, f"dashboard queries metrics the service does not export: {used - exported}"
    for metric in METRICS:
        assert any(u == metric or u.startswith(metric + "_") for u in used), f"dashboard lacks {metric}"


@needs_promtool
def test_prometheus_config_valid(tmp_path):
    res = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_YML)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    rewritten = tmp_path / "prometheus.yml"
    rewritten.write_text(rewrite_prometheus_yml(PROMETHEUS_YML.read_text(), [18001, 18002], 19090))
    res = subprocess.run([PROMTOOL, "check", "config", str(rewritten)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    text = rewritten.read_text()
    assert "'127.0.0.1:18001', '127.0.0.1:18002'" in text and "dns_sd_configs:" not in text


def _nginx_directive(conf: str, name: str) -> list[str]:
    return [m.strip() for m in re.findall(rf"^\s*{name}\s+([^;]*);", conf, flags=re.M)]


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


def _bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG])?", value)
    assert m, value
    return int(m.group(1)) * {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}[
        m.group(2).lower() if m.group(2) else None]


@needs_nginx
def test_nginx_config_policy():
    """Least connections, passive health checks, retries elsewhere, limits matching the service's."""
    conf = NGINX_CONF.read_text()
    upstream = re.search(r"upstream\s+mrcnn\s*\{(.*?)\}", conf, flags=re.S).group(1)
    assert re.search(r"^\s*least_conn\s*;", upstream, flags=re.M)
    server = re.search(r"^\s*server\s+([^;]*);", upstream, flags=re.M).group(1)
    assert "max_fails=" in server and "fail_timeout=" in server
    retry = _nginx_directive(conf, "proxy_next_upstream")[0].split()
    assert {"error", "timeout", "http_502", "http_503", "non_idempotent"} <= set(retry)
    assert int(_nginx_directive(conf, "proxy_next_upstream_tries")[0]) >= 2
    # The service's own defaults (service/core/settings.py): body limit equal, timeouts just above its deadline.
    from service.core.settings import Settings

    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    assert _bytes(_nginx_directive(conf, "client_max_body_size")[0]) == defaults["max_upload_bytes"]
    deadline = defaults["request_timeout_s"]
    for directive in ("proxy_read_timeout", "proxy_send_timeout", "proxy_next_upstream_timeout"):
        value = _seconds(_nginx_directive(conf, directive)[0])
        assert deadline < value <= deadline + 15, f"{directive} {value}s vs the service deadline {deadline}s"
    # The rewritten config is what the process tests run: nginx itself must accept it.
    prefix = world_readable_tmpdir("mrcnn-nginx-check-")
    try:
        cfg = prefix / "nginx.conf"
        write_tls_files(prefix / "tls")
        cfg.write_text(rewrite_nginx_conf(conf, [18001, 18002], 18080, prefix, 18443))
        res = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(cfg), "-e", str(prefix / "e.log")],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        text = cfg.read_text()
        assert "server 127.0.0.1:18001 max_fails=" in text and "server 127.0.0.1:18002 max_fails=" in text
        assert "listen 127.0.0.1:18080;" in text and "listen 127.0.0.1:18443 ssl;" in text
        assert "/tmp/" not in text.replace(str(prefix), "") and "/etc/nginx/tls/" not in text
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def test_dockerfile_runtime_stage():
    """Multi-stage; the runtime stage: non-root, HEALTHCHECK on /healthz, demo model, no torch."""
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    names = [re.match(r"\S+\s+AS\s+(\S+)", s, flags=re.I).group(1) for s in stages]
    assert {"builder", "runtime", "base-cpu", "base-gpu"} <= set(names)
    assert names[-1] == "runtime"
    runtime = stages[-1]
    assert re.search(r"^USER\s+(?!root|0\b)\S+", runtime, flags=re.M)
    assert re.search(r"^HEALTHCHECK\b.*?/healthz", runtime, flags=re.M | re.S)
    assert "COPY --from=builder /opt/venv" in runtime
    assert "MRCNN_MODEL_PATH=/opt/mrcnn/models/demo/model.onnx" in runtime
    assert "build-essential" not in runtime and "gcc" not in runtime
    # Only pyproject's core dependencies (+ onnxruntime-gpu) are installed: no `train` extra, no torch.
    assert "[train" not in text and not re.search(r"pip install[^\n]*torch", text)
    assert "['project']" in text and "p['dependencies']" in text
    for arg in re.findall(r"^ARG\s+\w+_IMAGE=(\S+)", text, flags=re.M):
        tag = arg.rsplit(":", 1)[-1]
        assert ":" in arg and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {arg}"
    assert "onnxruntime-gpu" not in text or "optional-dependencies']['gpu']" in text
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    # An allow-list: everything excluded, then only what the image needs.
    assert ignore[0] == "*" and "!service/" in ignore and "!models/demo/" in ignore
    allowed = {ln.strip("!/") for ln in ignore if ln.startswith("!")}
    assert not allowed & {".venv", ".git", "tests", "data"}


def test_k8s_probes_and_grace_period_cover_the_drain():
    """Liveness on /healthz, readiness on /readyz; the grace period outlasts preStop + the drain."""
    from service.core.settings import Settings

    text = (ROOT / "k8s" / "deployment.yaml").read_text()
    probes = dict(re.findall(r"^\s*(\w+Probe):\s*\n\s*httpGet:\s*\n\s*path:\s*(\S+)", text, flags=re.M))
    assert probes == {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    env = dict(re.findall(r"-\s*name:\s*(MRCNN_\w+)\s*\n\s*value:\s*\"?([^\"\n]+)\"?", text))
    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    drain = float(env.get("MRCNN_DRAIN_TIMEOUT_S", defaults["drain_timeout_s"]))
    grace = float(env.get("MRCNN_DRAIN_GRACE_S", defaults["drain_grace_s"]))
    deadline = float(env.get("MRCNN_REQUEST_TIMEOUT_S", defaults["request_timeout_s"]))
    pre_stop = re.search(r'preStop:\s*\n\s*exec:\s*\n\s*command:\s*\["sleep",\s*"(\d+)"\]', text)
    pre_stop_s = float(pre_stop.group(1)) if pre_stop else 0.0
    period = float(re.search(r"terminationGracePeriodSeconds:\s*(\d+)", text).group(1))
    assert drain >= deadline, "the drain must let a request run to its deadline"
    assert period > pre_stop_s + grace + drain, (period, pre_stop_s, grace, drain)
    # compose gives a stopping replica the same room
    compose = (ROOT / "docker-compose.yml").read_text()
    stop = re.search(r"stop_grace_period:\s*(\d+)s", compose)
    assert stop and float(stop.group(1)) > defaults["drain_grace_s"] + defaults["drain_timeout_s"]


# --------------------------------------------------------------------------------------------------
# processes: topology, failover, monitoring


@pytest.mark.slow
@needs_nginx
def test_lb_spreads_requests_over_both_replicas(replicas, lb):
    before = [r.served() for r in replicas]
    statuses = Load(lb.url, 40, workers=4).start().join()
    all_ok(statuses)
    served = [r.served() - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) >= 40, served
    assert all(s > 0 for s in served), f"a replica served nothing: {served}"
    # /healthz and /readyz pass through the LB as well.
    with http_client(10.0) as c:
        assert c.get(lb.url + "/healthz").status_code == 200
        assert c.get(lb.url + "/readyz").status_code == 200


@pytest.mark.slow
@needs_nginx
def test_lb_terminates_tls(replicas, lb):
    """HTTPS at nginx with the mounted certificate, plain HTTP to the replicas behind; the client's request ID
    reaches the replica and comes back; nginx makes one when the client sends none."""
    context = ssl.create_default_context()
    lb.ca.configure_trust(context)
    with httpx.Client(verify=context, timeout=60, trust_env=False) as c:
        r = c.post(lb.tls_url + "/segment", content=IMAGES[0], headers={"content-type": "image/png",
                                                                         "X-Request-ID": "through-nginx-1"})
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "through-nginx-1" and r.headers["x-upstream"]
        own = c.get(lb.tls_url + "/healthz").headers["x-request-id"]
        assert len(own) == 32 and int(own, 16) >= 0  # nginx's $request_id, kept by the replica
    with pytest.raises(httpx.HTTPError):  # a client that does not trust the CA
        httpx.get(lb.tls_url + "/healthz", trust_env=False)


@pytest.mark.slow
@needs_nginx
def test_lb_body_limit_matches_the_service(replicas, lb):
    """A body at the service's limit reaches a replica; one byte more is refused by nginx, as JSON."""
    from service.core.settings import Settings

    limit = Settings.model_fields["max_upload_bytes"].default
    headers = {"content-type": "image/jpeg"}
    with http_client() as c:
        at_limit = c.post(lb.url + "/segment", content=b"\xff" * limit, headers=headers)
        over = c.post(lb.url + "/segment", content=b"\xff" * (limit + 1), headers=headers)
    # Not an image: the replica decodes it and says so (its own JSON error).
    assert at_limit.status_code == 400, at_limit.text
    assert at_limit.headers.get("x-upstream", "").startswith("127.0.0.1:")
    assert over.status_code == 413, over.text
    assert over.json()["error"]["code"] == "payload_too_large"  # nginx's answer, in the service's format


@pytest.mark.slow
@needs_nginx
def test_failover_when_a_replica_is_killed(replicas, spare_replica):
    survivor, victim = replicas[0], spare_replica
    nginx = Nginx([survivor.port, victim.port])
    try:
        load = Load(nginx.url, 1000, workers=4).start()
        load.wait_done(4, timeout=180)
        victim_served = victim.served()
        victim.proc.kill()
        victim.proc.wait(timeout=10)
        # The stream goes on past the kill, then stops.
        load.wait_done(load.done + 6, timeout=180)
        load.stop()
        statuses = load.join()
        all_ok(statuses)
        assert victim_served > 0, "the victim served nothing before it was killed"
        # nginx retried at least one request on the survivor after failing on the killed replica.
        victim_addr = f"127.0.0.1:{victim.port}"
        retried = [u for u in nginx.upstream_log() if "," in u and u.split(",")[0].strip() == victim_addr]
        assert retried, "no request was retried on the other replica"
    finally:
        nginx.stop()


def _big_jpeg(seed: int = 0, size: tuple[int, int] = (2400, 3200)) -> bytes:
    """A large photo-like upload (still far below the body and pixel limits): slow enough to decode that
    a request is reliably in flight when the replica gets SIGTERM."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class _Probe(threading.Thread):
    """One direct request to a replica (not through the LB), timed; `sent` is set once the whole body
    has been written to the socket."""

    def __init__(self, url: str, body: bytes):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.client = http_client()  # built here: its set-up is not part of the request
        self.sent = threading.Event()
        self.result: int | str | None = None
        self.started = self.sent_at = self.finished = 0.0

    def _chunks(self) -> Iterator[bytes]:
        step = 1 << 16
        for i in range(0, len(self.body), step):
            yield self.body[i : i + step]
        self.sent_at = time.monotonic()
        self.sent.set()

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            self.result = self.client.post(
                self.url + "/segment", content=self._chunks(),
                headers={"content-type": "image/jpeg", "content-length": str(len(self.body))},
            ).status_code
        except httpx.HTTPError as e:
            self.result = repr(e)
        finally:
            self.finished = time.monotonic()
            self.client.close()


@pytest.mark.slow
@needs_nginx
def test_sigterm_drains_without_client_errors(replicas, spare_replica):
    survivor, victim = replicas[0], spare_replica
    big = _big_jpeg()
    # How long the replica works on one big request once it has it: SIGTERM comes within that time.
    warm = _Probe(victim.url, big)
    warm.run()
    assert warm.result == 200, warm.result
    duration = warm.finished - warm.sent_at

    nginx = Nginx([survivor.port, victim.port])
    try:
        load = Load(nginx.url, 1000, workers=4).start()
        load.wait_done(4, timeout=180)
        victim_served = victim.served()
        probe = _Probe(victim.url, big)
        probe.start()
        assert probe.sent.wait(timeout=30), "the probe's body was not sent"
        time.sleep(min(0.02, 0.2 * duration))  # the replica has read it and is decoding it
        in_flight = probe.is_alive()
        victim.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The replica drains and exits by itself, with status 0 (service/__main__.py), under load.
        rc = victim.proc.wait(timeout=60)
        exited = time.monotonic()
        # The stream goes on past the exit, then stops.
        load.wait_done(load.done + 4, timeout=180)
        load.stop()
        statuses = load.join()
        probe.join(timeout=REQUEST_TIMEOUT_S)
        # Clients of the LB never see the drain.
        all_ok(statuses)
        assert victim_served > 0
        assert rc == 0, f"replica exited with {rc} after SIGTERM:\n{victim.log.read_text()[-2000:]}"
        assert exited - signalled < 35, f"the drain took {exited - signalled:.1f}s (deadline 30 s)"
        # The request the replica was working on when it got SIGTERM was answered, not dropped.
        assert in_flight, f"probe finished before SIGTERM ({duration:.3f}s per request)"
        assert probe.result == 200, f"in-flight request at SIGTERM got {probe.result}"
        assert probe.finished > signalled
    finally:
        nginx.stop()


def _send_errors(base_url: str) -> list[int]:
    """Requests the service must refuse: undecodable (400) and unsupported type (415)."""
    with http_client() as c:
        undecodable = c.post(base_url + "/segment", files={"image": ("x.png", b"not an image", "image/png")})
        unsupported = c.post(base_url + "/segment", content=b"%PDF-1.4",
                             headers={"content-type": "application/pdf"})
    return [undecodable.status_code, unsupported.status_code]


@pytest.mark.slow
@needs_nginx
@needs_prometheus
def test_prometheus_scrapes_replicas_and_dashboard_queries_return_data(replicas, lb, prometheus):
    # Every replica is a target of its own (scraped directly, not through the LB), and up.
    wanted = {f"127.0.0.1:{r.port}" for r in replicas}
    deadline = time.monotonic() + 30
    while True:
        targets = prometheus.api("targets")["activeTargets"]
        health = {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == "mrcnn"}
        if set(health) == wanted and all(h == "up" for h in health.values()):
            break
        assert time.monotonic() < deadline, f"replica targets not all up: {health}"
        time.sleep(1)

    assert sorted(_send_errors(lb.url)) == [400, 415]
    all_ok(Load(lb.url, 4, workers=2).start().join())

    queries = [(title, _promql(t["expr"])) for title, t in _dashboard_targets()]
    # The per-replica request rate, as the dashboard queries it, must show both replicas.
    per_replica = next(e for _, e in queries if e.startswith(f"sum by (instance) (rate({REQUESTS_TOTAL}"))
    deadline = time.monotonic() + 45
    while True:
        empty = []
        for title, expr in queries:
            data = prometheus.api("query", query=expr)  # a PromQL error fails here
            if not data["result"]:
                empty.append((title, expr))
        instances = {s["metric"]["instance"] for s in prometheus.api("query", query=per_replica)["result"]}
        if not empty and instances == wanted:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{len(empty)} dashboard queries return no data: {empty}; "
                        f"per-replica rate for {instances}, wanted {wanted}")
        # Keep a trickle of traffic so that rates have samples on both sides of a scrape.
        all_ok(Load(lb.url, 2, workers=2).start().join())
        time.sleep(1)
