"""Shared by the REST tests: a local HTTP server standing in for Upbit.

The server is an in-process aiohttp app on port 0 that answers what each test scripts
(``upbit.reply``) and records the headers of every request it was sent.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

Reply = Callable[[web.Request], web.Response | Awaitable[web.Response]]


@dataclass
class FakeUpbit:
    """Answers every path with ``reply``; keeps the headers of each request."""

    base: str = ""
    reply: Reply = field(default=lambda request: web.json_response([]))
    seen: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        answer = self.reply(request)
        return await answer if inspect.isawaitable(answer) else answer


@pytest.fixture
async def upbit() -> AsyncIterator[FakeUpbit]:
    fake = FakeUpbit()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()
