-- The W3C trace context (`traceparent`, `tracestate`) an enqueue carried, kept with its job so
-- that the server's claim and settle spans and the worker's handler span join the producer's
-- trace. Both NULL for a job enqueued without one. Nullable columns without a default: adding
-- them rewrites nothing.
ALTER TABLE jobs ADD COLUMN traceparent text, ADD COLUMN tracestate text;
-- The archive keeps every column of the jobs it holds (migration 0020).
ALTER TABLE jobs_archive ADD COLUMN traceparent text, ADD COLUMN tracestate text;
