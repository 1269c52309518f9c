"""The model API: the registry's champion behind FastAPI (``mnist-flow serve``).

    POST /predict   one or more PNG/JPEG images (multipart field ``files``) -> class, name, probability
    GET  /model     the model served: name, version, aliases, dataset, metrics and lineage summary
    GET  /health    ``ok`` (or ``degraded`` while a newer champion cannot be loaded)

The model is loaded through :meth:`Registry.load`, so the weights and the sidecar are verified
exactly as for ``mnist-flow predict``, and images are prepared by the same
:class:`~mnist_flow.review.predict.Preprocessing`. The alias is looked up again at most every
``refresh_seconds`` (one small query), and a promoted champion is loaded on the next request
without a restart; if the new one fails verification, the last good model keeps serving and
``/health`` says why. Requests are bounded before they are parsed: the body size (``Content-Length``
and the bytes actually received), the content type, the number of images, each image's bytes and
pixels (decompression bombs). Every refusal is a 4xx with one message: ``{"detail": "..."}``.

This module is a plain library: no Prefect import.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnist_flow.errors import ConfigError, MnistFlowError
from mnist_flow.review.predict import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageTooLargeError,
    LoadedModel,
    NotAnImageError,
    Preprocessing,
    classify,
    load_image,
)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_MAX_FILES = 64
DEFAULT_REFRESH_SECONDS = 2.0

log = logging.getLogger("mnist_flow.review.serve")


# --- the response bodies (the OpenAPI schema) -----------------------------------------------------------


class ErrorBody(BaseModel):
    """Every refusal: one message naming the cause and the fix."""

    detail: str


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    filename: str = Field(description="The uploaded file's name.")
    label: int = Field(alias="class", ge=0, description="Class index.")
    name: str = Field(description="Class name, e.g. '7 - seven' or 'Sneaker'.")
    probability: float = Field(ge=0.0, le=1.0)


class ModelRef(BaseModel):
    name: str
    version: int


class Predictions(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class Lineage(BaseModel):
    study_name: str | None
    trial_number: int | None
    flow_run_id: str | None
    seed: int | None
    code_version: dict[str, Any]


class ModelInfo(BaseModel):
    name: str
    version: int
    aliases: list[str]
    created_at: str
    dataset: dict[str, str]
    metrics: dict[str, Any]
    params: dict[str, Any]
    lineage: Lineage
    classes: list[str]
    preparation: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    model: ModelRef
    problem: str | None = Field(None, description="Why a newer champion is not served yet (status degraded).")


# --- the model, followed through the registry -------------------------------------------------------------


class Champion:
    """The model behind ``ref`` of ``name``, reloaded when the alias moves (checked every ``refresh_seconds``)."""

    def __init__(
        self, registry: Any, name: str, ref: str | int = "champion", *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS
    ) -> None:
        self.registry, self.name, self.ref, self.refresh_seconds = registry, name, ref, refresh_seconds
        self._lock = threading.Lock()
        self._checked = 0.0
        self.problem: str | None = None
        self.loaded = self._load(registry.get(name, ref))  # the first load raises: nothing to serve yet

    def _load(self, version: Any) -> LoadedModel:
        model, sidecar, loaded = self.registry.load(self.name, version.version)
        return LoadedModel(model, Preprocessing.from_sidecar(sidecar), loaded)

    @staticmethod
    def _identity(version: Any) -> tuple:
        return version.version, version.artifact_sha256, version.sidecar_sha256

    def current(self) -> LoadedModel:
        """The model to use now: the alias is looked up again when ``refresh_seconds`` have passed."""
        if time.monotonic() - self._checked < self.refresh_seconds:
            return self.loaded
        with self._lock:
            if time.monotonic() - self._checked < self.refresh_seconds:
                return self.loaded
            try:
                version = self.registry.get(self.name, self.ref)
                if self._identity(version) != self._identity(self.loaded.version):
                    self.loaded = self._load(version)
                    log.warning("now serving %s v%s", self.name, version.version)
                self.problem = None
            except MnistFlowError as exc:  # keep serving the last good model, and say why
                problem = str(exc).replace("\n", " ")
                if problem != self.problem:
                    log.error("still serving %s v%s: %s", self.name, self.loaded.version.version, problem)
                self.problem = problem
            finally:
                self._checked = time.monotonic()
            return self.loaded


# --- request limits, before anything is parsed ------------------------------------------------------------


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request body is larger than {limit:,} bytes. Send fewer or smaller images, "
            "or start the server with a larger --max-request-bytes.",
        )


class RequestLimits:
    """ASGI middleware: refuse bodies above ``max_bytes`` (declared or streamed) and non-multipart predictions."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _refuse(send, 400, "The Content-Length header is not a number.")
                return
            if int(declared) > self.max_bytes:
                await _refuse(send, 413, _BodyTooLarge(self.max_bytes).detail)
                return
        if scope["method"] == "POST" and scope["path"] == "/predict":
            kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if kind != "multipart/form-data":
                await _refuse(
                    send,
                    415,
                    f"POST /predict takes multipart/form-data, not {kind or 'no content type'}: "
                    "send the images as files in the multipart field 'files'.",
                )
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # chunked, or a Content-Length that lied
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = ErrorBody(detail=detail).model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _status(exc: ImageError) -> int:
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, NotAnImageError):
        return 415
    return 422


def _one_line(exc: MnistFlowError) -> str:
    return f"{exc.message} Fix: {exc.fix}" if exc.fix else exc.message


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request."},
    413: {"model": ErrorBody, "description": "Body, image file, pixels or number of images above the limit."},
    415: {"model": ErrorBody, "description": "Not multipart/form-data, or a file that is not a PNG or JPEG."},
    422: {"model": ErrorBody, "description": "No image sent, or an image with nothing to classify."},
}


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_files: int = DEFAULT_MAX_FILES
    max_pixels: int = DEFAULT_MAX_PIXELS


def create_app(champion: Champion, limits: Limits = Limits()) -> ASGIApp:
    """The ASGI app serving ``champion`` (wrapped in the request limits)."""
    api = FastAPI(
        title="mnist-flow model API",
        version="1",
        description="Classify 28x28-style images with the registry's champion (mnist-flow serve).",
    )

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        missing = [e for e in exc.errors() if e.get("type") in ("missing", "too_short")]
        detail = (
            "No image in the request: send one or more PNG or JPEG files in the multipart field 'files'."
            if missing
            else "Invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors()[:3])
        )
        return JSONResponse({"detail": detail}, status_code=422)

    @api.get("/health", response_model=Health)
    def health() -> Health:
        loaded = champion.current()
        return Health(
            status="degraded" if champion.problem else "ok",
            model=ModelRef(name=loaded.version.name, version=loaded.version.version),
            problem=champion.problem,
        )

    @api.get("/model", response_model=ModelInfo)
    def model() -> ModelInfo:
        loaded = champion.current()
        v = loaded.version
        return ModelInfo(
            name=v.name,
            version=v.version,
            aliases=list(v.aliases),
            created_at=v.created_at.isoformat(),
            dataset={"name": v.dataset_name, "fingerprint": v.dataset_fingerprint},
            metrics=v.metrics,
            params=v.params,
            lineage=Lineage(
                study_name=v.study_name,
                trial_number=v.trial_number,
                flow_run_id=v.flow_run_id,
                seed=v.seed,
                code_version=v.code_version,
            ),
            classes=list(loaded.preprocessing.classes),
            preparation=loaded.preprocessing.preparation,
        )

    @api.post("/predict", response_model=Predictions, responses=ERRORS)
    def predict(
        files: Annotated[list[UploadFile], File(min_length=1, description="One or more PNG or JPEG images.")],
    ) -> Predictions:
        if not files:
            raise HTTPException(
                422, "No image in the request: send one or more PNG or JPEG files in the multipart field 'files'."
            )
        if len(files) > limits.max_files:
            raise HTTPException(
                413,
                f"Too many images in one request ({len(files)}; the limit is "
                f"{limits.max_files}). Send them in several requests.",
            )
        loaded = champion.current()
        names, frames = [], []
        for index, upload in enumerate(files):
            name = upload.filename or f"file {index + 1}"
            try:
                image = load_image(
                    upload.file.read(limits.max_request_bytes + 1),
                    name=name,
                    max_pixels=limits.max_pixels,
                    max_bytes=limits.max_request_bytes,
                )
                frames.append(loaded.preprocessing.image(image, name))
            except ImageError as exc:
                raise HTTPException(_status(exc), _one_line(exc)) from None
            names.append(name)
        rows = classify(np.stack(frames), loaded.model, loaded.preprocessing)
        return Predictions(
            model=ModelRef(name=loaded.version.name, version=loaded.version.version),
            predictions=[Prediction.model_validate({"filename": n, **r}) for n, r in zip(names, rows)],
        )

    return RequestLimits(api, max_bytes=limits.max_request_bytes)


def serve(
    champion: Champion,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    limits: Limits = Limits(),
    log_level: str = "info",
) -> None:
    """Run the API with uvicorn until Ctrl-C (or SIGTERM); a port that cannot be bound is a ConfigError."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"Cannot listen on {host}:{port}: {exc.strerror or exc}.",
            fix="Choose another --port (or stop what uses it), or a --host of this machine.",
        ) from None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    config = uvicorn.Config(
        create_app(champion, limits),
        log_level=log_level,
        limit_concurrency=64,
        timeout_keep_alive=5,
        server_header=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if server.should_exit:  # stopped by Ctrl-C or SIGTERM (uvicorn shut down cleanly first): an interrupt
        raise KeyboardInterrupt
