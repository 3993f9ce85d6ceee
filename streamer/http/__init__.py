"""The daemon's HTTP face (aiohttp): control API, WebSocket captions, WHIP, one-shot APIs, pages."""
