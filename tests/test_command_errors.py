"""Every command line but training's, given what a user gets wrong, run as the user runs it: one ``error:``
line naming the option and path, no traceback, exit status 2 for a bad command line and 1 for a run that
could not be done (commandline.py). The client's are here too; its overlays are tests/test_client.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.data.shapes import write_coco
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """What the commands are given: a good COCO folder, and every kind of wrong one."""
    root = tmp_path_factory.mktemp("inputs")
    good = write_coco(root / "good", num=2, seed=3).parent
    no_images = root / "no_images"
    no_images.mkdir()
    (no_images / "instances.json").write_text((good / "instances.json").read_text())
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "instances.json").write_text("{not json")
    other_classes = root / "other_classes"
    other_classes.mkdir()
    data = json.loads((good / "instances.json").read_text())
    data["categories"] = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    data["annotations"] = []
    (other_classes / "instances.json").write_text(json.dumps(data))
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    (root / "garbage.pt").write_bytes(b"\x80\x02 not a checkpoint")
    (root / "garbage.onnx").write_bytes(b"not a model")
    (root / "three_names.txt").write_text("__background__\ncircle\nsquare\n")
    return {
        "good": good, "no_images": no_images, "bad_json": bad_json, "other_classes": other_classes,
        "empty": root / "empty", "a_file": root / "a_file", "missing": root / "missing",
        "garbage_pt": root / "garbage.pt", "garbage_onnx": root / "garbage.onnx",
        "three_names": root / "three_names.txt", "image": good / "images" / "000001.png",
    }


# (name, argv with {placeholders}, exit status, what the line must say besides the path)
CASES = [
    ("evaluation, empty --data", "evaluation --checkpoint {ckpt} --data {empty}", 2,
     ["--data", "{empty}", "expected a COCO folder", "instances JSON"]),
    ("evaluation, missing --data", "evaluation --checkpoint {ckpt} --data {missing}", 2,
     ["--data", "{missing}", "no such folder"]),
    ("evaluation, --data a file", "evaluation --checkpoint {ckpt} --data {a_file}", 2,
     ["--data", "{a_file}", "expected a folder"]),
    ("evaluation, invalid JSON", "evaluation --checkpoint {ckpt} --data {bad_json}", 2,
     ["--data", "{bad_json}/instances.json", "not valid JSON"]),
    ("evaluation, missing --checkpoint", "evaluation --checkpoint {missing}.pt --data {good}", 2,
     ["--checkpoint", "{missing}.pt", "no such file"]),
    ("evaluation, not a checkpoint", "evaluation --checkpoint {garbage_pt} --data {good}", 2,
     ["--checkpoint", "{garbage_pt}", "not a readable PyTorch checkpoint"]),
    ("evaluation, not an ONNX file", "evaluation --checkpoint {garbage_onnx} --data {good}", 2,
     ["--checkpoint", "{garbage_onnx}", "not a loadable ONNX model"]),
    ("evaluation, other classes", "evaluation --checkpoint {ckpt} --data {other_classes}", 2,
     ["--checkpoint", "{ckpt}", "match neither", "cat"]),
    ("evaluation, --batch-size 0", "evaluation --checkpoint {ckpt} --data {good} --batch-size 0", 2,
     ["--batch-size", "0", "expected a whole number >= 1"]),
    ("evaluation, --out a folder", "evaluation --checkpoint {ckpt} --data {good} --out {empty}", 2,
     ["--out", "{empty}", "a folder, expected a file"]),
    ("evaluation, images missing", "evaluation --checkpoint {ckpt} --data {no_images}", 1,
     ["{no_images}/000001.png", "cannot read it"]),
    ("shapes, --out a file", "model.data.shapes --out {a_file} --num 2", 2,
     ["--out", "{a_file}", "expected a folder"]),
    ("shapes, --num 0", "model.data.shapes --out {missing} --num 0", 2, ["--num", "expected a whole number >= 1"]),
    ("export, missing --checkpoint", "export --checkpoint {missing}.pt --out {missing}.onnx", 2,
     ["--checkpoint", "{missing}.pt", "no such file"]),
    ("export, not a checkpoint", "export --checkpoint {garbage_pt} --out {missing}.onnx", 2,
     ["--checkpoint", "{garbage_pt}", "not a readable PyTorch checkpoint"]),
    ("export, unknown weights", "export --weights Nonsense_Weights.COCO_V1 --out {missing}.onnx", 2,
     ["--weights", "Nonsense_Weights.COCO_V1", "not a torchvision weights name"]),
    ("export, missing --class-names", "export --checkpoint {ckpt} --class-names {missing}.txt --out {missing}.onnx", 2,
     ["--class-names", "{missing}.txt", "no such file"]),
    ("export, too few class names", "export --checkpoint {ckpt} --class-names {three_names} --out {missing}.onnx", 2,
     ["--class-names", "{three_names}", "3 names for a model of 5 classes"]),
    ("export, --out a folder", "export --checkpoint {ckpt} --out {empty}", 2,
     ["--out", "{empty}", "a folder, expected a file"]),
    ("quantize, missing --model", "export.quantize --model {missing}.onnx --calibration {good} --out {missing}.q", 2,
     ["--model", "{missing}.onnx", "no such file"]),
    ("quantize, missing --calibration",
     "export.quantize --model {garbage_onnx} --calibration {missing} --out {missing}.q", 2,
     ["--calibration", "{missing}", "no such folder"]),
    ("quantize, not an ONNX file", "export.quantize --model {garbage_onnx} --calibration {good} --out {missing}.q", 1,
     ["{garbage_onnx}", "not an ONNX model"]),
    ("client, --out a file", "service.client {image} --url {down} --out {a_file}", 2,
     ["--out", "{a_file}", "expected a folder"]),
    ("client, missing image", "service.client {missing}.jpg --url {down} --out {missing}", 1,
     ["{missing}.jpg", "cannot read it"]),
    ("client, server down", "service.client {image} --url {down} --out {missing}", 1,
     ["{image}", "cannot reach the server at {down}"]),
]


DOWN = f"http://127.0.0.1:{free_port()}"  # nothing listens there


def command(template: str, files: dict[str, Path], tiny_checkpoint: Path) -> tuple[list[str], dict[str, str]]:
    """``python -m`` and the template's words with the paths filled in; the paths by name."""
    values = {**{k: str(v) for k, v in files.items()}, "ckpt": str(tiny_checkpoint), "down": DOWN}
    return [sys.executable, "-m", *(word.format(**values) for word in template.split())], values


def run(argv: list[str], **env: str) -> tuple[int, str]:
    """Exit status and stderr, its \r kept: a progress bar redrawn in place is one line, as a terminal shows it."""
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, **env})
    return done.returncode, done.stderr.decode()


# One case per command in the fast tier; the rest, each a few seconds of starting PyTorch, in the slow one.
FAST_CASES = {"evaluation, empty --data", "shapes, --num 0", "export, missing --checkpoint",
              "quantize, missing --model", "client, server down"}


@pytest.mark.parametrize(("template", "status", "says"), [
    pytest.param(*c[1:], id=c[0], marks=() if c[0] in FAST_CASES else pytest.mark.slow) for c in CASES
])
def test_one_line_names_what_is_wrong(template, status, says, files, tiny_checkpoint) -> None:
    argv, values = command(template, files, tiny_checkpoint)
    status_seen, stderr = run(argv, MRCNN_DEBUG="")
    lines = stderr.rstrip("\n").split("\n")
    assert status_seen == status, stderr
    assert "Traceback" not in stderr and len(lines) <= 3, stderr
    assert lines[-1].startswith("error: ")
    for fragment in says:
        assert fragment.format(**values) in lines[-1]
    assert not Path(values["missing"]).exists(), "nothing is written"


def test_mrcnn_debug_shows_the_traceback(files, tiny_checkpoint) -> None:
    argv, _ = command("evaluation --checkpoint {ckpt} --data {empty}", files, tiny_checkpoint)
    status, stderr = run(argv, MRCNN_DEBUG="1")
    assert status == 1 and "Traceback" in stderr and "UsageError" in stderr
