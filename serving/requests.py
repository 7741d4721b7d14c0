"""Typed JSON request bodies of /calibrate_ng, /infer_dataset, /calibrate_dataset and /calibrate_manual (and the
additive POST /keys), with their ranges.

Each model states what a key may hold (every number has its range), documents the body in the
OpenAPI schema (:meth:`JsonBody.openapi`) and validates it (:meth:`JsonBody.parse`). A value out of
range is bad input: :class:`InvalidInputError` (400 A, the reference's "KeyError or ValueError"),
never a 500 from deeper down. Quirks the contract keeps: a missing ``role_id``/``roi_id`` says
``'role_id'`` (the reference's KeyError text), and a non-string ``model_key``/``recipe_id`` is
ignored rather than refused (docs/contract.md "Model key"). Unknown keys are ignored, as by the reference.
The responses are in :mod:`serving.schemas`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, WithJsonSchema

from bdi.errors import InvalidInputError
from serving.parsing import required_str

T = TypeVar("T", bound="JsonModel")


def _plain_number(value: object) -> object:
    """Refuse booleans (pydantic would read true as 1.0) and name non-finite values as such
    (pydantic would first report NaN as out of range)."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    if isinstance(value, (float, str)):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return value  # pydantic reports it
        if not math.isfinite(number):
            raise ValueError("Input should be a finite number")
    return value


_NoBool = BeforeValidator(_plain_number)
# finite numbers (numeric strings accepted, booleans not) within a range
Percentile = Annotated[float, _NoBool, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
AreaMm2 = Annotated[float, _NoBool, Field(ge=0.0, allow_inf_nan=False)]
MmPerPx = Annotated[float, _NoBool, Field(gt=0.0, allow_inf_nan=False)]
# JSON numbers only (NaN/Infinity literals are dropped by the library); no strings, no booleans
Scores = list[Annotated[float, Strict()]]
# used only when it is a string; anything else is ignored, not refused
LooseString = Annotated[Any, WithJsonSchema({"type": "string"})]


class JsonModel(BaseModel):
    """Base of every JSON request body: unknown keys ignored, ``required_keys`` checked first, the first problem
    an :class:`InvalidInputError` (400) naming the key, and the model as the route's documented body."""

    model_config = ConfigDict(extra="ignore")
    required_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse(cls: type[T], body: Mapping[str, Any]) -> T:
        """Validate ``body``; the first problem becomes an :class:`InvalidInputError` naming the key."""
        for key in cls.required_keys:
            required_str(body, key)
        try:
            return cls.model_validate(dict(body))
        except ValidationError as exc:
            raise InvalidInputError(describe_validation_error(exc)) from exc

    @classmethod
    def openapi(cls) -> dict[str, Any]:
        """``openapi_extra`` for the route: this model as the documented request body."""
        return {"requestBody": {"required": True,
                                "content": {"application/json": {"schema": cls.model_json_schema()}}}}


class JsonBody(JsonModel):
    """Base of a model's request: ``role_id`` and ``roi_id`` required (checked first)."""

    required_keys: ClassVar[tuple[str, ...]] = ("role_id", "roi_id")

    role_id: str
    roi_id: str
    recipe_id: LooseString = None
    model_key: LooseString = None

    @property
    def model_key_str(self) -> str | None:
        return self.model_key if isinstance(self.model_key, str) else None


def describe_validation_error(exc: ValidationError) -> str:
    """``"<key>: <pydantic message>, got <value>"`` for the first error."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    got = repr(error.get("input"))
    if len(got) > 80:
        got = got[:77] + "..."
    return f"{where}: {error['msg']}, got {got}"


class CalibrateNgRequest(JsonBody):
    """POST /calibrate_ng: a threshold from scores the client computed."""

    ok_scores: Scores | None = None
    ng_scores: Scores | None = None
    mm_per_px: MmPerPx | None = None  # stored with the calibration only (default 0.2)
    score_percentile: Percentile | None = None  # stored as an int (truncated), default BDI_SCORE_PERCENTILE
    area_mm2_thr: AreaMm2 | None = None


class InferDatasetRequest(JsonBody):
    """POST /infer_dataset: score every stored sample of the given labels."""

    labels: list[str] | None = None
    include_heatmap: bool | None = None
    default_mm_per_px: MmPerPx | None = None


class CalibrateDatasetRequest(JsonBody):
    """POST /calibrate_dataset: score the stored OK/NG samples and calibrate."""

    score_percentile: Percentile | None = None
    area_mm2_thr: AreaMm2 | None = None
    default_mm_per_px: MmPerPx | None = None
    require_ng: bool | None = None


class CalibrateManualRequest(JsonBody):
    """POST /calibrate_manual (additive, docs/contract.md "Additive routes"): a threshold an operator chose."""

    threshold: Annotated[float, _NoBool, Field(gt=0.0, allow_inf_nan=False)]


class KeyCreateRequest(JsonModel):
    """POST /keys: who uses the key, its scopes, and optionally how many days it lives (no ROI: not a JsonBody)."""

    label: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(min_length=1)
    expires_days: float | None = Field(None, gt=0, le=36500)


class FeedbackRegionBody(BaseModel):
    """A corrected defect region in crop pixels: ``bbox`` ``[x, y, w, h]`` or ``polygon`` ``[[x, y], …]``."""

    model_config = ConfigDict(extra="forbid")

    bbox: Annotated[list[float], Field(min_length=4, max_length=4)] | None = None
    polygon: Annotated[list[Annotated[list[float], Field(min_length=2, max_length=2)]], Field(min_length=3)] | None \
        = None


class FeedbackBody(JsonModel):
    """POST /feedback (additive, docs/monitoring.md "Operator feedback"): an operator's verdict on the inspection
    answered with ``request_id``; ``image_base64`` is the inspected image when the record kept none."""

    request_id: Annotated[str, Field(min_length=1)]
    verdict: Literal["false_reject", "confirmed_defect", "missed_defect"]
    recipe_id: LooseString = None
    # validated as FeedbackRegionBody by parse; typed loosely here so the OpenAPI schema inlines it (no $defs)
    region: Annotated[dict[str, Any] | None, WithJsonSchema({
        "anyOf": [{"type": "object", "properties": {
            "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
            "polygon": {"type": "array", "minItems": 3,
                        "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}}},
            "additionalProperties": False}, {"type": "null"}]})] = None
    operator: Annotated[str, Field(max_length=200)] | None = None
    comment: Annotated[str, Field(max_length=2000)] | None = None
    image_base64: str | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> FeedbackBody:
        parsed = super().parse(body)
        try:
            parsed.region_body()
        except ValidationError as exc:
            raise InvalidInputError(describe_validation_error(exc)) from exc
        return parsed

    def region_body(self) -> FeedbackRegionBody | None:
        return FeedbackRegionBody.model_validate(self.region) if self.region is not None else None
