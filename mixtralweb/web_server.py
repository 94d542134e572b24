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

Web processes never touch a GPU (hide_gpus_from_cuda, called by the settings): only
model workers do.
"""

from __future__ import annotations

import os
import sys

ASGI_APPLICATION = "mixtralweb.asgi:application"

# Programs that serve the workbench's web side (a `python -m X` run shows as X).
WEB_PROGRAMS = {"daphne", "uvicorn", "gunicorn", "hypercorn", "web_server.py", "web_server"}


def is_gpu_free_process(argv: list[str], environ) -> bool:
    """Whether this process must not see GPUs: a web server (daphne, this module,
    uvicorn, gunicorn, hypercorn, runserver) or a Celery process that is not a model
    worker (the ops worker, beat). Model workers (WORKER_MODEL, set by `manage.py
    modelworker`) and everything else (pytest, runstack, other commands) keep theirs."""
    if environ.get("WORKER_MODEL") or not argv:
        return False
    program = os.path.basename(argv[0])
    if program == "__main__.py":  # python -m daphne, python -m celery...
        program = os.path.basename(os.path.dirname(argv[0]))
    if program in WEB_PROGRAMS or program == "celery":
        return True
    return program in {"manage.py", "django-admin"} and argv[1:2] == ["runserver"]


def hide_gpus_from_cuda(argv: list[str] | None = None, environ=None) -> bool:
    """In a GPU-free process, set CUDA_VISIBLE_DEVICES="" before llama.cpp is first
    used: in a CUDA build, even the tokenizer's vocabulary-only load initialises CUDA,
    which creates a context (hundreds of MB) on every GPU. Returns whether it did."""
    environ = os.environ if environ is None else environ
    if not is_gpu_free_process(sys.argv if argv is None else argv, environ):
        return False
    environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


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
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a web server, however it was started
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
