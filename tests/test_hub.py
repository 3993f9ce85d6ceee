"""Caption fan-out: ordering, filters, replay, only_changes, slow consumers, and a real WebSocket."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from streamer.publish import hub as hub_module
from streamer.publish.hub import CaptionHub, Subscription, SubscriptionClosed
from streamer.types import Caption

pytestmark = pytest.mark.timeout(30)


def cap(stream: str, index: int, text: str | None = None, *, emit: float | None = None) -> Caption:
    return Caption(
        stream_id=stream,
        index=index,
        start=float(index),
        end=index + 3.0,
        text=f"{stream} caption {index}" if text is None else text,
        confidence=-0.2,
        model="tiny",
        capture_time=1000.0 + index,
        emit_time=1000.5 + index if emit is None else emit,
    )


async def read(sub: Subscription, n: int) -> list[dict[str, Any]]:
    return [json.loads((await sub.get()).encoded) for _ in range(n)]


async def read_pending(sub: Subscription) -> list[dict[str, Any]]:
    return await read(sub, sub.pending)


def summary(msgs: list[dict[str, Any]]) -> list[tuple]:
    return [(m["type"], m["stream_id"], m.get("index", m.get("state"))) for m in msgs]


def test_public_api() -> None:
    assert set(hub_module.__all__) == {"BusLink", "CaptionHub", "HubMessage", "Subscription", "SubscriptionClosed"}


async def test_many_subscribers_get_every_message_in_order() -> None:
    hub = CaptionHub(queue_size=64)
    subs = [hub.subscribe() for _ in range(50)]
    assert hub.subscriber_count == 50
    n = 500

    async def reader(sub: Subscription) -> list[int]:
        return [m["index"] for m in await read(sub, n)]

    readers = [asyncio.create_task(reader(s)) for s in subs]
    for i in range(n):
        hub.publish_caption(cap("cam", i))
        if i % 16 == 15:
            await asyncio.sleep(0)  # let readers run; publishing itself never waits
    results = await asyncio.gather(*readers)
    assert all(r == list(range(n)) for r in results)
    assert hub.messages_published == n
    assert hub.subscribers_dropped_slow == 0


async def test_message_is_encoded_once_and_shared() -> None:
    hub = CaptionHub()
    a, b = hub.subscribe(), hub.subscribe()
    hub.publish_caption(cap("cam", 0))
    assert (await a.get()) is (await b.get())


async def test_caption_and_state_messages_carry_protocol_fields() -> None:
    hub = CaptionHub()
    sub = hub.subscribe()
    c = cap("cam", 3)
    hub.publish_caption(c)
    hub.publish_state("cam", "stalled", "no frames for 5 s", at=1234.5)
    caption, state = await read(sub, 2)
    assert caption == {"v": 1, "type": "caption", **c.to_dict(), "stable": False, "shown": True}
    assert state == {
        "v": 1, "type": "state", "stream_id": "cam", "state": "stalled", "detail": "no frames for 5 s", "time": 1234.5,
    }  # fmt: skip


async def test_filter_by_stream_and_update() -> None:
    hub = CaptionHub()
    only_a = hub.subscribe({"a"})
    both = hub.subscribe({"a", "b"})
    everything = hub.subscribe()
    for i in range(3):
        hub.publish_caption(cap("a", i))
        hub.publish_caption(cap("b", i))
        hub.publish_caption(cap("c", i))
    hub.publish_state("b", "ended", None)
    assert {m["stream_id"] for m in await read_pending(only_a)} == {"a"}
    assert [m["stream_id"] for m in await read_pending(both)] == ["a", "b"] * 3 + ["b"]
    assert len(await read_pending(everything)) == 10

    only_a.update({"c"})
    assert [(m["stream_id"], m["index"]) for m in await read_pending(only_a)] == [("c", i) for i in range(3)]  # replayed
    hub.publish_caption(cap("a", 9))
    hub.publish_caption(cap("c", 9))
    assert [(m["stream_id"], m["index"]) for m in await read_pending(only_a)] == [("c", 9)]
    only_a.update(None)  # every stream: a and b (not c) replay their history
    hub.publish_caption(cap("a", 10))
    got = summary(await read_pending(only_a))
    assert got[-1] == ("caption", "a", 10)
    assert sorted(got[:-1]) == sorted(
        [("caption", "a", i) for i in (0, 1, 2, 9)] + [("caption", "b", i) for i in range(3)] + [("state", "b", "ended")]
    )
    assert only_a.streams is None


async def test_update_replays_history_of_added_streams() -> None:
    hub = CaptionHub(history=5)
    for i in range(8):
        hub.publish_caption(cap("a", i))
        hub.publish_caption(cap("b", i))
    sub = hub.subscribe({"a"})
    assert [(m["stream_id"], m["index"]) for m in await read_pending(sub)] == [("a", i) for i in range(3, 8)]
    sub.update({"a", "b"})  # b's last 5 now; a is not replayed again
    assert [(m["stream_id"], m["index"]) for m in await read_pending(sub)] == [("b", i) for i in range(3, 8)]
    no_replay = hub.subscribe({"a"}, replay=False)
    no_replay.update({"b"})
    assert no_replay.pending == 0


async def test_replay_history_merged_by_emit_time_then_live() -> None:
    hub = CaptionHub(history=20)
    # a: 30 captions at emit 0..29; b: 5 captions at 2.5, 7.5, ... interleaved
    for i in range(30):
        hub.publish_caption(cap("a", i, emit=float(i)))
        if i % 5 == 2:
            hub.publish_caption(cap("b", i // 5, emit=i + 0.5))
    hub.publish_state("b", "running", None, at=14.2)
    hub.publish_caption(cap("c", 0))  # not asked for

    sub = hub.subscribe({"a", "b"})
    replayed = await read_pending(sub)
    times = [m.get("emit_time", m.get("time")) for m in replayed]
    assert times == sorted(times)
    assert [m["index"] for m in replayed if m["type"] == "caption" and m["stream_id"] == "a"] == list(range(10, 30))
    assert [m["index"] for m in replayed if m["type"] == "caption" and m["stream_id"] == "b"] == list(range(6))
    assert [(m["stream_id"], m["state"]) for m in replayed if m["type"] == "state"] == [("b", "running")]
    assert replayed[-1]["emit_time"] == 29.0

    hub.publish_caption(cap("a", 30, emit=30.0))
    assert [m["index"] for m in await read(sub, 1)] == [30]

    fresh = hub.subscribe({"a"}, replay=False)
    assert fresh.pending == 0
    hub.publish_caption(cap("a", 31, emit=31.0))
    assert [m["index"] for m in await read_pending(fresh)] == [31]


async def test_replay_fills_at_most_half_the_queue_newest_first() -> None:
    hub = CaptionHub(history=50, queue_size=10)
    for i in range(50):
        hub.publish_caption(cap("a", i))
    sub = hub.subscribe()
    assert [m["index"] for m in await read_pending(sub)] == [45, 46, 47, 48, 49]


TEXTS = ["a dog", "a dog", "a cat", "a cat", "a cat", "a dog"]


async def test_only_changes_skips_identical_consecutive_captions() -> None:
    hub = CaptionHub()
    changes = hub.subscribe()  # default: only_changes=True
    everything = hub.subscribe(only_changes=False)
    for i, text in enumerate(TEXTS):
        hub.publish_caption(cap("cam", i, text))
    got = await read_pending(changes)
    assert [(m["index"], m["text"], m["stable"]) for m in got] == [(0, "a dog", False), (2, "a cat", False), (5, "a dog", False)]
    got = await read_pending(everything)
    assert [m["stable"] for m in got] == [False, True, False, True, True, False]
    # Stability is per stream.
    hub.publish_caption(cap("other", 0, "a dog"))
    assert [m["stable"] for m in await read_pending(everything)] == [False]


async def test_history_keeps_stable_captions_and_replay_respects_only_changes() -> None:
    hub = CaptionHub()
    for i, text in enumerate(TEXTS):
        hub.publish_caption(cap("cam", i, text))
    assert [m["index"] for m in await read_pending(hub.subscribe(only_changes=False))] == list(range(6))
    assert [m["index"] for m in await read_pending(hub.subscribe())] == [0, 2, 5]


async def test_a_static_scene_never_leaves_a_new_subscriber_without_the_caption() -> None:
    hub = CaptionHub(history=3)
    for i in range(10):
        hub.publish_caption(cap("cam", i, "an empty room"))
    # History holds only stable repeats; the first one still reaches the subscriber, once.
    sub = hub.subscribe()
    got = await read_pending(sub)
    assert [(m["index"], m["text"], m["stable"]) for m in got] == [(7, "an empty room", True)]
    hub.publish_caption(cap("cam", 10, "an empty room"))
    assert sub.pending == 0
    # Without replay, the first live repeat is delivered instead.
    late = hub.subscribe(replay=False)
    hub.publish_caption(cap("cam", 11, "an empty room"))
    hub.publish_caption(cap("cam", 12, "an empty room"))
    assert [m["index"] for m in await read_pending(late)] == [11]


async def test_slow_subscriber_is_dropped_while_fast_one_gets_everything() -> None:
    hub = CaptionHub(queue_size=8)
    slow = hub.subscribe()
    fast = hub.subscribe()
    n = 200
    fast_reader = asyncio.create_task(read(fast, n))
    for i in range(n):
        hub.publish_caption(cap("cam", i))
        if i % 4 == 3:
            await asyncio.sleep(0)
    assert [m["index"] for m in await fast_reader] == list(range(n))
    assert slow.closed and slow.reason == "slow consumer"
    assert slow.pending == 0  # its backlog was dropped
    with pytest.raises(SubscriptionClosed) as info:
        await slow.get()
    assert info.value.reason == "slow consumer"
    assert await slow.wait_closed() == "slow consumer"
    assert hub.subscribers_dropped_slow == 1
    assert hub.subscriber_count == 1
    assert hub.messages_published == n


async def test_publish_never_awaits_and_works_from_the_engine_thread() -> None:
    hub = CaptionHub(queue_size=4)
    assert not inspect.iscoroutinefunction(hub.publish_caption)
    assert not inspect.iscoroutinefunction(hub.publish_state)
    stuck = [hub.subscribe() for _ in range(10)]  # nobody reads these
    for i in range(10_000):
        assert hub.publish_caption(cap("cam", i)) is None
    assert all(s.reason == "slow consumer" for s in stuck)
    assert hub.subscriber_count == 0

    # The engine thread hands captions to the loop, which publishes.
    sub = hub.subscribe(replay=False)
    loop = asyncio.get_running_loop()
    engine = threading.Thread(
        target=lambda: [loop.call_soon_threadsafe(hub.publish_caption, cap("cam", 10_000 + i)) for i in range(3)]
    )
    engine.start()
    got = await read(sub, 3)
    engine.join()
    assert [m["index"] for m in got] == [10_000, 10_001, 10_002]


async def test_waiting_reader_is_woken_by_close() -> None:
    hub = CaptionHub()
    sub = hub.subscribe()
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    sub.close()
    sub.close()  # idempotent
    with pytest.raises(SubscriptionClosed) as info:
        await waiter
    assert info.value.reason == "closed"
    assert hub.subscriber_count == 0
    hub.publish_caption(cap("cam", 0))  # a closed subscription receives nothing
    assert sub.pending == 0


async def test_hub_close_shuts_everyone_down() -> None:
    hub = CaptionHub()
    subs = [hub.subscribe() for _ in range(3)]
    hub.publish_caption(cap("cam", 0))
    collected: list[str] = []

    async def consume(sub: Subscription) -> None:
        async for msg in sub:
            collected.append(msg)

    consumers = [asyncio.create_task(consume(s)) for s in subs]
    await asyncio.sleep(0)
    hub.close()
    hub.close()
    await asyncio.gather(*consumers)  # async-for ends at close
    assert len(collected) == 3
    assert [s.reason for s in subs] == ["server shutdown"] * 3
    assert hub.subscriber_count == 0
    assert hub.subscribers_dropped_slow == 0
    late = hub.subscribe()
    with pytest.raises(SubscriptionClosed, match="server shutdown"):
        await late.get()
    hub.publish_caption(cap("cam", 1))  # ignored, no error


async def test_forget_stream_drops_history_and_stability() -> None:
    hub = CaptionHub()
    for i in range(3):
        hub.publish_caption(cap("gone", i, "same"))
        hub.publish_caption(cap("kept", i))
    hub.publish_state("gone", "ended", None)
    everything = hub.subscribe(only_changes=False, replay=False)
    hub.forget_stream("gone")
    assert hub.streams == ["kept"]
    assert {m["stream_id"] for m in await read_pending(hub.subscribe())} == {"kept"}
    # A new stream with the same id starts fresh: its first caption is not "stable".
    hub.publish_caption(cap("gone", 0, "same"))
    assert [m["stable"] for m in await read_pending(everything)] == [False]


async def test_end_stream_is_the_last_word_until_the_stream_is_forgotten() -> None:
    hub = CaptionHub()
    sub = hub.subscribe(replay=False)
    hub.publish_state("cam", "live", None)
    hub.end_stream("cam", "stopped", "removed")
    # what its source says while it shuts down does not reach anyone
    hub.publish_state("cam", "stopped", "stopped")
    hub.publish_caption(cap("cam", 7))
    hub.publish_caption(cap("other", 0))  # other streams are not affected
    assert summary(await read_pending(sub)) == [
        ("state", "cam", "live"), ("state", "cam", "stopped"), ("caption", "other", 0)
    ]
    assert [m["detail"] for m in await read_pending(hub.subscribe(["cam"]))] == ["removed"]
    # once forgotten, a new stream with the id is heard again
    hub.forget_stream("cam")
    hub.publish_state("cam", "connecting", None)
    assert summary(await read_pending(sub)) == [("state", "cam", "connecting")]


def test_hub_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        CaptionHub(queue_size=0)
    with pytest.raises(ValueError):
        CaptionHub(history=-1)


# -- a real WebSocket ----------------------------------------------------------


async def forward(hub: CaptionHub, ws: ServerConnection, *, close_timeout: float) -> tuple[str | None, int | None]:
    """Pump a subscription into a socket; when the hub drops it, close the socket with a code.

    Returns (subscription close reason, close code the server sent).
    """
    sub = hub.subscribe()

    async def pump() -> None:
        while True:
            await ws.send((await sub.get()).encoded)

    pump_task = asyncio.create_task(pump())
    dropped = asyncio.create_task(sub.wait_closed())
    try:
        # pump may be stuck in send() on a client that does not read: watch the subscription too.
        await asyncio.wait({pump_task, dropped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sub.close()  # the client went away (or we were cancelled): stop receiving
        for task in (pump_task, dropped):
            task.cancel()
        await asyncio.gather(pump_task, dropped, return_exceptions=True)
    codes = {"slow consumer": 1008, "server shutdown": 1001}
    code = codes.get(sub.reason or "")
    if code is not None:
        try:
            # close() waits for the write buffer to drain, which a stuck client never lets
            # happen: bound it; the server aborts the connection at its close_timeout.
            await asyncio.wait_for(ws.close(code, sub.reason or ""), close_timeout)
        except TimeoutError:
            pass
    sent = ws.protocol.close_sent
    return sub.reason, (sent.code if sent is not None else None)


def small_buffer_socket(option: int, size: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, option, size)
    return sock


async def test_real_websocket_slow_client_is_closed_with_1008_and_reader_gets_everything() -> None:
    hub = CaptionHub(queue_size=32)
    results: dict[str, tuple[str | None, int | None]] = {}
    subscribed = {"/reader": asyncio.Event(), "/idle": asyncio.Event()}
    finished = {"/reader": asyncio.Event(), "/idle": asyncio.Event()}

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path
        subscribed[path].set()  # forward() subscribes before its first await
        try:
            results[path] = await forward(hub, ws, close_timeout=0.3)
        finally:
            finished[path].set()

    # Small kernel buffers on both sides so a client that does not read backs up quickly.
    listener = small_buffer_socket(socket.SO_SNDBUF, 16 * 1024)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    n = 2000
    text = "x" * 1000  # ~1 KB messages
    async with serve(handler, sock=listener, write_limit=4096, close_timeout=0.3):
        reader_ws = await connect(f"ws://127.0.0.1:{port}/reader")
        idle_sock = small_buffer_socket(socket.SO_RCVBUF, 16 * 1024)
        idle_sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(idle_sock, ("127.0.0.1", port))
        idle_ws = await connect(f"ws://127.0.0.1:{port}/idle", sock=idle_sock, max_queue=1, close_timeout=0.3)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in subscribed.values())), 5)

        received: list[int] = []
        progress = asyncio.Event()

        async def read_all() -> int | None:
            try:
                async for raw in reader_ws:
                    received.append(json.loads(raw)["index"])
                    progress.set()
            except websockets.ConnectionClosed:
                pass
            return reader_ws.close_code

        reading = asyncio.create_task(read_all())
        for i in range(n):
            hub.publish_caption(cap("cam", i, f"{i} {text}"))
            # Pace the publisher to the reader (as a 1 Hz engine would be), never to the idle client.
            while i + 1 - len(received) > 16:
                progress.clear()
                await progress.wait()

        await asyncio.wait_for(finished["/idle"].wait(), 5)
        assert results["/idle"] == ("slow consumer", 1008)
        assert hub.subscribers_dropped_slow == 1
        assert hub.subscriber_count == 1

        while len(received) < n:
            progress.clear()
            await progress.wait()
        assert received == list(range(n))

        hub.close()  # the reader's connection is closed as "going away"
        assert await asyncio.wait_for(reading, 5) == 1001
        assert reader_ws.close_reason == "server shutdown"
        await asyncio.wait_for(finished["/reader"].wait(), 5)
        assert results["/reader"] == ("server shutdown", 1001)
        await idle_ws.close()


def test_a_bare_stream_id_is_not_taken_for_a_set_of_characters() -> None:
    hub = CaptionHub()
    with pytest.raises(TypeError):
        hub.subscribe("cam1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        hub.subscribe({"cam1"}).update("cam2")  # type: ignore[arg-type]


async def test_drain_lets_subscribers_read_what_is_queued_then_closes() -> None:
    hub = CaptionHub(history=0)
    reader = hub.subscribe(None, only_changes=False)
    stuck = hub.subscribe(None, only_changes=False)  # never reads
    for i in range(5):
        hub.publish_caption(cap("a", i, f"text {i}"))
    drained = asyncio.create_task(hub.drain(timeout=0.5))
    got = []
    with pytest.raises(SubscriptionClosed) as closed:
        while True:
            got.append(json.loads((await reader.get()).encoded)["index"])
    assert got == [0, 1, 2, 3, 4] and closed.value.reason == "server shutdown"
    hub.publish_caption(cap("a", 9, "late"))  # after drain began: not delivered to anyone
    await asyncio.wait_for(drained, 2)
    assert stuck.closed and stuck.reason == "server shutdown"
    assert hub.subscriber_count == 0
