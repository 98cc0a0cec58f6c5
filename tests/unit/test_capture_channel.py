"""CaptureChannel and the capture processor's bookkeeping, without a vLLM engine.

Frames come from the real ``FrameSender`` (in threads, and in a subprocess that finds the
socket through the inherited environment variable, as vLLM's engine core does) or from raw
sockets when the test needs malformed bytes.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from enum import Enum, auto
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.worker.capture import (
    CAPTURE_EXTRA_ARG,
    CAPTURE_SOCKET_ENV,
    FRAME_HEADER,
    CaptureBusyError,
    CaptureChannel,
    CaptureError,
    CaptureProcessorCore,
    FrameSender,
    encode_frame_header,
    fit_to_vocab,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def channel() -> Iterator[CaptureChannel]:
    ch = CaptureChannel()
    ch.start()
    try:
        yield ch
    finally:
        ch.close()


def _sender(ch: CaptureChannel) -> FrameSender:
    assert ch.socket_path is not None
    return FrameSender(os.fspath(ch.socket_path))


def _row(seed: int, n: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


# -- channel ------------------------------------------------------------------------------------
async def test_channel_start_sets_env_and_close_cleans_up() -> None:
    ch = CaptureChannel()
    ch.start()
    path = ch.socket_path
    assert path is not None and path.exists()
    assert os.environ[CAPTURE_SOCKET_ENV] == os.fspath(path)
    ch.close()
    assert not path.exists()
    assert CAPTURE_SOCKET_ENV not in os.environ


async def test_channel_delivers_frame_sent_after_wait(channel: CaptureChannel) -> None:
    key = channel.new_key()
    row = _row(1)
    waiter = asyncio.create_task(channel.wait(key, timeout_s=5.0))
    await asyncio.sleep(0.01)  # the waiter is registered before the frame exists
    sender = _sender(channel)
    threading.Thread(target=sender.send, args=(key.encode(), 0, row)).start()
    got = await waiter
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, row)
    assert channel.pending == 0
    assert channel.buffered_bytes == 0


async def test_channel_delivers_frame_sent_before_wait(channel: CaptureChannel) -> None:
    key = channel.new_key()
    row = _row(2)
    assert _sender(channel).send(key.encode(), 0, row)
    await _until(lambda: channel.buffered_bytes == row.nbytes)
    np.testing.assert_array_equal(await channel.wait(key, timeout_s=1.0), row)
    assert channel.buffered_bytes == 0


async def test_channel_wait_for_seq_skips_partial_prefill_frames(channel: CaptureChannel) -> None:
    """Chunked prefill: frames 0 and 1 are partial rows; the engine says 2 is the final one."""
    sender = _sender(channel)
    key = channel.new_key()
    rows = [_row(10 + i) for i in range(3)]
    sender.send(key.encode(), 0, rows[0])
    waiter = asyncio.create_task(channel.wait(key, timeout_s=5.0, seq=2))
    sender.send(key.encode(), 1, rows[1])
    await asyncio.sleep(0.05)
    assert not waiter.done()
    sender.send(key.encode(), 2, rows[2])
    np.testing.assert_array_equal(await waiter, rows[2])

    # Already buffered when the engine output is processed: the latest frame is taken.
    key2 = channel.new_key()
    sender.send(key2.encode(), 0, rows[0])
    sender.send(key2.encode(), 1, rows[1])
    await _until(lambda: channel.stats.frames == 5)
    np.testing.assert_array_equal(await channel.wait(key2, timeout_s=1.0, seq=1), rows[1])
    assert channel.buffered_bytes == 0


async def test_channel_wait_times_out_and_forgets_key(channel: CaptureChannel) -> None:
    key = channel.new_key()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await channel.wait(key, timeout_s=0.1)
    assert 0.09 <= time.monotonic() - start < 2.0
    assert channel.pending == 0
    # A late frame for the dead key is read past and dropped.
    assert _sender(channel).send(key.encode(), 0, _row(3))
    await _until(lambda: channel.stats.dropped_unknown_key == 1)
    assert channel.buffered_bytes == 0
    with pytest.raises(KeyError):
        await channel.wait(key, timeout_s=0.1)


async def test_channel_cancelled_wait_forgets_key(channel: CaptureChannel) -> None:
    key = channel.new_key()
    task = asyncio.create_task(channel.wait(key, timeout_s=10.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert channel.pending == 0


async def test_channel_drops_unknown_keys_and_stays_in_sync(channel: CaptureChannel) -> None:
    sender = _sender(channel)
    known = channel.new_key()
    for i in range(5):
        sender.send(f"never-issued-{i}".encode(), 0, _row(i, n=300_000))
    sender.send(known.encode(), 0, _row(99))
    np.testing.assert_array_equal(await channel.wait(known, timeout_s=5.0), _row(99))
    assert channel.stats.dropped_unknown_key == 5
    assert channel.buffered_bytes == 0


async def test_channel_bounds_pending_keys_and_expires_them() -> None:
    ch = CaptureChannel(max_pending=3, key_ttl_s=0.2)
    ch.start()
    try:
        keys = [ch.new_key() for _ in range(3)]
        assert len(set(keys)) == 3
        with pytest.raises(CaptureBusyError):
            ch.new_key()
        # A key being waited on is never expired under its waiter.
        waiter = asyncio.create_task(ch.wait(keys[0], timeout_s=5.0))
        await asyncio.sleep(0.3)
        ch.new_key()  # the two unwaited keys expired, freeing room
        assert ch.pending == 2
        assert _sender(ch).send(keys[0].encode(), 0, _row(4))
        np.testing.assert_array_equal(await waiter, _row(4))
    finally:
        ch.close()


async def test_channel_bounds_buffered_bytes() -> None:
    row = _row(5, n=1000)
    ch = CaptureChannel(max_buffered_bytes=int(row.nbytes * 1.5))
    ch.start()
    try:
        sender = _sender(ch)
        first, second = ch.new_key(), ch.new_key()
        sender.send(first.encode(), 0, row)
        sender.send(second.encode(), 0, row)  # would exceed the budget: this key fails
        await _until(lambda: ch.stats.frames == 2)
        assert ch.buffered_bytes == row.nbytes
        assert ch.stats.dropped_overflow == 1
        with pytest.raises(CaptureError, match="buffer full"):
            await ch.wait(second, timeout_s=1.0)
        np.testing.assert_array_equal(await ch.wait(first, timeout_s=1.0), row)
        assert ch.buffered_bytes == 0
    finally:
        ch.close()


async def test_channel_many_concurrent_keys_over_several_connections(
    channel: CaptureChannel,
) -> None:
    n_keys = 300
    keys = [channel.new_key() for _ in range(n_keys)]
    rows = {k: _row(i, n=2048) for i, k in enumerate(keys)}
    # Half the waits start before their frames exist, half after.
    early = [asyncio.create_task(channel.wait(k, timeout_s=20.0)) for k in keys[::2]]

    def send_some(chunk: list[str], seed: int) -> None:
        sender = _sender(channel)
        order = chunk[:]
        random.Random(seed).shuffle(order)
        for k in order:
            assert sender.send(k.encode(), 0, rows[k])
        sender.close()

    threads = [
        threading.Thread(target=send_some, args=(keys[i::3], i), daemon=True) for i in range(3)
    ]
    for t in threads:
        t.start()
    late = [asyncio.create_task(channel.wait(k, timeout_s=20.0)) for k in keys[1::2]]
    results = await asyncio.gather(*early, *late)
    for key, got in zip([*keys[::2], *keys[1::2]], results, strict=True):
        np.testing.assert_array_equal(got, rows[key])
    for t in threads:
        t.join(timeout=5)
    assert channel.pending == 0
    assert channel.buffered_bytes == 0
    assert channel.stats.connections == 3


async def test_channel_closes_connection_on_malformed_frame(channel: CaptureChannel) -> None:
    assert channel.socket_path is not None
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(os.fspath(channel.socket_path))
    raw.sendall(b"GARBAGE-GARBAGE-GARBAGE")
    await _until(lambda: channel.stats.protocol_errors == 1)
    raw.close()
    # Too-large frames are refused before any allocation.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(os.fspath(channel.socket_path))
    raw.sendall(encode_frame_header(b"k", 0, channel.max_frame_values + 1))
    await _until(lambda: channel.stats.protocol_errors == 2)
    raw.close()
    # The channel still serves well-behaved senders.
    key = channel.new_key()
    _sender(channel).send(key.encode(), 0, _row(6))
    np.testing.assert_array_equal(await channel.wait(key, timeout_s=5.0), _row(6))


async def test_channel_close_fails_waiters(channel: CaptureChannel) -> None:
    key = channel.new_key()
    waiter = asyncio.create_task(channel.wait(key, timeout_s=10.0))
    await asyncio.sleep(0.01)
    channel.close()
    with pytest.raises(CaptureError, match="closed"):
        await waiter
    with pytest.raises(CaptureError):
        channel.new_key()


async def test_channel_receives_from_subprocess_through_inherited_env(
    channel: CaptureChannel,
) -> None:
    """How the engine core finds the channel: the socket path is in its environment."""
    key = channel.new_key()
    code = (
        "import numpy as np, sys\n"
        "from service.worker.capture import FrameSender, CAPTURE_SOCKET_ENV\n"
        "import os\n"
        "s = FrameSender(os.environ[CAPTURE_SOCKET_ENV])\n"
        "ok = s.send(sys.argv[1].encode(), 7, np.arange(49152, dtype=np.float32))\n"
        "sys.exit(0 if ok else 1)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, key, cwd=REPO_ROOT, env=dict(os.environ)
    )
    got = await channel.wait(key, timeout_s=20.0, seq=7)
    assert await proc.wait() == 0
    np.testing.assert_array_equal(got, np.arange(49152, dtype=np.float32))


def test_sender_without_channel_drops_frames_without_raising(tmp_path: Path) -> None:
    sender = FrameSender(os.fspath(tmp_path / "absent.sock"), reconnect_interval_s=10.0)
    assert not sender.send(b"k", 0, _row(7))
    assert not sender.send(b"k", 1, _row(7))  # no reconnect storm: second try is skipped
    assert sender.frames_dropped == 2
    assert not FrameSender(None).send(b"k", 0, _row(7))


def test_sender_reconnects_after_channel_restart(tmp_path: Path) -> None:
    """An engine core outliving a worker's channel (or vice versa) recovers on its own."""

    async def scenario() -> None:
        first = CaptureChannel(socket_dir=tmp_path)
        first.start()
        assert first.socket_path is not None
        sender = FrameSender(os.fspath(first.socket_path), reconnect_interval_s=0.0)
        key = first.new_key()
        assert sender.send(key.encode(), 0, _row(8))
        np.testing.assert_array_equal(await first.wait(key, timeout_s=5.0), _row(8))
        first.close()
        # The worker's side went away: the next send fails (dropped), later ones reconnect.
        for _ in range(3):
            if not sender.send(b"x", 0, _row(8)):
                break
        assert sender.frames_dropped >= 1

    asyncio.run(scenario())


def test_frame_header_layout() -> None:
    header = encode_frame_header(b"abc", 5, 10)
    assert len(header) == FRAME_HEADER.size + 3
    assert FRAME_HEADER.unpack(header[: FRAME_HEADER.size]) == (b"OGC1", 3, 5, 10)
    with pytest.raises(ValueError):
        encode_frame_header(b"", 0, 1)
    with pytest.raises(ValueError):
        encode_frame_header(b"x" * 200, 0, 1)


def test_fit_to_vocab_trims_and_pads() -> None:
    row = np.arange(10, dtype=np.float32)
    assert fit_to_vocab(row, 10) is row
    np.testing.assert_array_equal(fit_to_vocab(row, 8), row[:8])
    padded = fit_to_vocab(row, 12)
    np.testing.assert_array_equal(padded[:10], row)
    assert np.isneginf(padded[10:]).all()


# -- processor bookkeeping (torch only, no engine) --------------------------------------------
class _Direction(Enum):  # stands in for vllm's MoveDirectionality (matched by name)
    UNIDIRECTIONAL = auto()
    SWAP = auto()


def _params(key: str | None) -> SimpleNamespace:
    return SimpleNamespace(extra_args={CAPTURE_EXTRA_ARG: key} if key else None, max_tokens=1)


def _update(
    removed: list[int] | None = None,
    added: list[tuple[int, str | None]] | None = None,
    moved: list[tuple[int, int, _Direction]] | None = None,
) -> SimpleNamespace:
    return SimpleNamespace(
        batch_size=0,
        removed=removed or [],
        added=[(i, _params(k), [1, 2], []) for i, k in (added or [])],
        moved=moved or [],
    )


def _keys_by_row(core: CaptureProcessorCore) -> dict[int, str]:
    return {row: state.key.decode() for row, state in core._rows.items()}


def test_processor_update_state_follows_removed_added_moved() -> None:
    core = CaptureProcessorCore(None, "cpu", False)
    core.update_state(None)
    core.update_state(_update(added=[(0, "a"), (1, None), (2, "c"), (3, "d")]))
    assert _keys_by_row(core) == {0: "a", 2: "c", 3: "d"}
    # Row 0 finishes; a plain request takes row 2's place (its capture state must go).
    core.update_state(_update(removed=[0], added=[(2, None)]))
    assert _keys_by_row(core) == {3: "d"}
    # Condense: 3 -> 0 one way.
    core.update_state(_update(moved=[(3, 0, _Direction.UNIDIRECTIONAL)]))
    assert _keys_by_row(core) == {0: "d"}
    core.update_state(_update(added=[(1, "e")]))
    core.update_state(_update(moved=[(0, 1, _Direction.SWAP)]))
    assert _keys_by_row(core) == {0: "e", 1: "d"}
    # Swap with an empty (non-capture) row carries the state across and leaves nothing behind.
    core.update_state(_update(moved=[(1, 5, _Direction.SWAP)]))
    assert _keys_by_row(core) == {0: "e", 5: "d"}
    # Removed, then added at the same index in one update: the new request wins.
    core.update_state(_update(removed=[5], added=[(5, "f")]))
    assert _keys_by_row(core) == {0: "e", 5: "f"}


def test_processor_validate_params() -> None:
    CaptureProcessorCore.validate_params(SimpleNamespace(extra_args=None, max_tokens=50))
    CaptureProcessorCore.validate_params(_params("abc"))
    with pytest.raises(ValueError, match="max_tokens=1"):
        CaptureProcessorCore.validate_params(
            SimpleNamespace(extra_args={CAPTURE_EXTRA_ARG: "k"}, max_tokens=2, n=1)
        )
    for bad in (42, "", "x" * 500, "ключ"):
        with pytest.raises(ValueError):
            CaptureProcessorCore.validate_params(
                SimpleNamespace(extra_args={CAPTURE_EXTRA_ARG: bad}, max_tokens=1)
            )


async def test_processor_apply_v1_ships_rows_and_forces_frame_numbers(
    channel: CaptureChannel,
) -> None:
    torch = pytest.importorskip("torch")
    core = CaptureProcessorCore(None, torch.device("cpu"), False)  # reads the env var
    key_a, key_b = channel.new_key(), channel.new_key()
    core.update_state(_update(added=[(0, None), (1, key_a), (2, None), (3, key_b)]))
    vocab = 4096
    logits = torch.randn(4, vocab, dtype=torch.float32)
    original = logits.clone()
    out = core.apply(logits)
    assert out is logits
    # Other requests' rows are untouched, bit for bit.
    assert torch.equal(out[0], original[0]) and torch.equal(out[2], original[2])
    # Capture rows now sample their frame number (0 on the first step).
    assert out[1].argmax().item() == 0 and out[3].argmax().item() == 0
    assert torch.isneginf(out[1, 1:]).all()
    got_a = await channel.wait(key_a, timeout_s=5.0, seq=0)
    got_b = await channel.wait(key_b, timeout_s=5.0, seq=0)
    expected = torch.log_softmax(original, dim=-1).numpy()
    np.testing.assert_array_equal(got_a, expected[1])
    np.testing.assert_array_equal(got_b, expected[3])
    # A second step (chunked prefill continues): frame 1, token 1.
    key_c = channel.new_key()
    core.update_state(_update(removed=[3], added=[(3, key_c)]))
    logits = torch.randn(4, vocab)
    out = core.apply(logits.clone())
    assert out[1].argmax().item() == 1 and out[3].argmax().item() == 0
    np.testing.assert_allclose(
        await channel.wait(key_c, timeout_s=5.0, seq=0),
        torch.log_softmax(logits[3], dim=-1).numpy(),
    )
    # No capture rows: the tensor passes through without work.
    core.update_state(_update(removed=[1, 3]))
    plain = torch.randn(2, vocab)
    assert torch.equal(core.apply(plain.clone()), plain)
    core.close()


async def test_processor_apply_v2_maps_rows_to_slots(channel: CaptureChannel) -> None:
    torch = pytest.importorskip("torch")
    core = CaptureProcessorCore(None, SimpleNamespace())  # V2 signature: (config, req_states)
    key = channel.new_key()
    assert core.add_request(7, _params(key)) is True
    assert core.add_request(2, _params(None)) is False
    # Row order differs from slot order in V2: row 1 holds slot 7.
    ctx = SimpleNamespace(
        idx_mapping_np=np.array([2, 7, 4]),
        expanded_idx_mapping=torch.tensor([2, 7, 4]),
    )
    logits = torch.randn(3, 512)
    original = logits.clone()
    out = core.apply(logits, ctx)
    assert torch.equal(out[0], original[0]) and torch.equal(out[2], original[2])
    assert out[1].argmax().item() == 0
    np.testing.assert_array_equal(
        await channel.wait(key, timeout_s=5.0, seq=0),
        torch.log_softmax(original[1], dim=-1).numpy(),
    )
    # The slot is recycled for a plain request: no capture any more.
    assert core.add_request(7, _params(None)) is False
    plain = torch.randn(3, 512)
    assert torch.equal(core.apply(plain.clone(), ctx), plain)
