"""The bulk job (python -m bulk) on this machine: what it lists, COCO results pycocotools loads, each image's
detections equal to the real server's /segment answer (the demo model on loopback), unreadable images
reported without stopping the job, a job killed half-way finished by a rerun with every image exactly once,
and COCOeval of its output equal to python -m evaluation's figures."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from bulk.job import main
from bulk.records import FAILURES, IMAGES, RESULTS, SHARDS, SUMMARY
from bulk.sources import SourceError, list_images
from service.core.settings import DEFAULT_MODEL_PATH
from tests.helpers import scene

ROOT = Path(__file__).resolve().parent.parent
NUM_IMAGES = 60
SCENE_SIZE = (240, 320)
UNREADABLE = {"garbage.jpg": b"not an image at all", "empty.png": b""}  # plus one truncated PNG


def scenes_folder(root: Path, num: int) -> Path:
    """``num`` images under root/images: synthetic scenes (tests/helpers.py) as PNG and JPEG, three of them
    unreadable: garbage bytes, an empty file and a PNG cut in half."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(num - len(UNREADABLE)):
        Image.fromarray(scene(i, SCENE_SIZE).image).save(images / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    for name, data in UNREADABLE.items():
        (images / name).write_bytes(data)
    victim = images / "001.png"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return images


def bulk_command(source: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "bulk", str(source), "--out", str(out), "--quiet", *options]


def run_bulk(source: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(bulk_command(source, out, *options), capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def load(out: Path) -> tuple[COCO, COCO]:
    """The job's images file as a COCO object, and its results through loadRes, as a COCO tool reads them."""
    with contextlib.redirect_stdout(io.StringIO()):
        images = COCO(str(out / IMAGES))
        return images, images.loadRes(str(out / RESULTS))


def shard_paths(out: Path) -> list[str]:
    """The image of every complete line of the shards, repeats included."""
    paths = []
    for shard in (out / SHARDS).rglob("*.jsonl"):
        for line in shard.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                paths.append(json.loads(line)["path"])
    return paths


def by_file(out: Path) -> dict[str, list[dict]]:
    """Each segmented image's results (in the job's order: best first), by file name."""
    images, results = load(out)
    return {img["file_name"]: results.imgToAnns[img["id"]] for img in images.dataset["images"]}


def assert_same_detections(ours: list[dict], theirs: list[dict]) -> None:
    """Two answers for one image agree: classes, scores to 1e-5, identical RLE, boxes to /segment's 0.01."""
    assert [d["category_id"] for d in ours] == [d["class_id"] for d in theirs]
    np.testing.assert_allclose([d["score"] for d in ours], [d["score"] for d in theirs], atol=1e-5)
    assert [d["segmentation"] for d in ours] == [d["mask"] for d in theirs]
    for d, t in zip(ours, theirs, strict=True):
        x, y, w, h = d["bbox"]
        np.testing.assert_allclose([x, y, x + w, y + h], t["box"], atol=0.011)


def assert_same_results(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        as_server = [{"class_id": d["category_id"], "score": d["score"], "mask": d["segmentation"],
                      "box": [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]}
                     for d in b[name]]
        assert_same_detections(a[name], as_server)


def segment_answers(url: str, images: Path) -> dict[str, dict | int]:
    """/segment's answer for each file of ``images`` (its status when not 200), one request at a time."""
    answers: dict[str, dict | int] = {}
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        for path in sorted(images.iterdir()):
            response = client.post("/segment", params={"formats": "rle"},
                                   files={"image": (path.name, path.read_bytes(), "application/octet-stream")})
            answers[path.name] = response.json() if response.status_code == 200 else response.status_code
    return answers


# -- what a source names --------------------------------------------------------------------------------
def test_a_folder_a_glob_a_list_file_and_one_image_name_their_images(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.PNG", "sub/c.webp"):
        (folder / name).write_bytes(b"x")
    (folder / "notes.txt").write_text("not an image")
    assert [i.file_name for i in list_images(str(folder))] == ["a.jpg", "b.PNG", "sub/c.webp"]
    assert [i.file_name for i in list_images(f"{folder}/**/*.webp")] == ["sub/c.webp"]
    assert [i.key for i in list_images(str(folder / "a.jpg"))] == [str(folder / "a.jpg")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\nphotos/a.jpg\n\n{folder / 'sub' / 'c.webp'}\nphotos/missing.jpg\n")
    listed = list_images(str(listing))
    expected = [folder / "a.jpg", folder / "missing.jpg", folder / "sub" / "c.webp"]
    assert [i.key for i in listed] == [str(p) for p in expected]
    with pytest.raises(SourceError, match="no images"):
        list_images(str(tmp_path / "photos" / "sub" / "*.png"))
    with pytest.raises(SourceError, match="no such file"):
        list_images(str(tmp_path / "nowhere"))


def test_a_pyarrow_uri_names_and_reads_the_same_images(tmp_path: Path) -> None:
    """pyarrow's own filesystems (``local://`` here, ``s3://`` or ``gs://`` elsewhere): the same listing and
    the same answers as the plain paths."""
    images = scenes_folder(tmp_path, 5)
    uri = f"local://{images}"
    assert [i.file_name for i in list_images(uri)] == [i.file_name for i in list_images(str(images))]
    assert [i.key for i in list_images(f"{uri}/*.png")] == [f"{uri}/{n}" for n in ("001.png", "empty.png")]
    listing = tmp_path / "uris.txt"
    listing.write_text(f"{uri}/000.jpg\n{uri}/nowhere.jpg\n")
    assert main([f"local://{listing}", "--out", str(tmp_path / "listed"), "--quiet"]) == 0
    failures = json.loads((tmp_path / "listed" / FAILURES).read_text())
    assert [f["path"] for f in failures] == [f"{uri}/nowhere.jpg"]
    assert main([uri, "--out", str(tmp_path / "uri"), "--quiet"]) == 0
    assert main([str(images), "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert_same_results(by_file(tmp_path / "uri"), by_file(tmp_path / "plain"))


def test_options_are_checked_as_segment_checks_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--classes", "circle,unicorn"]) == 2
    assert "--classes: unknown ['unicorn']" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--score-threshold", "1.5"]) == 2
    assert "--score-threshold:" in capsys.readouterr().err
    assert main([str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2


# -- a few images, fast ---------------------------------------------------------------------------------
def test_each_image_equals_segments_answer_and_unreadable_ones_are_listed(
    tmp_path: Path, demo_server, capsys: pytest.CaptureFixture[str]
) -> None:
    images = scenes_folder(tmp_path, 6)
    out = tmp_path / "out"
    assert main([str(images), "--out", str(out), "--batch-size", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    answers = segment_answers(demo_server.url, images)
    ours = by_file(out)
    unreadable = {name for name, answer in answers.items() if answer == 400}
    assert len(unreadable) == 3 and ours.keys() == answers.keys() - unreadable
    for name in ours:
        assert_same_detections(ours[name], answers[name]["detections"])  # type: ignore[index]
    assert sum(len(d) for d in ours.values()) > 0
    failures = json.loads((out / FAILURES).read_text())
    assert sorted(Path(f["path"]).name for f in failures) == sorted(unreadable)
    for failure in failures:
        assert f"failed: {failure['path']}: " in err
    assert "6 images: 3 segmented, 3 failed" in err


# -- 60 images: the whole job, a killed one, COCOeval -----------------------------------------------------
@pytest.fixture(scope="module")
def sixty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scenes_folder(tmp_path_factory.mktemp("bulk60"), NUM_IMAGES)


@pytest.fixture(scope="module")
def complete_run(sixty: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk60_out")
    run_bulk(sixty, out, "--batch-size", "4")
    return out


@pytest.mark.slow
def test_sixty_images_load_with_loadres_and_equal_segments_answers(sixty: Path, complete_run: Path,
                                                                   demo_server) -> None:
    answers = segment_answers(demo_server.url, sixty)
    ours = by_file(complete_run)
    assert len(answers) == NUM_IMAGES and len(ours) == NUM_IMAGES - 3
    for name, answer in answers.items():
        if answer == 400:
            assert name not in ours
        else:
            assert_same_detections(ours[name], answer["detections"])  # type: ignore[index]
    summary = json.loads((complete_run / SUMMARY).read_text())
    assert summary["images"] == NUM_IMAGES and summary["failed"] == 3
    assert summary["detections"] == sum(len(d) for d in ours.values()) > NUM_IMAGES


@pytest.mark.slow
def test_a_job_killed_half_way_is_finished_by_a_rerun_with_every_image_once(
    sixty: Path, complete_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(bulk_command(sixty, out, "--batch-size", "2", "--threads", "1", "--shard-size", "7"),
                           env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(shard_paths(out)) < 10:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    before = shard_paths(out)
    assert 10 <= len(before) < NUM_IMAGES and not (out / RESULTS).exists()

    rerun = run_bulk(sixty, out, "--batch-size", "2", "--threads", "1", "--shard-size", "7")
    assert f"{len(before)} done before, {NUM_IMAGES - len(before)} to segment" in rerun.stderr
    after = shard_paths(out)
    assert sorted(after) == sorted(i.key for i in list_images(str(sixty)))  # every image exactly once
    assert_same_results(by_file(out), by_file(complete_run))


@pytest.mark.slow
def test_cocoeval_of_the_output_equals_python_m_evaluation(tmp_path: Path) -> None:
    """The shapes validation set (the demo model's, 16 images): the bulk job's results, matched to the
    ground truth by file name, score what python -m evaluation's path scores, to the last digit."""
    from evaluation.evaluate import EVAL_SCORE_THRESHOLD, evaluate_checkpoint, evaluate_predictions
    from model.data.shapes import VALIDATION_SEED, write_coco

    data = tmp_path / "val"
    write_coco(data, num=16, seed=VALIDATION_SEED)
    out = tmp_path / "out"
    run_bulk(data / "images", out, "--score-threshold", str(EVAL_SCORE_THRESHOLD))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data / "instances.json"))
    images, _ = load(out)
    gt_id = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
    to_gt = {img["id"]: gt_id[img["file_name"]] for img in images.dataset["images"]}
    results = [{**r, "image_id": to_gt[r["image_id"]]} for r in json.loads((out / RESULTS).read_text())]
    bulk = evaluate_predictions(gt, results)
    reference = evaluate_checkpoint(DEFAULT_MODEL_PATH, data, batch_size=4, progress=False)["metrics"]
    for iou_type, row in reference.items():
        for name, value in row.items():
            assert bulk[iou_type][name] == value or (math.isnan(value) and math.isnan(bulk[iou_type][name]))
    assert reference["segm"]["AP"] > 0.5
