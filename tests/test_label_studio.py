"""The Label Studio ML backend (service/label_studio): its routes against our real server with the demo model, and
then the real thing, Label Studio itself started on loopback with our server connected as a project's model.

Every prediction is checked against /segment on the same image: the same detections (labels mapped to the
config's by name or ``predicted_values``, the same scores), their masks decoded from Label Studio's brush RLE with
label-studio-sdk's converter, or their polygons, matching /segment's.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from tests.conftest import DEMO_MAX_UPLOAD
from tests.helpers import ServerThread, free_port, iou, metric_values, sample

REPO = Path(__file__).resolve().parents[1]
# Where scripts/install_label_studio.sh puts Label Studio (the same default as there).
LABEL_STUDIO_VENV = Path(os.environ.get("LABEL_STUDIO_VENV", REPO / ".venv-label-studio"))
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # a legacy API token, as Label Studio makes them
LABEL_STUDIO_USER, LABEL_STUDIO_PASSWORD = "admin@example.com", "not-a-secret-1"
API_KEY = "label-studio-key-Zq3v8LrT0yWmK5pX2nB7cD4fH6jS9uA1"  # our server's, when it has keys
MIN_IOU = 0.98
BRUSH_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image">
  <Label value="circle"/><Label value="square"/><Label value="triangle"/><Label value="star"/>
</BrushLabels></View>"""
# Two classes map (one by predicted_values), the other two have no label and are left out.
POLYGON_CONFIG = """<View><Image name="photo" value="$picture"/>
<PolygonLabels name="outline" toName="photo">
  <Label value="Round" predicted_values="circle"/><Label value="square"/><Label value="cat"/>
</PolygonLabels></View>"""
POLYGON_LABELS = {"circle": "Round", "square": "square"}
RECTANGLE_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="star"/><Label value="triangle"/></RectangleLabels></View>"""


def shapes_png(index: int) -> bytes:
    """A synthetic shapes image (model/data/shapes.py) as PNG: the demo model finds its objects."""
    from model.data.shapes import generate

    out = io.BytesIO()
    Image.fromarray(generate(7, index).image).save(out, "PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def segment(server_url: str, png: bytes, classes: list[str] | None = None) -> dict[str, Any]:
    return segment_with(server_url, png, {}, classes)


def segment_with(server_url: str, png: bytes, headers: dict[str, str], classes: list[str] | None = None
                 ) -> dict[str, Any]:
    params = {"classes": ",".join(classes)} if classes else {}
    response = httpx.post(f"{server_url}/segment", files={"image": ("x.png", png, "image/png")}, params=params,
                          headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def brush_mask(region: dict[str, Any]) -> np.ndarray:
    """A brush region's mask, decoded by label-studio-sdk's converter (the alpha channel of an RGBA bitmap)."""
    from label_studio_sdk.converter.brush import decode_rle

    height, width = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def polygon_mask(points: list[list[float]], width: int, height: int) -> np.ndarray:
    image = Image.new("L", (width, height))
    ImageDraw.Draw(image).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(image) > 0


def check_brush(prediction: dict[str, Any], expected: dict[str, Any]) -> float:
    """The prediction's brush regions are /segment's detections, in order; returns the smallest mask IoU."""
    regions, detections = prediction["result"], expected["detections"]
    assert detections
    assert [r["value"]["brushlabels"] for r in regions] == [[d["label"]] for d in detections]
    assert [r["score"] for r in regions] == pytest.approx([d["score"] for d in detections], abs=1e-6)
    ious = [iou(brush_mask(r), coco_mask.decode({**d["mask"], "counts": d["mask"]["counts"].encode()}) > 0)
            for r, d in zip(regions, detections, strict=True)]
    assert min(ious) >= MIN_IOU, ious
    assert prediction["score"] == pytest.approx(np.mean([d["score"] for d in detections]), abs=1e-6)
    return min(ious)


def check_polygons(prediction: dict[str, Any], expected: dict[str, Any]) -> float:
    """One polygon region per outline of /segment's detections (labels mapped), the same shape."""
    width, height = expected["image"]["width"], expected["image"]["height"]
    outlines = [(d, polygon) for d in expected["detections"] for polygon in d["polygons"]]
    regions = prediction["result"]
    assert outlines
    assert [r["value"]["polygonlabels"] for r in regions] == [[POLYGON_LABELS[d["label"]]] for d, _ in outlines]
    assert [r["score"] for r in regions] == pytest.approx([d["score"] for d, _ in outlines], abs=1e-6)
    ious = []
    for region, (_, polygon) in zip(regions, outlines, strict=True):
        ours = np.asarray(polygon).reshape(-1, 2)
        theirs = np.asarray(region["value"]["points"]) * (width / 100, height / 100)
        np.testing.assert_allclose(theirs, ours, atol=1e-6)
        ious.append(iou(polygon_mask(theirs.tolist(), width, height), polygon_mask(ours.tolist(), width, height)))
    assert min(ious) >= MIN_IOU, ious
    return min(ious)


# -- the routes, against our server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_host() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A plain HTTP server on loopback serving shapes PNGs at /shapes-N.png; it records each request's headers
    (to see which carry Label Studio's token)."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            seen.append({"path": self.path, "authorization": self.headers.get("Authorization", "")})
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            if name == "big.png":  # one byte over the server's limit
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(b"\0" * (DEMO_MAX_UPLOAD + 1))
                return
            if not (name.startswith("shapes-") and name.endswith(".png")):
                self.send_error(404)
                return
            body = shapes_png(int(name[len("shapes-"):-len(".png")]))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


@pytest.fixture(scope="module")
def backend(image_host: tuple[str, list[dict[str, str]]]) -> Iterator[str]:
    """Our server with the demo model, told that Label Studio lives at the image host (so the host's files are
    read with the token); its /label-studio routes' base URL."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600,
                        label_studio_url=image_host[0], label_studio_token=TOKEN)
    with ServerThread(create_app(settings)) as server:
        yield server.url


def predict(base: str, config: str, tasks: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{base}/label-studio/predict", json={"tasks": tasks, "label_config": config,
                                                          "project": "1.1700000000", "params": {}}, timeout=300)


def test_health_setup_versions_and_webhook_answer_as_label_studio_expects(backend: str) -> None:
    health = httpx.get(f"{backend}/label-studio/health").json()
    assert health["status"] == "UP"
    version = httpx.get(f"{backend}/v1/model").json()
    model_version = f"{version['name']}-{version['version']}"
    assert health["model_version"] == model_version
    setup = httpx.post(f"{backend}/label-studio/setup", json={"project": "1.1", "schema": BRUSH_CONFIG,
                                                              "hostname": "http://x", "access_token": "t"})
    assert setup.status_code == 200 and setup.json() == {"model_version": model_version}
    hook = httpx.post(f"{backend}/label-studio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {}})
    assert hook.status_code == 200 and hook.json()["action"] == "ANNOTATION_CREATED"
    assert httpx.get(f"{backend}/label-studio/versions").json() == {"versions": [model_version]}
    for method, path, status, code in (("GET", "predict", 405, "method_not_allowed"),
                                       ("POST", "train", 404, "not_found")):  # no training here
        response = httpx.request(method, f"{backend}/label-studio/{path}")
        assert response.status_code == status and response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("schema", "status", "code"),
    [
        ("<View><Image name='i' value='$image'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
         422, "unsupported_label_config"),
        ("<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'><Label value='dog'/></BrushLabels>"
         "</View>", 422, "no_matching_labels"),
        ("<View><Image", 400, "bad_label_config"),
    ],
)
def test_setup_refuses_a_config_it_cannot_fill_in(backend: str, schema: str, status: int, code: str) -> None:
    response = httpx.post(f"{backend}/label-studio/setup", json={"project": "1.1", "schema": schema})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_without_label_studio_sdk_the_backend_says_what_to_install(backend: str, monkeypatch) -> None:
    """The serving image has no annotation extra: connecting a project says so instead of failing obscurely."""
    import sys

    monkeypatch.setitem(sys.modules, "label_studio_sdk.label_interface", None)  # its import now fails
    response = httpx.post(f"{backend}/label-studio/setup", json={"project": "1.1", "schema": BRUSH_CONFIG})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "label_studio_sdk_missing" and "[annotation]" in error["message"]


def test_brush_predictions_are_the_segment_masks(backend: str, image_host: tuple[str, list[dict[str, str]]]) -> None:
    """Two tasks in one call (a data URL and a URL on the Label Studio host), one prediction each, in order."""
    pngs = [shapes_png(2), shapes_png(3)]
    tasks = [{"id": 1, "data": {"image": data_url(pngs[0])}},
             {"id": 2, "data": {"image": f"{image_host[0]}/data/upload/1/shapes-3.png"}}]
    response = predict(backend, BRUSH_CONFIG, tasks)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    for prediction, png in zip(results, pngs, strict=True):
        expected = segment(backend, png)
        assert expected["detections"]
        check_brush(prediction, expected)
        assert prediction["model_version"] == response.json()["model_version"]
    assert image_host[1][-1] == {"path": "/data/upload/1/shapes-3.png", "authorization": f"Token {TOKEN}"}
    metrics = metric_values(httpx.get(f"{backend}/metrics").text)
    assert sample(metrics, "mrcnn_requests_total", route="label_studio", status="200") >= 1


def test_polygon_predictions_map_labels_and_leave_the_others_out(backend: str) -> None:
    png = shapes_png(2)
    response = predict(backend, POLYGON_CONFIG, [{"id": 7, "data": {"picture": data_url(png)}}])
    assert response.status_code == 200, response.text
    expected = segment(backend, png, classes=list(POLYGON_LABELS))
    assert {d["label"] for d in segment(backend, png)["detections"]} - set(POLYGON_LABELS)  # some are left out
    check_polygons(response.json()["results"][0], expected)


def test_rectangles_when_the_config_has_only_boxes(backend: str) -> None:
    png = shapes_png(2)
    [prediction] = predict(backend, RECTANGLE_CONFIG, [{"id": 1, "data": {"image": data_url(png)}}]).json()["results"]
    expected = segment(backend, png, classes=["star", "triangle"])
    width, height = expected["image"]["width"], expected["image"]["height"]
    labels = [r["value"]["rectanglelabels"] for r in prediction["result"]]
    assert labels == [[d["label"]] for d in expected["detections"]]
    for region, detection in zip(prediction["result"], expected["detections"], strict=True):
        x1, y1, x2, y2 = detection["box"]
        value = region["value"]
        assert [value["x"] * width / 100, value["y"] * height / 100, (value["x"] + value["width"]) * width / 100,
                (value["y"] + value["height"]) * height / 100] == pytest.approx([x1, y1, x2, y2], abs=0.01)


def test_a_url_elsewhere_is_read_without_the_token(backend: str, image_host: tuple[str, list[dict[str, str]]]) -> None:
    """The token goes to Label Studio only: the same host named differently (localhost) is another site."""
    url = image_host[0].replace("127.0.0.1", "localhost") + "/shapes-2.png"
    response = predict(backend, RECTANGLE_CONFIG, [{"id": 1, "data": {"image": url}}])
    assert response.status_code == 200, response.text
    assert image_host[1][-1] == {"path": "/shapes-2.png", "authorization": ""}


@pytest.mark.parametrize(
    ("task_data", "status", "code"),
    [
        ({"image": "/data/upload/1/missing.png"}, 400, "image_unreadable"),  # the Label Studio host answers 404
        ({"image": "s3://bucket/key.png"}, 400, "unsupported_image_url"),
        ({"other": "x"}, 400, "missing_image"),
        ({"image": "data:image/png;base64,!!!"}, 400, "bad_base64"),
        ({"image": "/data/upload/1/big.png"}, 413, "payload_too_large"),
        ({"image": data_url(b"not an image")}, 400, "undecodable_image"),
    ],
)
def test_a_task_that_cannot_be_read_fails_the_call_saying_which(
    backend: str, task_data: dict[str, str], status: int, code: str
) -> None:
    tasks = [{"id": 1, "data": {"image": data_url(shapes_png(2))}}, {"id": 42, "data": task_data}]
    response = predict(backend, BRUSH_CONFIG, tasks)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"].startswith("task 42: ")
    assert httpx.get(f"{backend}/label-studio/health").status_code == 200


def test_a_body_that_is_not_a_predict_request_is_refused(backend: str) -> None:
    for body in (b"{", b'{"tasks": []}', b'{"tasks": [{"id": 1}], "label_config": "<View/>"}'):
        response = httpx.post(f"{backend}/label-studio/predict", content=body,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "bad_json"
    huge = data_url(b"x" * DEMO_MAX_UPLOAD)  # the tasks' data URLs count in the body's limit
    response = predict(backend, BRUSH_CONFIG, [{"id": 1, "data": {"image": huge}}])
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


# -- behind API keys: Label Studio sends HTTP Basic auth, the key as the password ------------------------------------
@pytest.fixture(scope="module")
def keyed_backend() -> Iterator[str]:
    """Our server with the demo model behind one API key; its base URL."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600,
                        api_keys=API_KEY)
    with ServerThread(create_app(settings)) as server:
        yield server.url


def keyed_predict(base: str, **auth: Any) -> httpx.Response:
    tasks = [{"id": 1, "data": {"image": data_url(shapes_png(2))}}]
    return httpx.post(f"{base}/label-studio/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG},
                      timeout=300, **auth)


@pytest.mark.parametrize("user", ["label-studio", "anyone", ""])
def test_the_key_as_basic_auth_password_lets_label_studio_in(keyed_backend: str, user: str) -> None:
    """As Label Studio sends its connection's basic auth (requests' HTTPBasicAuth): any user name, the key as the
    password, on every call it makes."""
    response = keyed_predict(keyed_backend, auth=(user, API_KEY))
    assert response.status_code == 200, response.text
    headers = {"Authorization": f"Bearer {API_KEY}"}
    expected = segment_with(keyed_backend, shapes_png(2), headers)
    check_brush(response.json()["results"][0], expected)
    for method, path, body in (("GET", "health", None), ("GET", "versions", None),
                               ("POST", "setup", {"project": "1.1", "schema": BRUSH_CONFIG}),
                               ("POST", "webhook", {"action": "ANNOTATION_CREATED"})):
        answer = httpx.request(method, f"{keyed_backend}/label-studio/{path}", json=body, auth=(user, API_KEY))
        assert answer.status_code == 200, (path, answer.text)


@pytest.mark.parametrize(("auth", "code"), [
    ({}, "missing_api_key"),
    ({"auth": ("label-studio", "not-the-key")}, "invalid_api_key"),
    ({"auth": (API_KEY, "")}, "invalid_api_key"),  # the key goes in the password, not the user name
    ({"headers": {"Authorization": "Basic !!!not-base64"}}, "invalid_api_key"),
])
def test_without_the_key_label_studio_gets_401_offering_basic_auth(keyed_backend: str, auth: dict[str, Any],
                                                                   code: str) -> None:
    for response in (keyed_predict(keyed_backend, **auth),
                     httpx.get(f"{keyed_backend}/label-studio/health", **auth)):  # Label Studio's check sends it too
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == code
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="maskrcnn-service"') and 'Basic realm="maskrcnn-service"' in challenge
    metrics = httpx.get(f"{keyed_backend}/metrics", headers={"X-API-Key": API_KEY}).text
    assert sample(metric_values(metrics), "mrcnn_requests_total", route="label_studio", status="401") == 0


def test_one_key_rule_on_every_route_basic_offered_on_label_studio_alone(keyed_backend: str) -> None:
    """The key is read the same way everywhere (Basic, Bearer, X-API-Key); only /label-studio's 401 offers Basic,
    so that the page's calls never make a browser pop up its login dialog. The probes need no key, whatever the
    Authorization header."""
    png = shapes_png(2)
    for auth in ({"auth": ("x", API_KEY)}, {"headers": {"Authorization": f"Bearer {API_KEY}"}},
                 {"headers": {"X-API-Key": API_KEY}}):
        assert httpx.post(f"{keyed_backend}/segment", files={"image": ("x.png", png, "image/png")}, timeout=300,
                          **auth).status_code == 200
        assert keyed_predict(keyed_backend, **auth).status_code == 200
    refused = httpx.post(f"{keyed_backend}/segment", files={"image": ("x.png", png, "image/png")},
                         auth=("x", "not-the-key"))
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer realm="maskrcnn-service"'
    for path in ("/healthz", "/readyz", "/v2/health/ready"):
        for headers in ({}, {"Authorization": "Basic !!!not-base64"}, {"Authorization": "Basic eDp3cm9uZw=="}):
            assert httpx.get(keyed_backend + path, headers=headers).status_code == 200, (path, headers)


# -- Label Studio itself -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Label Studio from its own virtual environment (scripts/install_label_studio.sh), on a loopback port with
    SQLite in a temporary folder, its admin user and legacy API token made from the environment; its URL."""
    binary = LABEL_STUDIO_VENV / "bin" / "label-studio"
    if not binary.exists():
        pytest.skip(f"Label Studio is not installed at {binary}: run scripts/install_label_studio.sh "
                    "(or set LABEL_STUDIO_VENV)")
    data_dir, port = tmp_path_factory.mktemp("label-studio"), free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_USERNAME": LABEL_STUDIO_USER,
           "LABEL_STUDIO_PASSWORD": LABEL_STUDIO_PASSWORD, "LABEL_STUDIO_USER_TOKEN": TOKEN,
           # Our backend is on loopback, which Label Studio refuses by default for the backend and its webhook.
           "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
           "LATEST_VERSION_CHECK": "false", "DJANGO_DB": "sqlite"}
    log = (data_dir / "label-studio.log").open("wb")
    process = subprocess.Popen([str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                str(port), "--enable-legacy-api-token"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # the first start migrates a fresh database: minutes on a busy machine
        while True:
            assert process.poll() is None, (data_dir / "label-studio.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Label Studio did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def studio_backend(label_studio: str) -> Iterator[str]:
    """Our server with the demo model, told where Label Studio is and its token (to read uploaded task images)."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600,
                        label_studio_url=label_studio, label_studio_token=TOKEN)
    with ServerThread(create_app(settings)) as server:
        yield server.url


def project_with_tasks(label_studio: str, config: str, pngs: list[bytes]) -> Any:  # -> the SDK's Project
    """A Label Studio project for ``config`` made through label-studio-sdk, ``pngs`` uploaded as its tasks."""
    from label_studio_sdk import LabelStudio

    project = LabelStudio(base_url=label_studio, api_key=TOKEN).projects.create(title="pre-annotation",
                                                                              label_config=config)
    files = [(f"file{i}", (f"shapes-{i}.png", png, "image/png")) for i, png in enumerate(pngs)]  # a name each
    uploaded = httpx.post(f"{label_studio}/api/projects/{project.id}/import", files=files,
                          headers={"Authorization": f"Token {TOKEN}"}, timeout=120)  # the SDK imports JSON only
    assert uploaded.status_code == 201, uploaded.text
    return project


def project_with_predictions(label_studio: str, backend: str, config: str, pngs: list[bytes],
                             **connection: Any) -> dict[str, Any]:
    """A project with ``pngs`` as its tasks (``project_with_tasks``), our server connected as its model (with the
    SDK's ``ml.create`` ``connection`` settings: its auth) and Label Studio asked for predictions; each task (id,
    data, predictions)."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio, api_key=TOKEN)
    project = project_with_tasks(label_studio, config, pngs)
    backend_model = ls.ml.create(project=project.id, url=f"{backend}/label-studio", title="Mask R-CNN", **connection)
    assert backend_model.state == "CO", backend_model  # connected: health and setup answered
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    tasks = sorted(ls.tasks.list(project=project.id, fields="all"), key=lambda t: t.id)
    return {task.id: {"data": task.data, "predictions": ls.predictions.list(task=task.id)} for task in tasks}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["brush", "polygon"])
def test_label_studio_gets_our_masks_as_predictions(label_studio: str, studio_backend: str, kind: str) -> None:
    """Label Studio 1.23 itself: a project, uploaded images, our server as its ML backend, predictions retrieved
    through Label Studio; each task's stored prediction decoded and compared with /segment on the same file."""
    pngs = [shapes_png(2), shapes_png(5), shapes_png(11)]  # each with circles and squares, and other shapes
    config = BRUSH_CONFIG if kind == "brush" else POLYGON_CONFIG
    tasks = project_with_predictions(label_studio, studio_backend, config, pngs)
    assert len(tasks) == len(pngs)
    for (task_id, task), png in zip(tasks.items(), pngs, strict=True):
        [prediction] = task["predictions"]
        stored = {"result": prediction.result, "score": prediction.score}
        if kind == "brush":
            expected = segment(studio_backend, png)
            worst = check_brush(stored, expected)
        else:
            expected = segment(studio_backend, png, classes=list(POLYGON_LABELS))
            worst = check_polygons(stored, expected)
        version = httpx.get(f"{studio_backend}/label-studio/health").json()["model_version"]
        assert prediction.model_version == version
        print(f"{kind}: task {task_id} ({next(iter(task['data'].values()))}): {len(prediction.result)} regions "
              f"{sorted({r['value'][kind + 'labels'][0] for r in prediction.result})}, score {prediction.score:.3f}, "
              f"model {prediction.model_version}, smallest IoU with /segment {worst:.4f}")


@pytest.mark.slow
def test_label_studio_connects_to_a_keyed_server_with_basic_auth(label_studio: str) -> None:
    """Our server behind an API key: Label Studio's connection with Basic auth (any user, the key as the password)
    connects and gets the predictions; without auth, or with a wrong password, Label Studio refuses to connect,
    saying the authentication is missing or wrong (its health check got our 401)."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600,
                        label_studio_url=label_studio, label_studio_token=TOKEN, api_keys=API_KEY)
    ls = LabelStudio(base_url=label_studio, api_key=TOKEN)
    png = shapes_png(2)
    with ServerThread(create_app(settings)) as server:
        project = project_with_tasks(label_studio, BRUSH_CONFIG, [png])
        for connection in ({}, {"auth_method": "BASIC_AUTH", "basic_auth_user": "label-studio",
                                "basic_auth_pass": "not-the-key"}):
            with pytest.raises(ApiError) as refused:
                ls.ml.create(project=project.id, url=f"{server.url}/label-studio", title="Mask R-CNN", **connection)
            assert refused.value.status_code == 400 and "authentication" in str(refused.value.body), refused.value
        tasks = project_with_predictions(label_studio, server.url, BRUSH_CONFIG, [png], auth_method="BASIC_AUTH",
                                         basic_auth_user="label-studio", basic_auth_pass=API_KEY)
        [(task_id, task)] = tasks.items()
        [prediction] = task["predictions"]
        worst = check_brush({"result": prediction.result, "score": prediction.score},
                            segment_with(server.url, png, {"Authorization": f"Bearer {API_KEY}"}))
        print(f"keyed server, basic auth: task {task_id}: {len(prediction.result)} regions, "
              f"smallest IoU with /segment {worst:.4f}")


@pytest.mark.slow
def test_a_personal_access_token_reads_label_studios_files(label_studio: str) -> None:
    """With a personal access token (a JWT refresh token) instead of a legacy one, the server exchanges it for an
    access token and reads the task's uploaded image with it."""
    from label_studio_sdk import LabelStudio

    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    personal = LabelStudio(base_url=label_studio, api_key=TOKEN).tokens.create().token
    assert personal and personal.count(".") == 2
    png = shapes_png(2)
    project = project_with_tasks(label_studio, BRUSH_CONFIG, [png])
    [task] = LabelStudio(base_url=label_studio, api_key=TOKEN).tasks.list(project=project.id, fields="all")
    assert task.data["image"].startswith("/data/upload/")
    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600,
                        label_studio_url=label_studio, label_studio_token=personal)
    with ServerThread(create_app(settings)) as server:
        response = predict(server.url, BRUSH_CONFIG, [{"id": task.id, "data": task.data}])
        assert response.status_code == 200, response.text
        check_brush(response.json()["results"][0], segment(server.url, png))


@pytest.mark.slow
@pytest.mark.browser
def test_the_prediction_in_label_studios_labeling_page(label_studio: str, studio_backend: str,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """Label Studio's own labeling page in headless Chromium (tests/test_page.py's) shows our prediction: its tab
    with the model version and the prediction's score; the screenshot goes to $MRCNN_LABEL_STUDIO_SCREENSHOT
    (docs/images/label_studio.png is one)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_page import WAIT_S, chromium

    tasks = project_with_predictions(label_studio, studio_backend, BRUSH_CONFIG, [shapes_png(2)])
    [(task_id, task)] = tasks.items()
    [prediction] = task["predictions"]
    with chromium(window_size="1400,900") as browser:
        browser.get(f"{label_studio}/user/login/")
        browser.find_element(By.NAME, "email").send_keys(LABEL_STUDIO_USER)
        browser.find_element(By.NAME, "password").send_keys(LABEL_STUDIO_PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(browser, WAIT_S).until(lambda b: "/user/login" not in b.current_url)
        browser.get(f"{label_studio}/projects/{prediction.project}/data?task={task_id}")
        tab = WebDriverWait(browser, WAIT_S).until(
            lambda b: b.find_element(By.XPATH, f"//*[text()='{prediction.model_version}']"))
        tab.click()  # the prediction itself, not the draft Label Studio prefilled from it
        assert f"{100 * prediction.score:.2f}%" in browser.find_element(By.TAG_NAME, "body").text
        ActionChains(browser).move_to_element(browser.find_element(By.XPATH, "//*[text()='Regions']")).perform()
        WebDriverWait(browser, WAIT_S).until(
            lambda b: len(b.find_elements(By.XPATH, "//*[text()='Prediction Score']")) == 0)  # its tooltip gone
        shot = Path(os.environ.get("MRCNN_LABEL_STUDIO_SCREENSHOT") or tmp_path_factory.mktemp("ls") / "ls.png")
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
