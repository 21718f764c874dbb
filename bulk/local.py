"""The bulk job in this process: batches of images through the server's own ``segment_batch`` (decode ->
resize -> one ONNX Runtime call -> paste -> RLE), a few batches at a time in threads so that one batch's
reading, decoding and encoding overlap another's inference (ORT releases the GIL), records written in the
order batches finish."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from bulk.records import Record, record_of
from bulk.sources import Image, read_bytes
from service.core.options import Resolved
from service.core.runtime import OnnxModel
from service.core.segmentation import Segmentation, segment_batch


def segment_images(model: OnnxModel, images: Sequence[Image], options: Resolved, max_pixels: int) -> list[Record]:
    """The records of a batch of images: read each, segment those read in one call; an image that cannot be
    read or decoded gets its error in its record, and the others their detections."""
    data: dict[int, bytes] = {}
    answers: dict[int, Segmentation | Exception] = {}
    for i, image in enumerate(images):
        try:
            data[i] = read_bytes(image.key)
        except (OSError, ValueError) as exc:  # pyarrow's errors are OSErrors or (ArrowInvalid) ValueErrors
            answers[i] = exc
    answers.update(zip(data, segment_batch(model, list(data.values()), options, max_pixels), strict=True))
    return [record_of(image, answers[i]) for i, image in enumerate(images)]


def batches(images: Sequence[Image], size: int) -> Iterator[Sequence[Image]]:
    return (images[i : i + size] for i in range(0, len(images), size))


def run_local(
    model: OnnxModel,
    images: Sequence[Image],
    options: Resolved,
    max_pixels: int,
    batch_size: int,
    threads: int,
    on_records: Callable[[list[Record]], None],
) -> None:
    """Segment ``images`` ``batch_size`` at a time, ``threads`` batches in flight; ``on_records`` gets each
    batch's records as it finishes (in this thread)."""
    todo = batches(images, batch_size)
    with ThreadPoolExecutor(threads, thread_name_prefix="bulk") as pool:
        running: set[Future[list[Record]]] = set()
        for batch in todo:
            running.add(pool.submit(segment_images, model, batch, options, max_pixels))
            if len(running) >= threads:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_records(future.result())
        for future in running:
            on_records(future.result())
