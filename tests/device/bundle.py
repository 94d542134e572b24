"""Build the folder that travels to a GPU machine for the device check.

    python -m tests.device.bundle [--out var/device/bundle] [--archs 90]

The GPU machine has Python 3.12, CUDA 13 and its driver, NumPy, and no network. The
folder holds what it lacks (under 64 MiB):

- llama.tar.xz: llama-cpp-python's Python package with its libraries rebuilt with
  CUDA from the llama.cpp inside the pinned sdist (one CMake build, the same source
  pip builds), and that build's llama-bench and llama-server (llama.cpp's own figure);
- wheels/: every other package the check imports, for CPython 3.12 on x86-64,
  installed there with `pip install --no-index --no-deps --target`;
- smollm2.skeleton.gguf: the embedded model's metadata and tensor list
  (tests/device/models.py), from which the check writes a same-shaped model.

Building CUDA code needs nvcc and cuBLAS; where the CUDA toolkit lacks cuBLAS (a
compiler-only install), NVIDIA's `nvidia-cublas` wheel supplies its headers and
library. No GPU is needed to build: the architectures are named (`--archs`).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_VERSION = "0.3.36"
CUBLAS_WHEEL = "nvidia-cublas>=13.0,<13.1"
# Not needed by the check: the web server (daphne, with Twisted) and PostgreSQL.
NOT_CARRIED = {"llama-cpp-python", "psycopg", "honcho", "daphne"}
# On the GPU machine already (its image), and large: not carried.
ON_THE_DEVICE = {"numpy"}
PLATFORMS = [
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_34_x86_64",
]
TARGETS = ["llama", "mtmd", "llama-bench", "llama-server"]


def say(message: str) -> None:
    print(message, flush=True)


def sh(args: list[str], **kwargs) -> None:
    say("$ " + " ".join(str(a) for a in args))
    subprocess.run([str(a) for a in args], check=True, **kwargs)


def pip(*args: str) -> None:
    sh([sys.executable, "-m", "pip", *args])


def requirements() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    keep = []
    for requirement in data["project"]["dependencies"]:
        name = re.split(r"[\[=<>!~ ]", requirement, maxsplit=1)[0].lower()
        if name not in NOT_CARRIED:
            keep.append(requirement)
    # llama-cpp-python's own needs, at the versions installed here.
    for requirement in metadata.requires("llama-cpp-python") or []:
        if "extra ==" not in requirement:
            name = re.split(r"[\[=<>!~ ;]", requirement, maxsplit=1)[0]
            keep.append(f"{name}=={metadata.version(name)}")
    return keep


def download_wheels(folder: Path, python: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip(
        "download",
        "-q",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python,
        *platforms,
        "-d",
        str(folder),
        *requirements(),
    )


def cublas(work: Path) -> Path | None:
    """cuBLAS's folder (include/, lib/) when the CUDA toolkit has none."""
    nvcc = shutil.which("nvcc")
    if nvcc and glob.glob(str(Path(nvcc).resolve().parents[1] / "lib64" / "libcublas.so*")):
        return None
    target = work / "cublas"
    if not (target / "nvidia").is_dir():
        download = work / "cublas-wheel"
        pip(
            "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            *[arg for p in PLATFORMS for arg in ("--platform", p)],
            "-d", str(download), CUBLAS_WHEEL,
        )  # fmt: skip
        for wheel in download.glob("*.whl"):
            shutil.unpack_archive(wheel, target, "zip")
    return next(target.glob("nvidia/cu*"))


def build_llama_cpp(work: Path, archs: str) -> Path:
    """Configure and build llama.cpp with CUDA (once; later runs reuse the build)."""
    source = work / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    if not source.is_dir():
        pip(
            "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", str(work),
            f"llama-cpp-python=={LLAMA_CPP_VERSION}",
        )  # fmt: skip
        with tarfile.open(work / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz") as archive:
            archive.extractall(work, filter="data")
    build = work / "build"
    if not (build / "CMakeCache.txt").is_file():
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_CUDA=ON",
            # No libcuda.so is needed to link (it is the driver's, on the GPU machine).
            "-DGGML_CUDA_NO_VMM=ON",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DBUILD_SHARED_LIBS=ON",
            "-DCMAKE_BUILD_RPATH=$ORIGIN",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_SERVER=ON",
            # The GPU machine's CPU is not this one: no -march=native.
            "-DGGML_NATIVE=OFF",
            "-DGGML_AVX=ON",
            "-DGGML_AVX2=ON",
            "-DGGML_FMA=ON",
            "-DGGML_F16C=ON",
        ]
        blas = cublas(work)
        if blas is not None:
            flags += [
                f"-DCUDA_cublas_LIBRARY={blas}/lib/libcublas.so.13",
                f"-DCUDA_cublasLt_LIBRARY={blas}/lib/libcublasLt.so.13",
                f"-DCMAKE_CUDA_FLAGS=-I{blas}/include",
                f"-DCMAKE_CXX_FLAGS=-I{blas}/include",
            ]
        sh(["cmake", "-S", source / "vendor" / "llama.cpp", "-B", build, *flags])
    began = time.monotonic()
    sh(["cmake", "--build", build, "-j", str(os.cpu_count()), "--target", *TARGETS])
    say(f"llama.cpp built in {time.monotonic() - began:.0f} s")
    return build


def pack_llama(build: Path, out: Path) -> Path:
    """llama_cpp's Python files with the CUDA libraries, and the two tools."""
    import llama_cpp

    staging = out / "llama-staging"
    shutil.rmtree(staging, ignore_errors=True)
    package = staging / "llama_cpp"
    shutil.copytree(
        Path(llama_cpp.__file__).parent,
        package,
        ignore=shutil.ignore_patterns("lib", "__pycache__", "*.pyc"),
    )
    (package / "lib").mkdir()
    (staging / "bin").mkdir()
    for lib in (build / "bin").glob("lib*.so*"):
        if lib.is_symlink():
            (package / "lib" / lib.name).symlink_to(os.readlink(lib))
        else:
            shutil.copy2(lib, package / "lib" / lib.name)
    for tool in ("llama-bench", "llama-server"):
        shutil.copy2(build / "bin" / tool, staging / "bin" / tool)
    for path in [*(package / "lib").iterdir(), *(staging / "bin").iterdir()]:
        if not path.is_symlink():
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
    archive = out / "llama.tar.xz"
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        tar.add(package, "llama_cpp")
        tar.add(staging / "bin", "bin")
    shutil.rmtree(staging)
    return archive


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "var" / "device" / "bundle"))
    parser.add_argument("--work", default=str(ROOT / "var" / "device" / "build"))
    # One architecture: libggml-cuda for sm_90 alone is 67 MB (41 MB compressed).
    parser.add_argument("--archs", default="90", help="CUDA architectures: A100 80, H100 90")
    parser.add_argument("--build", help="an already configured llama.cpp CUDA build folder")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    build = Path(args.build) if args.build else build_llama_cpp(work, args.archs)
    if args.build:
        sh(["cmake", "--build", build, "-j", str(os.cpu_count()), "--target", *TARGETS])
    pack_llama(build, out)

    download_wheels(out / "wheels", args.python)
    # What the GPU machine's image has stays here, for the dry run's fresh venv.
    image = work / "image-wheels"
    shutil.rmtree(image, ignore_errors=True)
    image.mkdir()
    for wheel in (out / "wheels").glob("*.whl"):
        if wheel.name.split("-")[0].lower().replace("_", "-") in ON_THE_DEVICE:
            wheel.rename(image / wheel.name)

    from inference.registry import embedded_model_path
    from tests.device.models import write_skeleton

    write_skeleton(embedded_model_path(), out / "smollm2.skeleton.gguf")

    for part in sorted(out.iterdir()):
        say(f"{part.name}: {size_mib(part):.1f} MiB")
    total = size_mib(out)
    say(f"the bundle: {total:.1f} MiB in {out}")
    if total > 60:
        say("too large to travel beside the repository (64 MiB in all)")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
    import django

    django.setup()
    sys.exit(main())
