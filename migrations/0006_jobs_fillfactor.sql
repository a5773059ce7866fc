-- Progress reports rewrite a running job's row many times without touching an indexed column
-- (progress, progress_origin, checkpoint). Such an update can stay on its page (a HOT update,
-- adding no entry to any of the table's indexes) only if the page has room: leave a fifth of
-- each new page free for them. Pages written before this change keep their old fill.
ALTER TABLE jobs SET (fillfactor = 80);
