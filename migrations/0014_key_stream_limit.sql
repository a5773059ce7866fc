-- The streams a key may hold open at once on each replica (worker connections and watches),
-- so one tenant's leak of streams cannot exhaust a replica for the others. NULL: the server's
-- default (--max-streams-per-key).
ALTER TABLE api_keys ADD COLUMN max_streams integer CHECK (max_streams > 0);
