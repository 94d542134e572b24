"""Web processes never touch a GPU: in a CUDA build, the tokenizer's vocabulary-only
load would otherwise create a CUDA context on every GPU. The settings hide the GPUs
(CUDA_VISIBLE_DEVICES="") in web servers and in Celery processes that are not model
workers, before llama.cpp is first used; model workers keep theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixtralweb.web_server import hide_gpus_from_cuda, is_gpu_free_process

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)


@pytest.mark.parametrize(
    ("argv", "environ", "hidden"),
    [
        ([f"{BIN}/daphne", "-b", "0.0.0.0", "mixtralweb.asgi:application"], {}, True),
        ([str(ROOT / "mixtralweb" / "web_server.py"), "-p", "8000"], {}, True),
        (["/x/lib/python3.11/site-packages/daphne/__main__.py"], {}, True),
        ([f"{BIN}/uvicorn", "mixtralweb.asgi:application"], {}, True),
        ([f"{BIN}/gunicorn", "-k", "uvicorn.workers.UvicornWorker"], {}, True),
        (["manage.py", "runserver"], {}, True),
        ([f"{BIN}/celery", "-A", "mixtralweb", "worker", "--queues", "ops"], {}, True),
        ([f"{BIN}/celery", "-A", "mixtralweb", "beat"], {}, True),
        # A model worker: `manage.py modelworker` sets WORKER_MODEL and execs celery.
        ([f"{BIN}/celery", "-A", "mixtralweb", "worker"], {"WORKER_MODEL": "m"}, False),
        (["manage.py", "modelworker", "m"], {}, False),
        (["manage.py", "runstack"], {}, False),  # its workers inherit its environment
        (["manage.py", "addmodel", "x.gguf", "--name", "m"], {}, False),
        ([f"{BIN}/pytest", "-m", "gpu"], {}, False),
        ([], {}, False),
    ],
)
def test_only_web_and_non_model_processes_hide_the_gpus(argv, environ, hidden):
    assert is_gpu_free_process(argv, environ) is hidden
    env = {"CUDA_VISIBLE_DEVICES": "0,1", **environ}
    assert hide_gpus_from_cuda(argv, env) is hidden
    assert env["CUDA_VISIBLE_DEVICES"] == ("" if hidden else "0,1")


def run_python(code: str, argv0: str, **env) -> dict:
    """Run code in a fresh interpreter whose sys.argv[0] is argv0; its last line of
    output is JSON."""
    script = f"import sys; sys.argv = [{argv0!r}]\n{code}"
    environ = {k: v for k, v in os.environ.items() if k != "WORKER_MODEL"}
    environ |= {"DJANGO_SETTINGS_MODULE": "mixtralweb.settings", **env}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


WEB_PROCESS = """
import json, os
import mixtralweb.settings
before = "llama_cpp" in sys.modules
import mixtralweb.asgi
from inference.registry import embedded_model_path
from inference.tokens import count_chat_tokens

class Model:
    path = str(embedded_model_path())

tokens = count_chat_tokens(Model, [{"role": "user", "content": "Hello"}])
print(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "llama_cpp_before": before,
                  "tokens": tokens}))
"""


def test_a_web_process_hides_the_gpus_before_llama_cpp_and_still_counts_tokens():
    result = run_python(WEB_PROCESS, f"{BIN}/daphne", CUDA_VISIBLE_DEVICES="0")
    assert result == {"cuda": "", "llama_cpp_before": False, "tokens": result["tokens"]}
    assert result["tokens"] > 0


def test_a_model_worker_keeps_its_gpus():
    result = run_python(WEB_PROCESS, f"{BIN}/celery", CUDA_VISIBLE_DEVICES="1", WORKER_MODEL="m")
    assert result["cuda"] == "1"


def test_the_web_server_hides_the_gpus_however_it_is_started():
    code = """
import json, os
import daphne.cli

class Server:
    def __init__(self):
        pass
    def run(self, argv):
        print(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}))

daphne.cli.CommandLineInterface = Server
from mixtralweb import web_server
web_server.main(["mixtralweb.asgi:application"])
"""
    assert run_python(code, "-c", CUDA_VISIBLE_DEVICES="0") == {"cuda": ""}
