"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process).

Names are shared with docker/grafana/dashboards/mrcnn.json and tests/test_deploy.py. The request-level
families carry a ``route`` label, the front door that answered: ``segment`` (POST /segment), ``v2`` (the
Open Inference Protocol's REST infer), ``grpc`` (its gRPC ModelInfer) or ``label_studio`` (its ML backend's
predict), and a ``status``: the HTTP status, or for gRPC the status code's name (``OK``, ``INVALID_ARGUMENT``...);
the batch-level ones are shared, since every door feeds the same batches.
"""

from __future__ import annotations

import typing
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TILE_BUCKETS = (1, 2, 4, 6, 9, 12, 16, 24, 32, 48, 64, 96, 128)
Route = Literal["segment", "v2", "grpc", "label_studio"]
ROUTES: tuple[Route, ...] = typing.get_args(Route)


class Metrics:
    """The service's metric families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "mrcnn_request_duration_seconds", "Inference request time in the server, by route and status.",
            ["route", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter("mrcnn_requests", "Inference requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.queue_wait = Histogram("mrcnn_queue_wait_seconds", "Time a request waited for its batch to run.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("mrcnn_inference_duration_seconds", "ONNX Runtime time of one batch.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.postprocess = Histogram("mrcnn_postprocess_duration_seconds",
                                     "Mask pasting and encoding time of one request.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mrcnn_batch_size", "Images per ONNX Runtime call.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("mrcnn_queue_depth", "Requests queued for inference, not yet running.",
                                 registry=r)
        self.in_progress = Gauge("mrcnn_requests_in_progress", "Inference requests holding a slot, by route.",
                                 ["route"], registry=r)
        for route in ROUTES:
            self.in_progress.labels(route)
        self.tiles = Histogram("mrcnn_tiles_per_request", "Images one request sent to the model: its tiles "
                               "(and the whole image when asked), 1 when run whole.", buckets=TILE_BUCKETS,
                               registry=r)
        self.detections = Counter("mrcnn_detections", "Detections returned.", registry=r)
        self.model = Info("mrcnn_model", "The model being served.", registry=r)

    def observe_request(self, route: Route, status: int | str, seconds: float) -> None:
        labels = (route, str(status))
        self.request_duration.labels(*labels).observe(seconds)
        self.requests.labels(*labels).inc()
