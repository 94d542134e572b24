"""`make install` with CMAKE_ARGS builds llama-cpp-python from source, never from
pip's cached wheel (built without them: the CPU build). Runs the Makefile's own
recipe with a stand-in python and pip that record what they are asked."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/bin/sh
# llama_cpp is "installed" when $VENV/llama marks it; it offloads when that says cuda.
state=$(cat "$(dirname "$0")/../llama" 2>/dev/null)
case "$*" in
  *llama_supports_gpu_offload*) [ "$state" = cuda ] ;;
  *__version__*) echo 0.3.36 ;;
  *"import llama_cpp"*) [ -n "$state" ] ;;
esac
"""

FAKE_PIP = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../pip.log"
case "$*" in
  *llama-cpp-python*) case "$CMAKE_ARGS" in *GGML_CUDA=on*) echo cuda;; *) echo cpu;; esac \\
    > "$(dirname "$0")/../llama" ;;
esac
"""


def make_install(tmp_path, installed: str | None, cmake_args: str | None) -> list[str]:
    """The llama-cpp-python install commands `make install` runs in a venv whose
    llama_cpp is `installed` ("cpu", "cuda" or None)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("pip", FAKE_PIP)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    if installed:
        (venv / "llama").write_text(installed)
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "MAKEFLAGS")}
    argv = ["make", "-s", "-C", str(ROOT), f"VENV={venv}", f"{venv}/.installed"]
    if cmake_args is not None:
        argv.append(f"CMAKE_ARGS={cmake_args}")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (venv / "pip.log").read_text().splitlines()
    return [line for line in log if "llama-cpp-python" in line]


pytestmark = pytest.mark.skipif(not shutil.which("make"), reason="needs make")


def test_a_cuda_build_in_a_fresh_venv_bypasses_pips_cache(tmp_path):
    (line,) = make_install(tmp_path, None, "-DGGML_CUDA=on")
    assert "--no-cache-dir" in line.split() and "--force-reinstall" not in line


def test_a_venv_with_the_cpu_build_is_rebuilt_when_cuda_is_asked_for(tmp_path):
    (line,) = make_install(tmp_path, "cpu", "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90")
    assert {"--no-cache-dir", "--force-reinstall", "--no-deps"} <= set(line.split())


def test_a_plain_build_may_use_the_cache_and_a_built_one_is_kept(tmp_path):
    (line,) = make_install(tmp_path, None, None)
    assert "--no-cache-dir" not in line
    assert make_install(tmp_path / "cpu", "cpu", None) == []
    assert make_install(tmp_path / "cuda", "cuda", "-DGGML_CUDA=on") == []
