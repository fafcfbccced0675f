"""A fast webhook receiver for benchmarks: answers every POST with 200, as its own process.

python -m bench.receiver PORT
"""

from __future__ import annotations

import sys

from aiohttp import web


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="ok")


def main() -> None:
    app = web.Application()
    app.router.add_post("/{tail:.*}", _ok)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
