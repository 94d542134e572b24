"""The ASGI server: daphne, with the websocket size limit enforced by daphne itself.

    python -m mixtralweb.web_server [daphne's options] mixtralweb.asgi:application

runs daphne's own command line with `--websocket-max-frame-size` and
`--websocket-max-message-size` set to WS_FRAME_MAX_BYTES (options given on the
command line win). daphne's websocket layer (autobahn) then refuses a larger frame
from the length in its header, before reading its payload, so a client cannot make
the server buffer more than the limit. It fails such a connection with a close frame
carrying 1009 (message too big), which the page can tell the user, instead of
autobahn's default under daphne of dropping the TCP connection without one.

`make run` (runstack), the tests and production (docs/deployment.md) start it so.
"""

from __future__ import annotations

import os
import sys

ASGI_APPLICATION = "mixtralweb.asgi:application"


def daphne_argv(*, host: str, port: int | str) -> list[str]:
    """The command line that serves the workbench on host:port."""
    return [
        sys.executable,
        "-m",
        "mixtralweb.web_server",
        "-b",
        host,
        "-p",
        str(port),
        ASGI_APPLICATION,
    ]


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
    # daphne installs its asyncio reactor when imported: before anything takes one.
    from daphne.cli import CommandLineInterface
    from django.conf import settings
    from twisted.internet import reactor

    limit = str(settings.WS_FRAME_MAX_BYTES)
    limits = ["--websocket-max-frame-size", limit, "--websocket-max-message-size", limit]
    cli = CommandLineInterface()
    # Once daphne has made its websocket factory: fail with a close frame.
    reactor.callWhenRunning(lambda: cli.server.ws_factory.setProtocolOptions(failByDrop=False))
    cli.run([*limits, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
