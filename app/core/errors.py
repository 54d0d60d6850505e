"""The service's error hierarchy: each error knows its HTTP status and stable code.

One exception handler (app.main) renders every `ServiceError` as
`{"error": {"code": "...", "message": "..."}}`; routes list the errors they raise in
`responses=` so the OpenAPI docs show them.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base of every error a client may see."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class RequestTooLarge(ServiceError):
    """The request body passed VS_MAX_REQUEST_BYTES (raised by the body-size middleware)."""

    status_code = 413
    code = "request_too_large"


class ImageUndecodable(ServiceError):
    status_code = 422
    code = "image_undecodable"


class ImageTooLarge(ServiceError):
    status_code = 413
    code = "image_too_large"


class InvalidBox(ServiceError):
    status_code = 422
    code = "invalid_box"


class UrlNotAllowed(ServiceError):
    status_code = 422
    code = "url_not_allowed"


class ImageFetchFailed(ServiceError):
    status_code = 422
    code = "image_fetch_failed"


class ProductNotFound(ServiceError):
    status_code = 404
    code = "product_not_found"


class PairNotFound(ServiceError):
    """A decision on two products that were never found as a duplicate pair."""

    status_code = 404
    code = "pair_not_found"


class ImageNotFound(ServiceError):
    status_code = 404
    code = "image_not_found"


class DecisionNotFound(ServiceError):
    status_code = 404
    code = "decision_not_found"


class ThumbnailNotFound(ServiceError):
    """No such image, or its thumbnail was not made yet (`vsearch thumbnails backfill`)."""

    status_code = 404
    code = "thumbnail_not_found"


class NotCalibrated(ServiceError):
    """Probabilities were asked for before enough review decisions exist to fit them."""

    status_code = 409
    code = "not_calibrated"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    """A valid key asked for what its scope does not allow: writing products into product
    sets outside the key's scope (or into none), or a catalogue-wide operation."""

    status_code = 403
    code = "forbidden"


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limited"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"

    def __init__(self, message: str = "The service is busy; retry shortly.", retry_after: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"

    def __init__(
        self, message: str = "The service is not ready yet; retry shortly.", retry_after: int = 5
    ):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class EmbeddingsRefused(ServiceError):
    """An embeddings file that must not enter the catalogue (another model, dimension)."""

    status_code = 422
    code = "embeddings_refused"


class ParquetUnavailable(ServiceError):
    """Parquet import/export without pyarrow installed (the `parquet` extra)."""

    status_code = 501
    code = "parquet_unavailable"


class ImportNotFound(ServiceError):
    status_code = 404
    code = "import_not_found"


class ImportFinished(ServiceError):
    """Cancelling an import job that has already ended."""

    status_code = 409
    code = "import_finished"


class ImportFileInvalid(ServiceError):
    """An uploaded import file that cannot be read as a whole (format, encoding, columns)."""

    status_code = 422
    code = "import_file_invalid"


class ModelLoadError(Exception):
    """The model directory is missing, malformed, or does not match its config."""


class ModelUnavailable(ModelLoadError):
    """A hub model could not be downloaded and is not cached."""
