"""/metrics through prometheus_client: the daemon's names, engine/source/process series, and
per-stream series that go with their stream. Real daemon, real HTTP scrapes, the client's own parser."""

from __future__ import annotations

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from streamer.ops import metrics
from tests.support.daemon import add_stream, count_for, read_messages, running_daemon
from tests.support.media import moving_square, write_video

pytestmark = pytest.mark.timeout(120)


def test_public_api() -> None:
    assert set(metrics.__all__) == {"CONTENT_TYPE", "DaemonMetrics"}


def _samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def test_metrics_cover_pipeline_engine_sources_and_process_and_series_go_with_their_stream(tiny_model, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", moving_square(30, 64, 64), fps=15)
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?streams=cam,other&all=1") as ws:
            await add_stream(http, d, id="cam", url=str(clip), loop=True)
            await add_stream(http, d, id="other", url=str(clip), loop=True)
            await read_messages(ws, lambda ms: count_for("cam", 2)(ms) and count_for("other", 1)(ms), 30)
        async with http.get(f"{d.http}/metrics") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            samples = _samples(await resp.text())
        by_name = {}
        for s in samples:
            by_name.setdefault(s.name, []).append(s)
        for name in ("streamer_frames_total", "streamer_windows_captioned_total", "streamer_caption_latency_seconds_count",
                     "streamer_source_state", "streamer_source_decode_errors_total", "streamer_source_frames_dropped_late_total"):
            assert {s.labels.get("stream") for s in by_name[name]} >= {"cam", "other"}, name
        assert by_name["streamer_engine_frames_encoded_total"][0].value > 0
        assert by_name["streamer_engine_frames_reused_total"][0].value > 0  # overlapping windows share frames
        assert by_name["streamer_batch_size_count"][0].value > 0
        assert by_name["streamer_batches_failed_total"][0].value == 0
        assert by_name["streamer_streams"][0].value == 2
        assert by_name["process_resident_memory_bytes"][0].value > 0 and "python_info" in by_name
        live = [s for s in by_name["streamer_source_state"] if s.labels["stream"] == "cam" and s.value == 1]
        assert [s.labels["state"] for s in live] == [d.daemon.get("cam").state]

        async with http.delete(f"{d.http}/streams/cam") as resp:
            assert resp.status == 204
        async with http.get(f"{d.http}/metrics") as resp:
            after = _samples(await resp.text())
        assert not [s for s in after if s.labels.get("stream") == "cam"]
        assert [s for s in after if s.labels.get("stream") == "other"]
        assert [s.value for s in after if s.name == "streamer_streams"] == [1]
