"""Item-based jobs: a job whose payload declares a list of items, run one by one, each done or
failed on its own, resumed from the first unfinished item after a crash, a pause or a retry,
and ending with every item's outcome as its result.

Built on what the server offers every job: durable checkpoints, progress counted in items (from
which the server derives an ETA) and the job's result.

The result and the checkpoint are the message ``jobwire.sdk.v1.ItemResults``, the same bytes
the Rust SDK's ``jobwire::items`` writes, so either SDK reads the other's results::

    message ItemResults { repeated ItemOutcome outcomes = 1; }   // in item order
    message ItemOutcome { oneof outcome { bytes output = 1; ItemFailure failure = 2; } }
    message ItemFailure { string message = 1; string kind = 2; }

The checkpoint is the results so far, saved after every item by default and awaited before the
next item starts: an item runs again only when the worker died (or lost its lease) after the
item ran and before its checkpoint was stored. ``checkpoint_every`` and ``checkpoint_interval``
save less often for jobs of many quick items, at the price of re-running up to that many items
(or that much time's worth) after a crash. A done item without output takes 4 bytes of the
checkpoint, whose limit is 1 MiB (or the server's lower ``--max-payload-bytes``): outcomes
that outgrow it fail the job (kind ``items_too_large``) rather than being lost.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from jobwire.errors import Disconnected, HandlerError, InvalidArgument, NonRetryable, Retryable

if TYPE_CHECKING:
    from jobwire.worker.context import JobContext

T = TypeVar("T")
M = TypeVar("M", bound=Message)

#: The most checkpoint bytes the server accepts (its ``--max-payload-bytes`` may be lower).
MAX_CHECKPOINT_BYTES = 1024 * 1024

_PACKAGE = "jobwire.sdk.v1"


def _message_classes() -> tuple[type[Message], type[Message], type[Message]]:
    """Declares the three messages in the default descriptor pool (once) and returns their
    classes; built in code because they belong to the SDK, not to the protocol in proto/."""
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(f"{_PACKAGE}.ItemResults")
    except KeyError:
        field = descriptor_pb2.FieldDescriptorProto
        file = descriptor_pb2.FileDescriptorProto(
            name="jobwire/sdk/v1/items.proto", package=_PACKAGE, syntax="proto3"
        )
        failure = file.message_type.add(name="ItemFailure")
        failure.field.add(
            name="message", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL
        )
        failure.field.add(name="kind", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
        outcome = file.message_type.add(name="ItemOutcome")
        outcome.oneof_decl.add(name="outcome")
        outcome.field.add(
            name="output",
            number=1,
            type=field.TYPE_BYTES,
            label=field.LABEL_OPTIONAL,
            oneof_index=0,
        )
        outcome.field.add(
            name="failure",
            number=2,
            type=field.TYPE_MESSAGE,
            type_name=f".{_PACKAGE}.ItemFailure",
            label=field.LABEL_OPTIONAL,
            oneof_index=0,
        )
        results = file.message_type.add(name="ItemResults")
        results.field.add(
            name="outcomes",
            number=1,
            type=field.TYPE_MESSAGE,
            type_name=f".{_PACKAGE}.ItemOutcome",
            label=field.LABEL_REPEATED,
        )
        pool.Add(file)
    return (
        GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ItemResults")),
        GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ItemOutcome")),
        GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ItemFailure")),
    )


#: The message class of an item-based job's output: ``JobType("batch", Payload, ITEM_RESULTS)``.
ITEM_RESULTS, _ITEM_OUTCOME, _ITEM_FAILURE = _message_classes()


class OnItemFailure(enum.Enum):
    """What a failed item does to its job."""

    #: The failure is recorded as the item's outcome and the job goes on; it succeeds with
    #: every outcome in its result.
    COLLECT = "collect"
    #: The attempt fails with the item's error (its message prefixed with the item's index):
    #: a retryable error retries the job from that item, a non-retryable one fails the job.
    FAIL_JOB = "fail_job"


@dataclass(frozen=True)
class ItemOutcome:
    """How one item ended: done with its output (the encoded message; empty for none), or
    failed with a message and kind."""

    output: bytes | None = None
    error: str | None = None
    kind: str | None = None

    @property
    def done(self) -> bool:
        return self.error is None

    def output_as(self, message: type[M]) -> M | None:
        """The output decoded as ``message``; None when the item failed."""
        if self.output is None:
            return None
        return message.FromString(self.output)


@dataclass(frozen=True)
class ItemResults:
    """Every finished item's outcome, in item order: an item-based job's result."""

    outcomes: tuple[ItemOutcome, ...] = ()

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def done_count(self) -> int:
        return sum(1 for o in self.outcomes if o.done)

    @property
    def failed_count(self) -> int:
        return len(self.outcomes) - self.done_count

    @classmethod
    def from_message(cls, message: Message) -> ItemResults:
        """The results of an ``ITEM_RESULTS`` message, such as the output ``wait`` returns."""
        outcomes = []
        for raw in cast("Any", message).outcomes:
            if raw.WhichOneof("outcome") == "failure":
                kind = raw.failure.kind or None
                outcomes.append(ItemOutcome(error=raw.failure.message, kind=kind))
            else:
                outcomes.append(ItemOutcome(output=bytes(raw.output)))
        return cls(tuple(outcomes))

    @classmethod
    def parse(cls, data: bytes) -> ItemResults:
        return cls.from_message(ITEM_RESULTS.FromString(data))

    def to_message(self) -> Message:
        message = cast("Any", ITEM_RESULTS())
        for outcome in self.outcomes:
            raw = message.outcomes.add()
            if outcome.error is None:
                raw.output = outcome.output or b""
            else:
                raw.failure.message = outcome.error
                raw.failure.kind = outcome.kind or ""
        return cast("Message", message)


@dataclass(frozen=True)
class ItemOptions:
    """How an item-based job runs its items. ``checkpoint_every`` items (at least 1) finish
    between two checkpoints, or ``checkpoint_interval`` seconds pass with one finished."""

    on_failure: OnItemFailure = OnItemFailure.COLLECT
    checkpoint_every: int = 1
    checkpoint_interval: float | None = None


ItemHandler = Callable[["JobContext", T], Awaitable[Message | bytes | None]]


async def run_items(
    ctx: JobContext,
    items: Sequence[T],
    handler: ItemHandler[T],
    options: ItemOptions = ItemOptions(),
) -> ItemResults:
    """Runs ``items`` in order with ``handler`` (which returns the item's output: a message,
    bytes or None), resuming after the items the context's last checkpoint records,
    reporting progress in items and checkpointing as ``options`` say. Usable in any handler;
    ``Worker.register_items`` calls it.

    Between items it checks the context's cancellation: told to stop, it saves what is unsaved
    and raises, so the next attempt resumes at the next item; an item that fails after a stop
    is not recorded. Raises the item's error under ``OnItemFailure.FAIL_JOB``, and
    ``NonRetryable`` (kind ``items_checkpoint``) for a checkpoint that is not this job's
    results, (kind ``items_too_large``) for outcomes that outgrow a checkpoint.
    """
    outcomes = list(_resumed(ctx, len(items)).outcomes)
    saved = _Saved(len(outcomes))
    _report(ctx, outcomes, len(items))
    for index in range(len(outcomes), len(items)):
        if ctx.stop_reason is not None:
            await saved.flush(ctx, outcomes)
            raise Retryable(f"stopped before item {index}: {ctx.stop_reason}")
        try:
            output = await handler(ctx, items[index])
        except Exception as error:
            if ctx.stop_reason is not None:
                # Stopped mid-item: the item did not finish, so it runs again on resume.
                await saved.flush(ctx, outcomes)
                raise
            if options.on_failure is OnItemFailure.FAIL_JOB:
                await saved.flush(ctx, outcomes)
                raise _in_context(error, f"item {index}") from error
            message, kind = _describe(error)
            outcomes.append(ItemOutcome(error=message, kind=kind))
        else:
            outcomes.append(ItemOutcome(output=_encode(output)))
        _report(ctx, outcomes, len(items))
        if saved.is_due(options, len(outcomes)):
            await saved.flush(ctx, outcomes)
    return ItemResults(tuple(outcomes))


def _resumed(ctx: JobContext, items: int) -> ItemResults:
    data = ctx.last_checkpoint
    if not data:
        return ItemResults()
    try:
        results = ItemResults.parse(data)
    except ProtobufDecodeError as error:
        raise NonRetryable(
            f"the job's checkpoint is not its item results: {error}", kind="items_checkpoint"
        ) from error
    if len(results) > items:
        raise NonRetryable(
            f"the job's checkpoint records {len(results)} items, but the job has {items}",
            kind="items_checkpoint",
        )
    return results


def _report(ctx: JobContext, outcomes: list[ItemOutcome], total: int) -> None:
    failed = sum(1 for o in outcomes if not o.done)
    ctx.progress(
        len(outcomes) / total if total else None,
        items_done=len(outcomes),
        items_total=total,
        message=f"{failed} failed" if failed else "",
    )


def _encode(output: Message | bytes | None) -> bytes:
    if output is None:
        return b""
    if isinstance(output, bytes):
        return output
    return output.SerializeToString()


def _describe(error: Exception) -> tuple[str, str | None]:
    if isinstance(error, HandlerError):
        return error.message, error.kind
    return f"{type(error).__name__}: {error}", type(error).__name__


def _in_context(error: Exception, context: str) -> HandlerError:
    message, kind = _describe(error)
    retryable = error.retryable if isinstance(error, HandlerError) else True
    retry_after = error.retry_after if isinstance(error, HandlerError) else None
    cls = Retryable if retryable else NonRetryable
    return cls(f"{context}: {message}", kind=kind, retry_after=retry_after)


class _Saved:
    """What the server holds: how many outcomes, and since when (monotonic)."""

    def __init__(self, items: int) -> None:
        self.items = items
        self.at = time.monotonic()

    def is_due(self, options: ItemOptions, finished: int) -> bool:
        unsaved = finished - self.items
        if unsaved <= 0:
            return False
        if unsaved >= max(1, options.checkpoint_every):
            return True
        interval = options.checkpoint_interval
        return interval is not None and time.monotonic() - self.at >= interval

    async def flush(self, ctx: JobContext, outcomes: list[ItemOutcome]) -> None:
        """Saves the outcomes unless the server has them all, and waits until it stored them.
        A broken stream is no reason to fail the attempt (the worker reconnects and keeps the
        lease): the outcomes stay unsaved and go with the next checkpoint."""
        if len(outcomes) == self.items:
            return
        data = ItemResults(tuple(outcomes)).to_message().SerializeToString()
        if len(data) > MAX_CHECKPOINT_BYTES:
            raise NonRetryable(
                f"the outcomes of {len(outcomes)} items take {len(data)} bytes, more than a "
                f"checkpoint holds ({MAX_CHECKPOINT_BYTES}): split the job or make item "
                "outputs smaller",
                kind="items_too_large",
            )
        try:
            await ctx.checkpoint(data)
        except Disconnected:
            return
        except InvalidArgument as error:
            raise NonRetryable(
                f"the server refused the checkpoint: {error}", kind="items_too_large"
            ) from error
        self.items = len(outcomes)
        self.at = time.monotonic()
