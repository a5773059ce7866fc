-- Leadership as a lease: one row, held by the replica whose loop keeps renewing it. A replica
-- that stops making progress (a paused VM, a hung runtime) stops renewing, and another takes
-- the row over once it expires, with the next term. Every statement a leader runs is fenced by
-- its term, so a stalled leader that wakes up changes nothing as leader. (Leadership was a
-- session advisory lock, which a stalled process keeps as long as its connection lives.)
CREATE TABLE leader (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    -- Who holds it: a name drawn by each server process at start.
    holder     text NOT NULL,
    -- The holder's application_name, for its successor to end its sessions left idle in a
    -- transaction (and the locks they hold).
    holder_app text NOT NULL,
    -- The fencing token: one more at each change of holder.
    term       bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
