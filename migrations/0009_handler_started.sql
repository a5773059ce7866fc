-- When the running attempt's handler started, as its worker reported it; NULL until then. An
-- attempt whose lease lapses before its handler started (claimed ahead and lost with its server,
-- or a claim whose commit reached no one) does not count against max_attempts. A claim by a
-- worker that does not report its starts sets it at once, as every attempt of such a worker
-- counted before.
ALTER TABLE jobs ADD COLUMN handler_started_at timestamptz;
UPDATE jobs SET handler_started_at = attempt_started_at WHERE state = 'running';
