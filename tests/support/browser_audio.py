"""Headless Chromium publishing camera AND microphone over WebRTC (tests/support/browser.py's
`chromium(microphone=WAV)` and `page_server(OFFER_PAGE)`): the page makes the offer and takes the
answer; the test carries them (the daemon's own WHIP call: POST /whip takes no `speech`)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from streamer.speech.vad import SAMPLE_RATE

__all__ = ["OFFER_PAGE", "write_wav"]

OFFER_PAGE = """<!doctype html><meta charset="utf-8"><title>av publisher</title><script>
let pc;
async function offer() {
  const media = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}, audio: true});
  pc = new RTCPeerConnection({iceServers: []});
  for (const track of media.getTracks()) pc.addTransceiver(track, {direction: "sendonly"});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(done => {  // no trickle: every candidate in the offer
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
  });
  return pc.localDescription.sdp;
}
async function answer(sdp) { await pc.setRemoteDescription({type: "answer", sdp}); return pc.connectionState; }
</script>"""


def write_wav(path: str | Path, samples: np.ndarray) -> Path:
    """16 kHz float32 -> 16-bit PCM WAV (what Chromium's fake microphone reads)."""
    path = Path(path)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path

