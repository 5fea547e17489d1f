"""Exceptions raised by the confer client.

Every error a coordinator (or a node behind it) reports reaches Python as a
:class:`ConferError` carrying confer's own message, the gRPC status code,
and whether sending the same request again may help (``retryable``, from
the ``confer-retryable`` status metadata, else the code's default: only
``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` are worth a retry). Where confer
names a finer cause (``confer-reason``: ``not_in_catalog``, ``certificate``,
``connect``) or the site an error comes from (``confer-site``), they are
kept too.

The hierarchy, by what a caller does about it::

    ConferError
    ├── AuthError                  who you are, or what you may do
    │   ├── AuthenticationError    no, unknown or revoked token (UNAUTHENTICATED)
    │   └── PermissionDeniedError  policy says no (PERMISSION_DENIED); also a RefusedError
    ├── RefusedError               the request as written is refused: change it
    │   ├── BudgetError            over a budget or a per-query cap (RESOURCE_EXHAUSTED)
    │   └── NotFoundError          an unknown study, job or other name (NOT_FOUND)
    ├── UnavailableError           a coordinator or node cannot be reached (retry later)
    │   └── DeadlineExceededError  no answer within the timeout
    ├── JobFailedError             a training job ended in the ``failed`` state
    ├── ConfigurationError         bad client-side input (URL, TLS files, job spec); also a ValueError
    ├── LocalNetworkError          local_network() could not start or stop a federation
    └── InternalError              a bug in confer, or an answer the client cannot read
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "AuthError",
    "AuthenticationError",
    "BudgetError",
    "ConferError",
    "ConfigurationError",
    "DeadlineExceededError",
    "InternalError",
    "JobFailedError",
    "LocalNetworkError",
    "NotFoundError",
    "PermissionDeniedError",
    "RefusedError",
    "UnavailableError",
]

RETRYABLE_KEY = "confer-retryable"
REASON_KEY = "confer-reason"
SITE_KEY = "confer-site"

#: gRPC status codes by their canonical upper-case names.
GRPC_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


class ConferError(Exception):
    """An error from confer, or from talking to it.

    Attributes:
        message: What went wrong and what to change, as confer words it.
        code: The gRPC status code name (``"INVALID_ARGUMENT"``, ...), or
            ``None`` for errors raised by the client itself.
        retryable: Whether the same request may succeed if sent again unchanged.
        reason: A finer cause where confer gives one (``"not_in_catalog"``,
            ``"certificate"``, ``"connect"``).
        site: The site (node) the error comes from, where it comes from one.
    """

    #: The default retry hint of this class when the server sends none.
    default_retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        reason: str | None = None,
        site: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = self.default_retryable if retryable is None else retryable
        self.reason = reason
        self.site = site

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = [f"code={self.code!r}", f"retryable={self.retryable}"]
        if self.reason:
            extra.append(f"reason={self.reason!r}")
        if self.site:
            extra.append(f"site={self.site!r}")
        return f"{type(self).__name__}({self.message!r}, {', '.join(extra)})"


class AuthError(ConferError):
    """The caller is unknown, or may not do what was asked."""


class AuthenticationError(AuthError):
    """No credentials, or a token the coordinator does not know (or revoked)."""


class RefusedError(ConferError):
    """confer refused the request as written (a query, a job, an argument):
    the message says what to change. Retrying it unchanged does not help."""


class PermissionDeniedError(AuthError, RefusedError):
    """A policy refuses the caller this: a study they are not a member of, a
    role they lack, a table the study may not read."""


class BudgetError(RefusedError):
    """Over a privacy budget (the study's, the node's, the researcher's) or
    over a node's per-query cap. Nothing was spent."""


class NotFoundError(RefusedError):
    """Something named does not exist: a study, a job."""


class UnavailableError(ConferError):
    """The coordinator (or too many nodes) cannot be reached, or is shutting
    down. Usually worth a retry later."""

    default_retryable = True


class DeadlineExceededError(UnavailableError):
    """No answer within the timeout."""


class InternalError(ConferError):
    """A broken invariant in confer, an unsupported action, or an answer the
    client cannot read."""


class ConfigurationError(ConferError, ValueError):
    """Bad input on the client side: a malformed URL, a missing TLS file, a
    job spec that is not TOML."""


class LocalNetworkError(ConferError):
    """``local_network()`` could not start (or cleanly stop) a federation.
    The message includes what the processes printed."""


class JobFailedError(ConferError):
    """A training job ended in the ``failed`` state.

    Attributes:
        status: The job's final :class:`confer.JobStatus`.
    """

    def __init__(self, message: str, status: Any) -> None:
        super().__init__(message, code=None, retryable=False)
        self.status = status


_CLASS_BY_CODE: dict[str, type[ConferError]] = {
    "INVALID_ARGUMENT": RefusedError,
    "OUT_OF_RANGE": RefusedError,
    "FAILED_PRECONDITION": RefusedError,
    "ALREADY_EXISTS": RefusedError,
    "ABORTED": RefusedError,
    "RESOURCE_EXHAUSTED": BudgetError,
    "NOT_FOUND": NotFoundError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAVAILABLE": UnavailableError,
    "CANCELLED": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
}


def error_for(
    code: str | None,
    message: str,
    metadata: Mapping[str, str] | None = None,
) -> ConferError:
    """The exception for a gRPC status ``code`` (upper-case name) with
    ``message`` and the status ``metadata`` (``confer-retryable``,
    ``confer-reason``, ``confer-site``)."""
    metadata = metadata or {}
    cls = _CLASS_BY_CODE.get(code or "", InternalError)
    flag = metadata.get(RETRYABLE_KEY)
    retryable = None if flag is None else flag.strip().lower() == "true"
    return cls(
        message or (code or "unknown error"),
        code=code,
        retryable=retryable,
        reason=metadata.get(REASON_KEY) or None,
        site=metadata.get(SITE_KEY) or None,
    )


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def metadata_from_pairs(pairs: Iterable[tuple[Any, Any]] | None) -> dict[str, str]:
    """Status metadata from (key, value) pairs (ADBC error details, Flight
    headers), keys lower-cased, values decoded."""
    out: dict[str, str] = {}
    for key, value in pairs or ():
        if isinstance(value, list):
            value = value[-1] if value else ""
        out[_decode(key).lower()] = _decode(value)
    return out


# "(ResourceExhausted; DoGet: endpoint 0: [])" at the end of an ADBC message.
_ADBC_SUFFIX = re.compile(r"\s*\(([A-Za-z]+)(?:;(?:[^()]|\([^()]*\))*)?\)(?:\. Vendor code: -?\d+)?\s*$")
# "INVALID_ARGUMENT: [FlightSQL] " at the start.
_ADBC_PREFIX = re.compile(r"^[A-Z_]+: (?:\[[^\]]*\] )?")
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _camel_to_code(name: str) -> str | None:
    code = _CAMEL.sub("_", name).upper()
    if code == "CANCELED":
        code = "CANCELLED"
    return code if code in GRPC_CODES else None


def from_adbc(err: BaseException) -> ConferError:
    """Maps an ADBC driver exception (``adbc_driver_manager.Error``) to a
    :class:`ConferError`: the gRPC code from the message's suffix (the
    driver's own status loses it: a budget refusal arrives as ADBC
    ``INTERNAL``), confer's message without the driver's decoration, and
    the status metadata from the error details."""
    text = str(err)
    code = None
    match = _ADBC_SUFFIX.search(text)
    if match:
        code = _camel_to_code(match.group(1))
        text = text[: match.start()]
    text = _ADBC_PREFIX.sub("", text, count=1).strip()
    if code is None:
        vendor = getattr(err, "vendor_code", None)
        if isinstance(vendor, int) and 0 <= vendor < len(GRPC_CODES):
            code = GRPC_CODES[vendor]
    if code is None:
        code = {
            3: "NOT_FOUND",
            5: "INVALID_ARGUMENT",
            10: "UNAVAILABLE",
            11: "CANCELLED",
            12: "DEADLINE_EXCEEDED",
            13: "UNAUTHENTICATED",
            14: "PERMISSION_DENIED",
        }.get(getattr(err, "status_code", -1) or -1, "INTERNAL")
    metadata = metadata_from_pairs(getattr(err, "details", None))
    if code == "UNAVAILABLE" and "connection error" in text:
        text = f"cannot reach the coordinator: {text}"
    return error_for(code, text, metadata)


# pyarrow.flight messages: "Flight returned not found error, with message: ..."
# or "gRPC returned resource exhausted error, with message: ...".
_FLIGHT_MESSAGE = re.compile(
    r"^(?:Flight|gRPC) returned ([a-z ]+?) error, with message: (.*?)(?:\. Detail: .*)?$",
    re.S,
)
_FLIGHT_WORDS = {
    "invalid argument": "INVALID_ARGUMENT",
    "not found": "NOT_FOUND",
    "already exists": "ALREADY_EXISTS",
    "unauthenticated": "UNAUTHENTICATED",
    "unauthorized": "PERMISSION_DENIED",
    "permission denied": "PERMISSION_DENIED",
    "resource exhausted": "RESOURCE_EXHAUSTED",
    "precondition failed": "FAILED_PRECONDITION",
    "failed precondition": "FAILED_PRECONDITION",
    "aborted": "ABORTED",
    "out of range": "OUT_OF_RANGE",
    "unimplemented": "UNIMPLEMENTED",
    "not implemented": "UNIMPLEMENTED",
    "internal": "INTERNAL",
    "unavailable": "UNAVAILABLE",
    "timeout": "DEADLINE_EXCEEDED",
    "timed out": "DEADLINE_EXCEEDED",
    "deadline exceeded": "DEADLINE_EXCEEDED",
    "cancelled": "CANCELLED",
    "canceled": "CANCELLED",
    "data loss": "DATA_LOSS",
    "unknown": "UNKNOWN",
}


def from_flight(err: BaseException, metadata: Mapping[str, str] | None = None) -> ConferError:
    """Maps a ``pyarrow.flight`` (or pyarrow) exception raised by a Flight
    call to a :class:`ConferError`, with the status ``metadata`` a client
    middleware saw for that call."""
    import pyarrow.flight as flight

    text = str(err).strip()
    code: str | None = None
    match = _FLIGHT_MESSAGE.match(text)
    if match:
        code = _FLIGHT_WORDS.get(match.group(1).strip())
        text = match.group(2).strip()
    if code is None:
        for cls, name in (
            (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"),
            (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
            (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
            (flight.FlightUnavailableError, "UNAVAILABLE"),
            (flight.FlightCancelledError, "CANCELLED"),
            (flight.FlightInternalError, "INTERNAL"),
        ):
            if isinstance(err, cls):
                code = name
                break
    if code is None:
        code = "INTERNAL"
    if code == "UNAVAILABLE" and "failed to connect" in text:
        text = f"cannot reach the coordinator: {text}"
    if code == "DEADLINE_EXCEEDED" and not text:
        text = "no answer within the timeout"
    return error_for(code, text, metadata)
