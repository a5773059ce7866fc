"""Retry predicates: a worker's say, from the exception a handler raised, on whether the
failure is worth another attempt and what kind of failure it is.

``retry_if`` (on the ``Worker`` for every job type, or on ``register`` for one) is called with
the exception and returns a ``RetryDecision``, a bool (retryable or not, the kind unchanged),
or None to leave the failure as the handler raised it. So "retry a 5xx, not a 4xx" is written
once, next to the worker::

    def http(error: Exception) -> jobwire.RetryDecision | None:
        if isinstance(error, HttpError):
            retryable = error.status >= 500
            return jobwire.RetryDecision(retryable, kind=f"http_{error.status // 100}xx")
        return None

The kind is recorded as the job's ``last_error.kind``. The predicate sees only what the
handler raised: failures the SDK makes itself (a payload that does not decode, an attempt
stopped by a cancel, pause or timeout) are reported as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from jobwire.errors import HandlerError, NonRetryable, Retryable, Waiting


@dataclass(frozen=True)
class RetryDecision:
    """What a retry predicate decided: retryable or not, and the kind and delay to report
    (None keeps the handler's)."""

    retryable: bool
    kind: str | None = None
    retry_after: timedelta | None = None


#: A retry predicate: the exception a handler raised, to a decision (None: the handler's own).
RetryIf = Callable[[Exception], "RetryDecision | bool | None"]


def decide(retry_if: RetryIf | None, error: Exception) -> HandlerError | None:
    """The failure to report for ``error`` as ``retry_if`` decides it; None when it keeps the
    handler's own. A ``Waiting`` is no failure, so it is never the predicate's to decide."""
    if retry_if is None or isinstance(error, Waiting):
        return None
    decision = retry_if(error)
    if decision is None:
        return None
    if isinstance(decision, bool):
        decision = RetryDecision(decision)
    if isinstance(error, HandlerError):
        message, kind, retry_after = error.message, error.kind, error.retry_after
    else:
        message, kind, retry_after = f"{type(error).__name__}: {error}", type(error).__name__, None
    cls = Retryable if decision.retryable else NonRetryable
    return cls(
        message,
        kind=decision.kind if decision.kind is not None else kind,
        retry_after=decision.retry_after if decision.retry_after is not None else retry_after,
    )
