"""Service settings from the environment (prefix ``MRCNN_``), e.g. ``MRCNN_MAX_BATCH_SIZE=8``.

One pydantic model so every knob is typed, validated at start and listed in one place; the Docker
image and compose file set the same variables (``MRCNN_MODEL_PATH``, ``MRCNN_PROVIDERS``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogFormat = Literal["text", "json"]
DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "demo" / "model.onnx"


class Settings(BaseSettings):
    """Everything the server can be told; see the README for the variable names."""

    model_config = SettingsConfigDict(env_prefix="MRCNN_", extra="ignore", protected_namespaces=())

    model_path: Path = Field(DEFAULT_MODEL_PATH, description="The exported ONNX file to serve.")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference, comma-separated in the env.",
    )
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads (0: ORT's default).")
    inter_op_threads: int = Field(1, ge=0, description="ORT inter-op threads (0: ORT's default).")
    ort_spinning: bool = Field(
        False, description="Let ORT threads spin between calls (lowest latency alone, steals CPU from workers)."
    )
    max_batch_size: int = Field(8, ge=1, description="Most images in one ORT call.")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="Longest a request waits for company.")
    queue_capacity: int = Field(64, ge=1, description="Requests admitted at once; beyond, 503.")
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline; past it, 504.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest body accepted (413).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest width x height accepted (413).")
    max_tiles: int = Field(
        48, ge=1, description="Most tiles one request may be cut into (422 beyond; tiles=auto grows its tiles "
        "instead); each tile holds one place of the queue capacity, which also caps them."
    )
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Default detection score threshold.")
    worker_threads: int = Field(2, ge=1, description="Threads for decoding and post-processing.")
    warmup: bool = Field(True, description="Run one inference before reporting ready.")
    drain_timeout_s: float = Field(30.0, ge=0, description="How long SIGTERM waits for in-flight work.")
    drain_grace_s: float = Field(
        0.0, ge=0, description="After SIGTERM, keep serving this long with /readyz at 503 before closing."
    )
    # Label Studio ML backend (service/label_studio): where its /data/... task images are read, with this token.
    label_studio_url: str | None = Field(None, description="Label Studio's base URL, e.g. http://localhost:8080.")
    label_studio_token: SecretStr | None = Field(None, description="A Label Studio access token (legacy or personal).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="Port of the Open Inference Protocol over gRPC, on ``host`` (0: not served)."
    )
    # The production front door (docs/front_door.md).
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="API keys, comma-separated in the env; with none here or in the "
        "file, every route is open."
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API keys, one a line (plain, or sha256:<hex> of the key); # comments."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics on this port alone (no key), not on the API port."
    )
    ssl_certfile: Path | None = Field(None, description="TLS certificate chain (PEM): serve HTTPS.")
    ssl_keyfile: Path | None = Field(None, description="The certificate's private key (PEM).")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser, comma-separated."
    )
    log_format: LogFormat = Field("text", description="text, or one JSON object a line.")

    @field_validator("providers", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Accept ``CUDAExecutionProvider,CPUExecutionProvider`` as the Dockerfile writes it."""
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        """A certificate without its key (or the reverse) is a mistake, not plain HTTP."""
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both or neither")
        return self
