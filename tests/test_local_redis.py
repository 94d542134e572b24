"""`make run`'s own redis-server keeps its data across a restart, even when it was
killed: what was queued before is still there after."""

import shutil
import signal
import subprocess
import time

import pytest
import redis

from mixtralweb.management.commands.runstack import local_redis_argv
from tests.conftest import free_port

BINARY = shutil.which("redis-server")


def start(argv: list[str], port: int) -> tuple[subprocess.Popen, redis.Redis]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return process, client
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)


@pytest.mark.skipif(BINARY is None, reason="redis-server is not installed")
def test_the_local_redis_keeps_its_data_after_being_killed(tmp_path):
    port = free_port()
    argv = local_redis_argv(BINARY, port, tmp_path)
    process, client = start(argv, port)
    try:
        client.lpush("queued-task", "generation 42")
        time.sleep(1.5)  # the append-only file is synced every second
    finally:
        process.send_signal(signal.SIGKILL)  # no shutdown save: only the AOF can keep it
        process.wait(10)

    process, client = start(argv, port)
    try:
        assert client.lrange("queued-task", 0, -1) == [b"generation 42"]
    finally:
        process.terminate()
        process.wait(10)
