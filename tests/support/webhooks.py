"""A real webhook receiver on loopback, for the webhook, bus and cluster tests."""

from __future__ import annotations

import asyncio

from aiohttp import web

__all__ = ["Receiver"]


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records the JSON bodies POSTed to it, per path.

    `answers`: statuses to answer with first (then 200); a non-2xx request is recorded in
    `requests` but not in `got`.
    """

    def __init__(self, answers=(), delay: float = 0.0) -> None:
        self.got: dict[str, list[dict]] = {}
        self.requests: list[tuple[str, str, int]] = []  # (path, idempotency key, status)
        self.answers = list(answers)
        self.delay = delay
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Event()  # set on each accepted body

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert request.content_type == "application/json"
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.answers.pop(0) if self.answers else 200
        if callable(status):
            status = status(body)
        self.requests.append((request.match_info["name"], request.headers.get("Idempotency-Key", ""), status))
        if status == 200:
            self.got.setdefault(request.match_info["name"], []).append(body)
            self._arrived.set()
        return web.json_response({"ok": status == 200}, status=status)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{name}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # port 0 the first time, then the same one
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, name: str, count: int, timeout: float) -> list[dict]:
        """The bodies POSTed to /name once there are at least `count` of them; fails after `timeout` s."""
        async with asyncio.timeout(timeout):
            while len(self.got.get(name, [])) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.got[name]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"
