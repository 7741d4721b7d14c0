"""The ONE table mapping library errors to HTTP status + body shape (docs/contract.md "Error bodies").

Shapes: A ``{error, request_id, recipe_id}``, B ``{detail: str}``, C ``{detail: {error, request_id,
recipe_id}}``. 422 validation errors keep FastAPI's shape D (its default handler). Which shape a
``BDIError`` gets can depend on the endpoint family, so every router marks its requests with an
:data:`ErrorStyle` (see :func:`error_style`) instead of the handler looking at paths:

* ``model``: /fit_ok, /calibrate_ng, /infer; the handler's own errors are shape A.
* ``batch``: /infer_dataset, /calibrate_dataset; not-fitted / calibration / sample-count errors are
  400 B, other bad input is 400 A.
* ``resource``: /health, datasets, /state, /manifest; simple ``HTTPException``-like 400/404 B.

Anything that is not a ``BDIError`` becomes a logged 500 in shape A (JSON, never plain text). A 500's
body never carries the exception text (it may hold server paths): it says
:func:`internal_error_message`, and the details are logged under the same request id.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, RootModel

from bdi.errors import (
    BDIError,
    CalibrationMissingError,
    CrossRecipeDeleteError,
    FitInProgressError,
    InsufficientSamplesError,
    InvalidInputError,
    InvalidRecipeError,
    InvalidScaleError,
    ModelMismatchError,
    NotFittedError,
    NotFoundError,
    RegistryManagedError,
    ScaleMismatchError,
    StorageError,
    WeightsError,
)
from bdi.logging import slog
from bdi.refs import DEFAULT_RECIPE
from serving.auth import AuthRefusedError

ErrorStyle = Literal["model", "batch", "resource"]
Shape = Literal["A", "B", "C"]

REQUEST_ID_HEADER = "X-Request-Id"
DEFAULT_STYLE: ErrorStyle = "resource"


def internal_error_message(request_id: str) -> str:
    """The stable text of every 500 body; the exception itself is only in the log."""
    return f"Internal Server Error (details are in the server log under request_id {request_id})"


@dataclass(frozen=True)
class ErrorRule:
    """Status and body shape of one error class; ``shapes`` overrides ``shape`` per style."""

    status: int
    shape: Shape
    shapes: Mapping[ErrorStyle, Shape] = field(default_factory=dict)
    log_trace: bool = False  # server-side failures: log the traceback

    def shape_for(self, style: ErrorStyle) -> Shape:
        return self.shapes.get(style, self.shape)


# Looked up along the exception's MRO, so the most specific class wins
# (ReservedRecipeError → InvalidRecipeError before InvalidInputError).
ERROR_TABLE: Mapping[type[Exception], ErrorRule] = {
    InvalidRecipeError: ErrorRule(400, "C"),  # also ReservedRecipeError
    ScaleMismatchError: ErrorRule(409, "C"),  # the per-recipe mm_per_px lock
    FitInProgressError: ErrorRule(409, "A", {"resource": "B"}),  # one writer per model
    InvalidScaleError: ErrorRule(400, "B"),  # "mm_per_px must be > 0 and finite"
    NotFittedError: ErrorRule(400, "A", {"batch": "B", "resource": "B"}),
    ModelMismatchError: ErrorRule(409, "A", {"batch": "B", "resource": "B"}),  # memory from another backbone
    CalibrationMissingError: ErrorRule(400, "A", {"batch": "B", "resource": "B"}),
    InsufficientSamplesError: ErrorRule(400, "A", {"batch": "B", "resource": "B"}),
    NotFoundError: ErrorRule(404, "B"),
    CrossRecipeDeleteError: ErrorRule(409, "B"),  # a clear the read fallback would take to another recipe
    # the conflict rule: an API write to a model the registry manages; the message names the version
    RegistryManagedError: ErrorRule(409, "A", {"resource": "B"}),
    InvalidInputError: ErrorRule(400, "A", {"resource": "B"}),  # decode, limits, grid, metas, label
    WeightsError: ErrorRule(500, "A", log_trace=True),
    StorageError: ErrorRule(500, "A", log_trace=True),
    BDIError: ErrorRule(500, "A", log_trace=True),
}


def rule_for(exc: BDIError) -> ErrorRule:
    """The table entry of the most specific class of ``exc``."""
    for cls in type(exc).__mro__:
        rule = ERROR_TABLE.get(cls)
        if rule is not None:
            return rule
    return ERROR_TABLE[BDIError]


def error_style(style: ErrorStyle) -> Any:
    """A router/route dependency that marks which error style its requests use."""

    async def mark_error_style(request: Request) -> None:
        request.state.error_style = style

    return Depends(mark_error_style)


def _request_ids(request: Request) -> tuple[str, str]:
    state = request.state
    return str(getattr(state, "request_id", "")), str(getattr(state, "recipe_id", DEFAULT_RECIPE))


def error_body(*, shape: Shape, message: str, request_id: str, recipe_id: str) -> dict[str, Any]:
    """The JSON body of one error in the given shape."""
    if shape == "B":
        return {"detail": message}
    inner = {"error": message, "request_id": request_id, "recipe_id": recipe_id}
    return {"detail": inner} if shape == "C" else inner


def _event_prefix(request: Request) -> str:
    route = request.scope.get("route")
    name = getattr(route, "name", None)
    return str(name) if name else "http"


async def handle_bdi_error(request: Request, exc: Exception) -> JSONResponse:
    """Map a ``BDIError`` through :data:`ERROR_TABLE`."""
    if not isinstance(exc, BDIError):  # registered for BDIError only; kept total for type checkers
        return await handle_unexpected_error(request, exc)
    rule = rule_for(exc)
    style: ErrorStyle = getattr(request.state, "error_style", DEFAULT_STYLE)
    shape = rule.shape_for(style)
    request_id, recipe_id = _request_ids(request)
    if isinstance(exc, InvalidRecipeError):
        recipe_id = DEFAULT_RECIPE  # the reference reports "default" for a rejected recipe
    fields: dict[str, Any] = {
        "error_type": type(exc).__name__,
        "error_code": exc.code,
        "error_message": str(exc),
        "status_code": rule.status,
    }
    if rule.log_trace:
        fields["trace"] = "".join(traceback.format_exception(exc))
    slog(f"{_event_prefix(request)}.error", **fields)
    message = internal_error_message(request_id) if rule.status >= 500 else str(exc)
    body = error_body(shape=shape, message=message, request_id=request_id, recipe_id=recipe_id)
    return JSONResponse(body, status_code=rule.status)


async def handle_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception: a logged 500 in shape A that still carries X-Request-Id."""
    request_id, recipe_id = _request_ids(request)
    slog(
        f"{_event_prefix(request)}.error",
        error_type=type(exc).__name__,
        error_message=str(exc),
        status_code=500,
        trace="".join(traceback.format_exception(exc)),
    )
    body = error_body(shape="A", message=internal_error_message(request_id), request_id=request_id,
                      recipe_id=recipe_id)
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return JSONResponse(body, status_code=500, headers=headers)


class ErrorShapeA(BaseModel):
    error: str
    request_id: str
    recipe_id: str


class ErrorShapeB(BaseModel):
    detail: str


class ErrorShapeC(BaseModel):
    detail: ErrorShapeA


class ErrorBody(RootModel[ErrorShapeA | ErrorShapeB | ErrorShapeC]):
    """Any of the contract's JSON error shapes A, B, C; 422 keeps FastAPI's own shape D."""


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Bad input (shape A, B or C by endpoint family)"},
    401: {"model": ErrorBody, "description": "BDI_AUTH on and no valid API key (shape B, docs/security.md)"},
    403: {"model": ErrorBody, "description": "The API key lacks the route's scope (shape B)"},
    404: {"model": ErrorBody, "description": "Dataset file or sidecar not found (shape B)"},
    409: {"model": ErrorBody, "description": "mm_per_px lock mismatch (C), a fit of the model in progress (A) or "
                                            "a clear that would reach another recipe's samples (B)"},
    413: {"model": ErrorBody, "description": "Request body over BDI_MAX_REQUEST_BYTES (shape B)"},
    429: {"model": ErrorBody, "description": "Too many failed API key attempts from this address (shape B)"},
    500: {"model": ErrorBody, "description": "Unexpected failure: a stable message and the request id (shape A)"},
}
"""The error statuses every route documents in the OpenAPI schema (``include_router(responses=...)``)."""


async def handle_auth_refused(request: Request, exc: Exception) -> JSONResponse:
    """A key check refused in a route's scope dependency (``serving.auth``): 401/403 shape B."""
    if not isinstance(exc, AuthRefusedError):
        return await handle_unexpected_error(request, exc)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers (FastAPI "Handling Errors": one handler per exception class)."""
    app.add_exception_handler(AuthRefusedError, handle_auth_refused)
    app.add_exception_handler(BDIError, handle_bdi_error)
    app.add_exception_handler(Exception, handle_unexpected_error)
