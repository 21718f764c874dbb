"""Two hand-written parts of the service against the library that could do their job, on the benchmarks' inputs,
on one core:

- COCO RLE strings (service.core.postprocess.rle_strings: all detections' counts compressed at once in
  numpy) against pycocotools (``frPyObjects`` on the detections' uncompressed counts: its C
  ``rleToString``), on postprocess_speed's 100 detections of an 800x1333 image;
- multipart/form-data assembly (service.segment.multipart.parse_multipart: python-multipart's
  MultipartParser with our callbacks, the body in memory) against python-multipart's own FormParser (its
  Field and File objects, files kept in memory up to the upload limit), on serve_load's 480x640 JPEGs and
  on a body at the upload limit.

Run: ``python -m benchmarks.libraries_vs_ours`` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from pycocotools import mask as mask_utils
from python_multipart.multipart import Field, File, FormParser

from benchmarks import machine, table, write_section
from benchmarks.postprocess_speed import HEIGHT, WIDTH, detections
from benchmarks.serve_load import images, jpeg
from service.core.postprocess import paste_local, rle_counts, rle_runs, rle_strings
from service.core.settings import Settings
from service.segment.multipart import parse_multipart

BOUNDARY = "benchmarkboundary7d1f"


def timed_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1e3


def pycocotools_strings(counts: np.ndarray, lens: np.ndarray, size: tuple[int, int]) -> list[str]:
    """The same strings by pycocotools: every detection's counts as an uncompressed RLE, all compressed by one
    ``frPyObjects`` call (its C ``rleToString``); the counts go in as Python lists, as it takes them."""
    height, width = size
    parts = np.split(counts, np.cumsum(lens)[:-1])
    uncompressed = [{"size": [height, width], "counts": part.tolist()} for part in parts]
    return [rle["counts"].decode("ascii") for rle in mask_utils.frPyObjects(uncompressed, height, width)]


def multipart_body(image: bytes) -> tuple[bytes, str]:
    """/segment's multipart form: the image file and two option fields, as curl -F sends them."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="score_threshold"\r\n\r\n0.6\r\n'.encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="formats"\r\n\r\nrle\r\n'.encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n",
        f"--{BOUNDARY}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={BOUNDARY}"


def form_parser(body: bytes, content_type: str, limit: int) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """python-multipart's FormParser over the body: text fields and the first file of each name, in memory."""
    fields: dict[str, list[str]] = {}
    files: dict[str, bytes] = {}

    def on_field(field: Field) -> None:
        fields.setdefault((field.field_name or b"").decode(), []).append((field.value or b"").decode())

    def on_file(file: File) -> None:
        name = (file.field_name or b"").decode()
        if name not in files:
            file.file_object.seek(0)
            files[name] = file.file_object.read()

    boundary = content_type.split("boundary=")[1].encode()
    parser = FormParser("multipart/form-data", on_field, on_file, boundary=boundary,
                        config={"MAX_MEMORY_FILE_SIZE": limit})
    parser.write(body)
    parser.finalize()
    return fields, files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args(argv)
    where = machine()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for both sides

    masks, boxes = detections()
    local = paste_local(masks, boxes, (HEIGHT, WIDTH))
    det, start, end = rle_runs(local)
    counts, lens = rle_counts(det, start, end, len(local), HEIGHT * WIDTH)
    ours_rle = rle_strings(counts, lens)
    assert ours_rle == pycocotools_strings(counts, lens, (HEIGHT, WIDTH))
    rows = [[
        "RLE strings, 100 detections of 800x1333 (ms)",
        f"{timed_ms(lambda: rle_strings(counts, lens), args.repeats):.3f}",
        f"{timed_ms(lambda: pycocotools_strings(counts, lens, (HEIGHT, WIDTH)), args.repeats):.3f}",
        "pycocotools frPyObjects (one call, counts as lists)",
    ]]

    limit = Settings().max_upload_bytes
    photo = jpeg(images(1, (480, 640))[0])
    large = photo * (limit // len(photo) - 1)  # not an image, only bytes: the parsers do not look inside
    for name, payload in (("480x640 JPEG", photo), (f"{len(large) / 2**20:.1f} MiB file", large)):
        body, content_type = multipart_body(payload)
        form = parse_multipart(body, content_type)
        assert (form.fields, form.files["image"].data) == (lambda f: (f[0], f[1]["image"]))(
            form_parser(body, content_type, limit))
        rows.append([
            f"multipart form, {name} + 2 fields ({len(body) / 1024:.0f} KiB) (ms)",
            f"{timed_ms(lambda: parse_multipart(body, content_type), args.repeats):.3f}",  # noqa: B023
            f"{timed_ms(lambda: form_parser(body, content_type, limit), args.repeats):.3f}",  # noqa: B023
            "python-multipart FormParser, files in memory",
        ])
    lines = [
        "## Hand-written parts vs libraries: RLE strings, multipart assembly",
        "",
        f"Command: `python -m benchmarks.libraries_vs_ours` (median of {args.repeats} runs, one CPU via "
        f"sched_setaffinity; outputs checked equal first). {where}.",
        "",
        table(["input", "ours", "library", "library used"], rows),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("libraries_vs_ours", "\n".join(lines))


if __name__ == "__main__":
    main()
