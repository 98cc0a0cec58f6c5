"""State several gateway processes share: limits (admission) and the console's live view.

With `OCTOGRAPH_REDIS_URL` unset everything stays in the process (the embedded default needs no
server); with it set, the stores here keep that state in one Redis for every replica."""
