"""An OpenAI-like HTTP server on loopback for engine tests: subclasses define `completions`."""

import asyncio
import threading

from aiohttp import web


class LoopbackServer:
    """`with Server() as s:` serves POST /v1/completions on 127.0.0.1:s.port from a thread of its own."""

    async def completions(self, request):  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
