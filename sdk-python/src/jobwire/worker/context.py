"""What a handler knows about the attempt it runs, how it reports on it, and how it learns
that it must stop.

Stopping is cooperative first: when the server sends StopJob for the lease (the job was
cancelled or paused, its lease was lost, or it ran past its timeout), when the attempt's
deadline passes locally, or when a drain runs out of time, the context's cancellation fires
(``ctx.cancelled`` turns True, ``await ctx.wait_cancelled()`` returns, ``ctx.stop_reason`` says
why). A handler told to stop should return promptly, after a ``checkpoint`` when pausing. One
that has not returned ``stop_grace`` seconds later is cancelled like any asyncio task
(``CancelledError`` at its next await), since the server stops honouring its lease soon after.

Reporting never waits: ``progress`` keeps only the latest value and the worker sends it at most
once per progress interval, ``log`` lines are batched, and both go out before the attempt's
result. ``checkpoint`` waits until the server stored it; the next attempt (after a pause, a
crash or a retry) starts with it in ``last_checkpoint``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jobwire.errors import JobwireError
from jobwire.events import LogLevel, Progress

if TYPE_CHECKING:
    from jobwire.worker._reports import LeaseReports
    from jobwire.worker._wire import Grant


class StopReason(enum.Enum):
    """Why a handler was asked to stop."""

    #: The job was cancelled; it will not run again.
    CANCELLED = "cancelled"
    #: The job was paused: save a checkpoint, then return; it resumes from it later.
    PAUSED = "paused"
    #: The attempt ran past the job's timeout; it counts as a retryable failure.
    TIMED_OUT = "timed out"
    #: The lease lapsed or moved on; nothing this attempt reports counts any more.
    LEASE_LOST = "lease lost"
    #: The worker is shutting down and its drain timeout passed; the job will be retried.
    SHUTDOWN = "worker shutting down"

    def __str__(self) -> str:
        return self.value


class Stopped(JobwireError):
    """Raised by ``JobContext.raise_if_cancelled``; the runtime reports the attempt by the
    stop's reason."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"stopped: {reason}")
        self.reason = reason


class StopSignal:
    """The cancellation of one attempt: fires once, and its first reason stands."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: StopReason | None = None

    def stop(self, reason: StopReason) -> bool:
        """Fires; False when it had fired before."""
        if self.reason is not None:
            return False
        self.reason = reason
        self.event.set()
        return True


class JobContext:
    """The attempt a handler runs: which job, which attempt, whether to stop, how to report."""

    def __init__(
        self,
        grant: Grant,
        worker_id: str,
        stop: StopSignal,
        reports: LeaseReports,
        checkpoint: Callable[[LeaseReports, bytes], Awaitable[None]],
        deadline: float | None,
    ) -> None:
        self.job_id: str = grant.key[0]
        #: This attempt's number, 1 for the first.
        self.attempt: int = grant.key[1]
        #: Attempts in all under the job's retry policy, the first included.
        self.max_attempts: int = grant.max_attempts
        self.job_type: str = grant.job_type
        self.queue: str = grant.queue
        self.priority: int = grant.priority
        self.labels: Mapping[str, str] = grant.labels
        self.created_at: datetime | None = grant.created_at
        #: The checkpoint a previous attempt saved, if any.
        self.last_checkpoint: bytes | None = grant.checkpoint
        self.worker_id = worker_id
        self._stop = stop
        self._reports = reports
        self._checkpoint = checkpoint
        self._deadline = deadline

    @property
    def is_last_attempt(self) -> bool:
        """Whether a retryable failure now would still be retried."""
        return self.attempt >= self.max_attempts

    @property
    def cancelled(self) -> bool:
        """Whether the handler has been asked to stop."""
        return self._stop.reason is not None

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop.reason

    async def wait_cancelled(self) -> StopReason:
        """Returns once the handler is asked to stop, with the reason; race it against the
        work (``asyncio.wait``) to stop promptly."""
        await self._stop.event.wait()
        assert self._stop.reason is not None
        return self._stop.reason

    def raise_if_cancelled(self) -> None:
        """Raises ``Stopped`` once the handler was asked to stop: a check for loops."""
        if self._stop.reason is not None:
            raise Stopped(self._stop.reason)

    def time_left(self) -> float | None:
        """Seconds until the attempt's timeout (by the worker's monotonic clock), if it has
        one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def progress(
        self,
        fraction: float | None = None,
        *,
        message: str = "",
        stage: str = "",
        items_done: int = 0,
        items_total: int = 0,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Reports how far the job has come; watchers see it as a progress event. Cheap enough
        for every item: only the latest value is sent, at most once per progress interval,
        and always before the attempt's result. Does nothing once the lease is lost."""
        self.report(
            Progress(
                fraction=fraction,
                message=message,
                stage=stage,
                items_done=items_done,
                items_total=items_total,
                data=data or {},
            )
        )

    def report(self, progress: Progress) -> None:
        """``progress`` with a ready ``Progress`` value."""
        self._reports.set_progress(progress)

    def log(self, level: LogLevel, message: str) -> None:
        """Logs a line to the job's own log. Never waits; at most 10,000 lines wait to be sent,
        beyond which the oldest are dropped and a warning line says how many."""
        self._reports.push_line(level, message)

    def debug(self, message: str) -> None:
        self.log(LogLevel.DEBUG, message)

    def info(self, message: str) -> None:
        self.log(LogLevel.INFO, message)

    def warn(self, message: str) -> None:
        self.log(LogLevel.WARN, message)

    def error(self, message: str) -> None:
        self.log(LogLevel.ERROR, message)

    async def checkpoint(self, data: bytes) -> None:
        """Stores state a later attempt can resume from, and waits until the server has it.
        Raises ``LeaseLost`` when the lease is gone, ``Disconnected`` when the stream broke
        first."""
        await self._checkpoint(self._reports, data)
