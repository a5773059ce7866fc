"""The worker runtime: register handlers by job type, then ``await worker.run()``.

Pieces, one job each: ``_wire`` (every protocol message, built and read), ``_runtime`` (the
worker, its lifecycle and one stream at a time), ``_executor`` (handler tasks, slots, the
prefetch queue, deadlines), ``_reports`` (progress, logs and checkpoints), ``_outbox`` (results
and hand-backs until acknowledged), ``context`` (what a handler sees).
"""

from jobwire.worker._runtime import Worker
from jobwire.worker.context import JobContext, Signal, Stopped, StopReason

__all__ = ["JobContext", "Signal", "StopReason", "Stopped", "Worker"]
