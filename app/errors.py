"""Domain errors raised by the core; each carries the HTTP status app.api answers it with."""

from __future__ import annotations


class WarmtuneError(Exception):
    """Base of every error warmtune raises on purpose; its message is shown to the caller."""

    status_code = 400


class MalformedRequest(WarmtuneError):
    """A request body that cannot be parsed (broken multipart, wrong field types)."""

    status_code = 400


class InvalidParameter(WarmtuneError):
    """A query or path parameter out of its range."""

    status_code = 422


class InvalidImage(WarmtuneError):
    """An uploaded file is not a usable image."""

    status_code = 422


class InvalidLabel(WarmtuneError):
    """A class label is empty, too long or not printable."""

    status_code = 422


class InvalidUpdate(WarmtuneError):
    """An update set is malformed as a whole (no images, labels not matching images)."""

    status_code = 422


class TooLarge(WarmtuneError):
    """A request carries more images or bytes than the limits allow."""

    status_code = 413


class UnsupportedMediaType(WarmtuneError):
    """A request body of a content type the endpoint does not take."""

    status_code = 415


class Unauthorized(WarmtuneError):
    """No bearer key, or one that is not configured."""

    status_code = 401


class Forbidden(WarmtuneError):
    """A known key without the role an endpoint needs."""

    status_code = 403


class UnknownUpdate(WarmtuneError):
    status_code = 404


class UnknownVersion(WarmtuneError):
    status_code = 404


class NotRetryable(WarmtuneError):
    """Only rejected, failed or orphaned update sets can be queued again."""

    status_code = 409


class NoModel(WarmtuneError):
    """No model version exists yet: nothing can answer a prediction."""

    status_code = 503


class ModelError(WarmtuneError):
    """A model cannot be built or loaded (unknown architecture, missing or mismatched weights)."""

    status_code = 500


class LineageMoved(WarmtuneError):
    """The current version changed while a candidate was trained; the candidate is stale."""

    status_code = 409


class LockLost(WarmtuneError):
    """The lineage lock's lease ran out while its holder still worked."""

    status_code = 409
