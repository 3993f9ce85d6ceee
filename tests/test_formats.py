"""Caption files parsed back with real subtitle parsers (webvtt-py, srt)."""

from __future__ import annotations

import dataclasses
import html
import io
import json
from datetime import timedelta

import pytest
import srt
import webvtt

from streamer.publish import formats
from streamer.publish.formats import FORMATS, CaptionWriter, format_timestamp, render
from streamer.types import Caption


def cap(index: int, start: float, text: str, end: float | None = None, stream: str = "cam") -> Caption:
    return Caption(
        stream_id=stream,
        index=index,
        start=start,
        end=start + 3.0 if end is None else end,
        text=text,
        confidence=-0.5,
        model="tiny-git",
        capture_time=1000.0 + start,
        emit_time=1000.5 + start,
    )


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """(start, end, text as a player shows it) per cue; strict: a malformed cue block fails."""
    vtt = webvtt.WebVTT.from_string(text, strict=True)
    return [
        (c.start_time.in_milliseconds() / 1000, c.end_time.in_milliseconds() / 1000, html.unescape(c.raw_text))
        for c in vtt
    ]


def parse_srt(text: str) -> list[srt.Subtitle]:
    return list(srt.parse(text, ignore_errors=False))


CAPTIONS = [
    cap(0, 0.0, "a man walks a dog"),
    cap(1, 1.25, "a man is cooking"),
    cap(2, 2.5, "a woman sings on a stage"),
]


def test_public_api() -> None:
    assert set(formats.__all__) == {"FORMATS", "CaptionWriter", "render", "format_timestamp"}
    assert FORMATS == ("vtt", "srt", "jsonl", "text")


def test_vtt_cues_follow_caption_times() -> None:
    out = render(CAPTIONS, "vtt")
    assert out.startswith("WEBVTT\n\n")
    cues = parse_vtt(out)
    # Each cue ends where the next starts; the last one ends at caption.end (3 s > min_duration).
    assert cues == [
        (0.0, 1.25, "a man walks a dog"),
        (1.25, 2.5, "a man is cooking"),
        (2.5, 5.5, "a woman sings on a stage"),
    ]


def test_srt_cues_follow_caption_times_and_are_numbered_from_one() -> None:
    subs = parse_srt(render(CAPTIONS, "srt"))
    assert [s.index for s in subs] == [1, 2, 3]
    assert [(s.start, s.end, s.content) for s in subs] == [
        (timedelta(seconds=0), timedelta(seconds=1.25), "a man walks a dog"),
        (timedelta(seconds=1.25), timedelta(seconds=2.5), "a man is cooking"),
        (timedelta(seconds=2.5), timedelta(seconds=5.5), "a woman sings on a stage"),
    ]


def test_times_are_rounded_to_the_millisecond() -> None:
    caps = [cap(0, 0.0004, "one"), cap(1, 1.2345678, "two", end=1.9999)]
    subs = parse_srt(render(caps, "srt"))
    assert subs[0].start == timedelta(0)
    assert subs[0].end == subs[1].start == timedelta(milliseconds=1235)
    # Last cue: max(end, start + min_duration) = 2.2345678 -> 2.235
    assert subs[1].end == timedelta(milliseconds=2235)
    assert parse_vtt(render(caps, "vtt"))[1] == (1.235, 2.235, "two")


def test_last_cue_lasts_at_least_min_duration() -> None:
    caps = [cap(0, 10.0, "short", end=10.2)]
    assert parse_vtt(render(caps, "vtt")) == [(10.0, 11.0, "short")]
    assert parse_vtt(render(caps, "vtt", min_duration=2.5)) == [(10.0, 12.5, "short")]
    assert parse_vtt(render(caps, "vtt", min_duration=0.0)) == [(10.0, 10.2, "short")]


def test_identical_consecutive_captions_merge_into_one_cue() -> None:
    caps = [
        cap(0, 0.0, "a dog runs"),
        cap(1, 1.0, "a dog runs"),
        cap(2, 2.0, "a dog runs"),
        cap(3, 3.0, "a cat sleeps"),
        cap(4, 4.0, "a cat sleeps", end=7.0),
    ]
    assert parse_vtt(render(caps, "vtt")) == [(0.0, 3.0, "a dog runs"), (3.0, 7.0, "a cat sleeps")]
    subs = parse_srt(render(caps, "srt"))
    assert [(s.index, s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs] == [
        (1, 0.0, 3.0, "a dog runs"),
        (2, 3.0, 7.0, "a cat sleeps"),
    ]
    assert render(caps, "text") == (
        "[00:00:00.000 --> 00:00:03.000] a dog runs\n[00:00:03.000 --> 00:00:07.000] a cat sleeps\n"
    )
    # A repeat after a different caption is a new cue.
    again = [cap(0, 0.0, "x"), cap(1, 1.0, "y"), cap(2, 2.0, "x")]
    assert [c[2] for c in parse_vtt(render(again, "vtt"))] == ["x", "y", "x"]


def test_jsonl_writes_every_caption_with_all_fields() -> None:
    caps = [cap(0, 0.0, "a dog runs"), cap(1, 1.0, "a dog runs"), cap(2, 2.0, 'quote " and\nnewline', stream="other")]
    lines = render(caps, "jsonl").splitlines()
    assert len(lines) == 3  # no merging, streams may mix
    for line, c in zip(lines, caps, strict=True):
        data = json.loads(line)
        assert data == c.to_dict()
        fields = {f.name for f in dataclasses.fields(Caption)}
        assert Caption(**{k: data[k] for k in fields}) == c
        assert data["latency"] == pytest.approx(0.5)


def test_vtt_escapes_markup_and_never_emits_arrow_in_text() -> None:
    text = "a <b>bold</b> sign & an arrow --> here"
    out = render([cap(0, 0.0, text), cap(1, 1.0, "two\nlines\r\n\nof text")], "vtt")
    assert "a &lt;b&gt;bold&lt;/b&gt; sign &amp; an arrow --&gt; here\n" in out
    assert out.count("-->") == 2  # only the two timing lines
    # The player shows the original characters, not markup; newlines never split a cue.
    assert [c[2] for c in parse_vtt(out)] == [text, "two lines of text"]


def test_srt_text_is_one_line_so_cues_cannot_be_split() -> None:
    caps = [cap(0, 0.0, "first\n\n2\n00:00:09,000 --> 00:00:10,000\nfake"), cap(1, 1.0, "second")]
    subs = parse_srt(render(caps, "srt"))
    assert [s.index for s in subs] == [1, 2]
    assert subs[0].content == "first 2 00:00:09,000 --> 00:00:10,000 fake"
    assert subs[1].content == "second"


def test_empty_input_gives_valid_empty_files() -> None:
    assert render([], "vtt") == "WEBVTT\n\n"
    assert parse_vtt(render([], "vtt")) == []
    assert render([], "srt") == ""
    assert render([], "jsonl") == ""
    assert render([], "text") == ""


def test_empty_caption_ends_previous_cue_without_a_cue_of_its_own() -> None:
    caps = [cap(0, 0.0, "a dog"), cap(1, 2.0, "  \n "), cap(2, 4.0, "a cat")]
    subs = parse_srt(render(caps, "srt"))
    assert [(s.index, s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs] == [
        (1, 0.0, 2.0, "a dog"),
        (2, 4.0, 7.0, "a cat"),
    ]


def test_hours_beyond_99() -> None:
    t = 123 * 3600 + 4 * 60 + 5.678
    assert format_timestamp(t, "vtt") == "123:04:05.678"
    assert format_timestamp(t, "srt") == "123:04:05,678"
    caps = [cap(0, t, "late"), cap(1, t + 1.5, "later")]
    assert parse_vtt(render(caps, "vtt")) == [(t, t + 1.5, "late"), (t + 1.5, t + 4.5, "later")]
    subs = parse_srt(render(caps, "srt"))
    assert subs[0].start == timedelta(hours=123, minutes=4, seconds=5, milliseconds=678)


def test_format_timestamp() -> None:
    assert format_timestamp(0, "vtt") == "00:00:00.000"
    assert format_timestamp(59.9996, "srt") == "00:01:00,000"
    assert format_timestamp(3661.001, "text") == "01:01:01.001"
    assert format_timestamp(-2.5, "vtt") == "00:00:00.000"
    with pytest.raises(ValueError):
        format_timestamp(float("nan"), "vtt")


def test_negative_start_clamps_to_zero() -> None:
    assert parse_vtt(render([cap(0, -0.5, "pre-roll", end=0.8)], "vtt")) == [(0.0, 0.8, "pre-roll")]


def test_unknown_format_lists_valid_ones() -> None:
    for call in (lambda: render([], "ass"), lambda: CaptionWriter("ass", io.StringIO()), lambda: format_timestamp(1, "ass")):
        with pytest.raises(ValueError, match="vtt, srt, jsonl, text"):
            call()


def test_streaming_writer_holds_back_one_cue() -> None:
    out = io.StringIO()
    writer = CaptionWriter("srt", out)
    writer.write(cap(0, 0.0, "one"))
    assert out.getvalue() == ""  # its end is not known yet
    writer.write(cap(1, 1.0, "one"))
    assert out.getvalue() == ""  # merged, still pending
    writer.write(cap(2, 2.0, "two"))
    assert parse_srt(out.getvalue())[0].content == "one"
    assert len(parse_srt(out.getvalue())) == 1
    writer.close()
    writer.close()  # idempotent
    assert len(parse_srt(out.getvalue())) == 2
    assert not out.closed
    with pytest.raises(ValueError, match="closed"):
        writer.write(cap(3, 3.0, "three"))


def test_vtt_header_is_written_with_the_first_caption() -> None:
    out = io.StringIO()
    writer = CaptionWriter("vtt", out)
    writer.write(cap(0, 0.0, "one"))
    assert out.getvalue() == "WEBVTT\n\n"
    writer.close()
    assert parse_vtt(out.getvalue()) == [(0.0, 3.0, "one")]


def test_live_file_is_readable_while_writing(tmp_path) -> None:
    path = tmp_path / "live.vtt"
    with path.open("w", encoding="utf-8") as f:
        writer = CaptionWriter("vtt", f)
        for i in range(5):
            writer.write(cap(i, float(i), f"caption {i}"))
        # Another process reading the file now sees every cue whose end is known.
        assert [c[2] for c in parse_vtt(path.read_text(encoding="utf-8"))] == [f"caption {i}" for i in range(4)]
        writer.close()
    assert len(parse_vtt(path.read_text(encoding="utf-8"))) == 5


def test_out_of_order_and_duplicate_timestamps_are_dropped() -> None:
    caps = [cap(0, 1.0, "a"), cap(1, 0.5, "late"), cap(2, 1.0, "dup"), cap(3, 2.0, "b")]
    assert [(c[0], c[1], c[2]) for c in parse_vtt(render(caps, "vtt"))] == [(1.0, 2.0, "a"), (2.0, 5.0, "b")]


def test_one_subtitle_writer_per_stream() -> None:
    writer = CaptionWriter("vtt", io.StringIO())
    writer.write(cap(0, 0.0, "a", stream="cam1"))
    with pytest.raises(ValueError, match="cam2"):
        writer.write(cap(0, 1.0, "b", stream="cam2"))


def test_a_writer_can_continue_a_file_without_a_second_header_and_says_where_its_last_cue_ends():
    # What live subtitle files need to append across segments without parsing their own output back.
    caps = [Caption("cam", i, 10.0 + i, 11.0 + i, text, -0.1, "m") for i, text in enumerate(["a dog", "a cat"])]
    vtt, srt = io.StringIO(), io.StringIO()
    with CaptionWriter("vtt", vtt, header=False) as w:
        for c in caps:
            w.write(c)
    assert not vtt.getvalue().startswith("WEBVTT") and vtt.getvalue().count("-->") == 2
    assert w.last_end == 12.0  # the last cue: its caption's end (min_duration 1 s)
    w = CaptionWriter("srt", srt, first_cue_number=7)
    w.write(caps[0])
    assert w.last_end is None and w.last_cue_number == 6  # one cue held back, nothing written yet
    w.write(caps[1])
    assert w.last_end == 11.0 and w.last_cue_number == 7  # the first cue ends where the second starts
    w.close()
    assert [b.split("\n")[0] for b in srt.getvalue().strip().split("\n\n")] == ["7", "8"]
    with pytest.raises(ValueError):
        CaptionWriter("srt", io.StringIO(), first_cue_number=0)
