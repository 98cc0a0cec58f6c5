"""The zygote: one process imports what the workers import, once, and forks every worker.

Why: a worker's start began with importing torch and vLLM, 7-8 s alone and ~11 s when two
workers import at once on 2 cores, paid by each of the three workers of the default stack
(README "Memory and start"). A worker forked from a process that already imported them starts
past that point, and shares those pages with its siblings (copy-on-write) instead of holding a
copy of its own. The engine core that vLLM forks from each worker inherits them in turn.

`octograph up` starts the zygote with the workers' environment (the allowlisted one), and asks
it for each worker with that worker's command line, environment and log file. A forked worker
starts a new session (its pid is its process group, as with `Popen(start_new_session=True)`),
writes to its log on stdout/stderr, sees exactly the environment it was given, and shows its
own command line in `ps`. The zygote reaps its children and reports each exit status, so
`octograph up` supervises a forked worker as it does a spawned one (`ForkedProcess` has
`Popen`'s `pid`, `poll` and `wait`).

Protocol, one JSON object per line. The zygote reads requests on stdin and answers on the file
descriptor that was its stdout; its own stdout goes to its stderr (its log), so nothing an
import prints can reach the protocol:

    zygote -> parent   {"ready": seconds}                  once, after the imports
    parent -> zygote   {"argv": [...], "env": {...}, "log": path, "append": bool, "title": str}
    zygote -> parent   {"pid": N} or {"error": text}       one per request, in order
    zygote -> parent   {"exited": N, "code": C}            C as Popen.returncode gives it

End of stdin (the parent closed it or died) ends the zygote; its children keep running (they
are stopped by their process groups) and a queued one notices that its parent changed
(service/start_gate.py).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

# How long a fork request may wait for its answer: the zygote answers once its imports are done
# (seconds; a cold first start on a slow machine, minutes).
FORK_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------------------
# The zygote process.
# ---------------------------------------------------------------------------------------------
def serve_zygote(preload: Sequence[str]) -> int:
    """Import `preload`, then fork a child per request read on stdin until stdin ends."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # imports that print reach the log, not the protocol
    started = time.monotonic()
    for name in preload:
        importlib.import_module(name)
    # What the imports allocated stays out of the collector's sight in every child: a
    # collection would touch (and so copy) those pages in each of them.
    gc.collect()
    gc.freeze()
    _send(replies, {"ready": round(time.monotonic() - started, 3)})

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd fires
    keep_closed = [replies.fileno(), wake_r, wake_w]
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap(replies)
                continue
            data = os.read(0, 1 << 16)
            if not data:
                return 0
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    _send(replies, _fork_one(line, keep_closed))
        _reap(replies)  # a child may have exited while a request was being answered


def _send(replies: IO[str], message: dict[str, Any]) -> None:
    replies.write(json.dumps(message) + "\n")


def _reap(replies: IO[str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(replies, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork_one(line: bytes, keep_closed: list[int]) -> dict[str, Any]:
    try:
        request = json.loads(line)
        argv = [str(a) for a in request["argv"]]
        env = {str(k): str(v) for k, v in request["env"].items()}
        log = str(request["log"])
        append = bool(request.get("append", False))
        title = str(request.get("title") or " ".join(argv))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return {"error": f"bad request: {exc}"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        return {"error": f"fork failed: {exc}"}
    if pid == 0:
        _become_child(argv, env, log, append, title, keep_closed)  # never returns
    return {"pid": pid}


def _become_child(
    argv: list[str], env: dict[str, str], log: str, append: bool, title: str, close: list[int]
) -> None:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        out = os.open(log, flags, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        _set_title(title)  # first: setproctitle finds argv's memory through the environment
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [sys.argv[0], *argv]
        from service.cli import main

        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")  # as the interpreter prints sys.exit("message")
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # What an interpreter's exit would run (vLLM's engine shutdown, multiprocessing's
        # children, log handlers), then leave without unwinding into the zygote's loop.
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _set_title(title: str) -> None:
    """`ps` shows the worker's command line; /proc/PID/environ keeps showing the environment
    the zygote was started with (SPT_NOENV: setproctitle may use the room of the zygote's own
    command line only, so a longer title is cut)."""
    try:
        import setproctitle
    except ImportError:  # only `ps` loses the worker's command line
        return
    os.environ["SPT_NOENV"] = "1"
    setproctitle.setproctitle(title)


# ---------------------------------------------------------------------------------------------
# The parent's side.
# ---------------------------------------------------------------------------------------------
class ZygoteError(RuntimeError):
    """The zygote could not fork (it died, or answered with an error)."""


class Zygote:
    """A running zygote, as `octograph up` holds it: fork workers, learn their exits."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.ready_s: float | None = None
        self._ready = threading.Event()
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._exits: dict[int, int] = {}
        self._changed = threading.Condition()
        self._lock = threading.Lock()  # one request and its answer at a time
        self._gone = False
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="octograph-zygote", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, preload: Sequence[str], env: dict[str, str], log_path: Path) -> Zygote:
        cmd = [sys.executable, "-m", "service.cli", "zygote"]
        for name in preload:
            cmd += ["--preload", name]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        return cls(proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return not self._gone and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = FORK_TIMEOUT_S) -> float:
        """Seconds the zygote's imports took, once they are done."""
        if not self._ready.wait(timeout_s) or self.ready_s is None:
            raise ZygoteError(f"the zygote was not ready in {timeout_s:.0f}s ({self._tail()})")
        return self.ready_s

    def fork(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: Path,
        *,
        append: bool = False,
        title: str = "",
        timeout_s: float = FORK_TIMEOUT_S,
    ) -> ForkedProcess:
        request = {
            "argv": list(argv),
            "env": env,
            "log": str(log_path),
            "append": append,
            "title": title,
        }
        with self._lock:
            if not self.alive or self.proc.stdin is None:
                raise ZygoteError(f"the zygote is gone ({self._tail()})")
            try:
                self.proc.stdin.write(json.dumps(request).encode() + b"\n")
                self.proc.stdin.flush()
            except OSError as exc:
                raise ZygoteError(f"the zygote is gone: {exc}") from exc
            try:
                reply = self._replies.get(timeout=timeout_s)
            except queue.Empty:
                raise ZygoteError(f"the zygote did not answer in {timeout_s:.0f}s") from None
        if "pid" not in reply:
            raise ZygoteError(str(reply.get("error", reply)))
        return ForkedProcess(int(reply["pid"]), self, title or " ".join(argv))

    def returncode(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout_s: float | None) -> int | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while pid not in self._exits and not self._gone:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._changed.wait(left)
            return self._exits.get(pid)

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """End the zygote (its children are not touched). Once: stop_workers closes the
        launcher its workers share, and `octograph up` closes it also when none started."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if "ready" in message:
                    self.ready_s = float(message["ready"])
                    self._ready.set()
                elif "exited" in message:
                    with self._changed:
                        self._exits[int(message["exited"])] = int(message["code"])
                        self._changed.notify_all()
                else:
                    self._replies.put(message)
        except (OSError, ValueError):  # the pipe closed under us at close()
            pass
        finally:
            with self._changed:
                self._gone = True
                self._changed.notify_all()
            self._ready.set()
            self._replies.put({"error": f"the zygote exited ({self._tail()})"})

    def _tail(self) -> str:
        code = self.proc.poll()
        state = "running" if code is None else f"exit code {code}"
        try:
            last = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            last = []
        return f"{state}; see {self.log_path}" + (f": {last[0][:200]}" if last else "")


class ForkedProcess:
    """A process the zygote forked, with the part of `Popen`'s interface supervision uses."""

    def __init__(self, pid: int, zygote: Zygote, title: str) -> None:
        self.pid = pid
        self.args = title
        self._zygote = zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.returncode(self.pid)
            if self.returncode is None and not self._zygote.alive and not _exists(self.pid):
                # The zygote died before reporting; init reaped the process: status unknown.
                self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            if self._zygote.alive:
                self._zygote.wait_exit(self.pid, left)
            else:
                time.sleep(0.05 if left is None else min(0.05, max(left, 0.0)))
        return self.returncode if self.returncode is not None else -1


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shown_args(cmdline: Sequence[str]) -> list[str]:
    """A process's arguments from its /proc command line (`psutil.Process.cmdline()`), also for
    a forked worker, whose title setproctitle writes as one space-separated string padded with
    NULs (read back as [title, "", "", ...])."""
    if len(cmdline) > 1 and any(cmdline[1:]):
        return list(cmdline)
    return " ".join(cmdline).split()
