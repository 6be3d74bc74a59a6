"""Domain errors raised by the core, with messages meant for the caller. Which HTTP status each
becomes is decided in one table, app.api.HTTP_STATUS."""

from __future__ import annotations

from typing import ClassVar


class WarmtuneError(Exception):
    """Base of every error warmtune raises on purpose; its message is shown to the caller."""

    headers: ClassVar[dict[str, str]] = {}  # HTTP headers the answer carries


class MalformedRequest(WarmtuneError):
    """A request body that cannot be parsed (broken multipart, wrong field types)."""


class InvalidParameter(WarmtuneError):
    """A query or path parameter out of its range."""


class InvalidImage(WarmtuneError):
    """An uploaded file is not a usable image."""


class InvalidLabel(WarmtuneError):
    """A class label is empty, too long or not printable."""


class InvalidUpdate(WarmtuneError):
    """An update set is malformed as a whole (no images, labels not matching images)."""


class TooLarge(WarmtuneError):
    """A request carries more images or bytes than the limits allow."""


class RequestTimeout(WarmtuneError):
    """A request body that does not arrive in time (a slow or stalled client)."""


class UnsupportedMediaType(WarmtuneError):
    """A request body of a content type the endpoint does not take."""


class Unauthorized(WarmtuneError):
    """No API key (bearer; on Label Studio's routes also basic auth), or one that is not configured."""

    headers = {"WWW-Authenticate": 'Bearer realm="warmtune"'}


class Forbidden(WarmtuneError):
    """A known key without the role an endpoint needs."""


class UnknownUpdate(WarmtuneError):
    """No update set has this id."""


class CorruptUpdate(WarmtuneError):
    """A stored update set whose file cannot be read; it is moved to quarantine, never deleted."""


class DamagedSample(CorruptUpdate):
    """An image of a stored update set that no longer reads as it was stored (gone, or its bytes
    changed on disk): its manifest read, so only reading the image finds it."""

    def __init__(self, update_id: str, reason: str) -> None:
        super().__init__(f"update set {update_id}: {reason}")
        self.update_id = update_id
        self.reason = reason


class UnknownVersion(WarmtuneError):
    """No model version has this number."""


class VersionPruned(WarmtuneError):
    """A version whose weights retention deleted: it cannot be served or promoted."""


class VersionUnloadable(WarmtuneError):
    """A version whose weights fail to load: promoting it is refused, the current version stays."""


class IdempotencyConflict(WarmtuneError):
    """An Idempotency-Key already names a stored set with a different payload."""


class NotRetryable(WarmtuneError):
    """Only rejected, failed or orphaned update sets can be queued again."""


class NoModel(WarmtuneError):
    """No model version exists yet: nothing can answer a prediction."""


class ModelError(WarmtuneError):
    """A model cannot be built or loaded (unknown architecture, missing or mismatched weights)."""


class LineageMoved(WarmtuneError):
    """The current version changed while a candidate was trained; the candidate is stale."""


class LockLost(WarmtuneError):
    """The lineage lock's lease ran out while its holder still worked."""


class InvalidLabelConfig(WarmtuneError):
    """A Label Studio labelling config that is not one image with one single-choice class."""


class LabelStudioUnavailable(WarmtuneError):
    """Label Studio could not be reached, refused warmtune's token, or is not configured."""
