"""Typed job events and the reports they carry (progress, log lines).

A ``JobEvent`` is one entry of a job's event log as ``WatchJob`` and ``WatchJobs`` stream it:
its ``sequence`` orders every event of the tenant, which is what a watcher resumes from. The
``kind`` is one of ``StateChanged``, ``Progress``, ``LogLine``, ``StopRequested`` or
``SignalReceived``, so a consumer matches on the class. ``Progress`` is also what a handler reports.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any as AnyValue

from jobwire import _codec
from jobwire.jobs import JobState
from jobwire.v1 import job_pb2


class LogLevel(enum.IntEnum):
    UNSPECIFIED = job_pb2.LOG_LEVEL_UNSPECIFIED
    DEBUG = job_pb2.LOG_LEVEL_DEBUG
    INFO = job_pb2.LOG_LEVEL_INFO
    WARN = job_pb2.LOG_LEVEL_WARN
    ERROR = job_pb2.LOG_LEVEL_ERROR


@dataclass(frozen=True)
class Progress:
    """How far a job has come. A handler sets what it knows; ``fraction`` None means the
    amount of work is unknown. ``updated_at`` and ``eta`` are filled in on events only (the
    server derives the ETA)."""

    fraction: float | None = None
    message: str = ""
    stage: str = ""
    items_done: int = 0
    items_total: int = 0
    data: Mapping[str, AnyValue] = field(default_factory=dict)
    updated_at: datetime | None = None
    eta: datetime | None = None

    def to_proto(self, now: datetime) -> job_pb2.Progress:
        progress = job_pb2.Progress(
            message=self.message,
            stage=self.stage,
            items_done=self.items_done,
            items_total=self.items_total,
        )
        if self.fraction is not None:
            progress.fraction = self.fraction
        if self.data:
            progress.data.CopyFrom(_codec.to_struct(self.data))
        progress.updated_at.CopyFrom(_codec.to_timestamp(now))
        return progress

    @classmethod
    def from_proto(cls, progress: job_pb2.Progress) -> Progress:
        return cls(
            fraction=progress.fraction if progress.HasField("fraction") else None,
            message=progress.message,
            stage=progress.stage,
            items_done=progress.items_done,
            items_total=progress.items_total,
            data=_codec.from_struct(progress.data) if progress.HasField("data") else {},
            updated_at=_codec.from_timestamp(progress.updated_at)
            if progress.HasField("updated_at")
            else None,
            eta=_codec.from_timestamp(progress.eta) if progress.HasField("eta") else None,
        )


@dataclass(frozen=True)
class StateChanged:
    """The job changed state. ``job`` is its snapshot at delivery (without attempts);
    ``error`` the failure, for RETRYING and FAILED."""

    state: JobState
    reason: str
    worker_id: str
    error: job_pb2.JobError | None
    job: job_pb2.Job | None


@dataclass(frozen=True)
class LogLine:
    level: LogLevel
    message: str
    time: datetime | None


@dataclass(frozen=True)
class StopRequested:
    """CancelJob or PauseJob reached the running job; its worker was told to stop."""

    target_state: JobState
    reason: str


@dataclass(frozen=True)
class SignalReceived:
    """SignalJob delivered a signal to the job; its payload is in the job's next lease."""

    name: str


EventKind = StateChanged | Progress | LogLine | StopRequested | SignalReceived


@dataclass(frozen=True)
class JobEvent:
    sequence: int
    job_id: str
    time: datetime | None
    attempt: int
    kind: EventKind

    @property
    def is_terminal(self) -> bool:
        """A change into SUCCEEDED, FAILED or CANCELLED: the last event of a job's stream."""
        return isinstance(self.kind, StateChanged) and self.kind.state.is_terminal

    @classmethod
    def from_proto(cls, event: job_pb2.JobEvent) -> JobEvent | None:
        """The typed event, or None for a kind this SDK does not know (a newer server's)."""
        which = event.WhichOneof("event")
        kind: EventKind
        if which == "state_changed":
            changed = event.state_changed
            kind = StateChanged(
                state=JobState.parse(changed.state),
                reason=changed.reason,
                worker_id=changed.worker_id,
                error=changed.error if changed.HasField("error") else None,
                job=changed.job if changed.HasField("job") else None,
            )
        elif which == "progress":
            kind = Progress.from_proto(event.progress)
        elif which == "log":
            kind = LogLine(
                level=_log_level(event.log.level),
                message=event.log.message,
                time=_codec.from_timestamp(event.log.time) if event.log.HasField("time") else None,
            )
        elif which == "stop_requested":
            kind = StopRequested(
                target_state=JobState.parse(event.stop_requested.target_state),
                reason=event.stop_requested.reason,
            )
        elif which == "signal_received":
            kind = SignalReceived(name=event.signal_received.name)
        else:
            return None
        return cls(
            sequence=event.sequence,
            job_id=event.job_id,
            time=_codec.from_timestamp(event.time) if event.HasField("time") else None,
            attempt=event.attempt,
            kind=kind,
        )


def _log_level(value: int) -> LogLevel:
    try:
        return LogLevel(value)
    except ValueError:
        return LogLevel.UNSPECIFIED
