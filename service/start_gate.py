"""A worker's start gate: `octograph up` starts at most one worker per core at a time.

Workers started together on fewer cores than workers share them, and the one whose start is
longest (Gemma-3: the biggest weights and a 262k-token tokenizer to parse) finishes last, slowed
by the others all the way. With a core each for the first ones and the rest queued, the longest
start runs on a core of its own and the queued ones use the core the short starts free (the
default stack on 2 cores: /readyz in ~30 s instead of ~45 s). A queued worker is a process that
waits here, before importing anything heavy, until `octograph up` opens its gate (creates the
file); so its port, log and process group exist from the start like every other worker's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POLL_S = 0.1


def open_gate(path: Path) -> None:
    path.touch()


def wait_for_gate(path: Path, starter: int, poll_s: float = POLL_S) -> None:
    """Return when `path` exists; exit if `starter` (the pid of the process that started this
    one and will open the gate) is no longer this process's parent: nothing would open it."""
    while not path.exists():
        if os.getppid() != starter:
            raise SystemExit(f"start gate {path}: the process that started this one is gone")
        time.sleep(poll_s)
