"""The device check: what the first run on an NVIDIA GPU must show, offline.

    python -m tests.device.check --out report.json [--bin DIR] [--skeleton FILE]

It needs no PostgreSQL and no Redis: a SQLite file in a temporary folder, and the
engine, the per-request sampler, the recording, telemetry and the planner's
comparison run in this process, as they do in a model worker. On a machine without
a GPU (the dry run) every GPU-only assertion is skipped with its reason. Each check
is independent: one that fails does not stop the others. The exit status is 1 when
any check failed. docs/models.md ("The device check") says what each one asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path

GIB = 1024**3


def decode_tokens() -> int:
    """Tokens per measured answer: more on a GPU, where 128 take a fraction of a second."""
    return 512 if on_gpu() else 128


PASS, FAIL, SKIP = "pass", "fail", "skip"


class Skip(Exception):
    """A check that cannot run here; its message says why."""


class Checks:
    def __init__(self):
        self.results: list[dict] = []

    def run(self, name: str, check, *args):
        began = time.monotonic()
        try:
            values = check(*args) or {}
            status, detail = PASS, ""
        except Skip as exc:
            status, detail, values = SKIP, str(exc), {}
        except AssertionError as exc:
            status, detail, values = FAIL, str(exc) or traceback.format_exc(limit=3), {}
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check
            status, detail, values = FAIL, f"{type(exc).__name__}: {exc}", {}
            traceback.print_exc()
        seconds = round(time.monotonic() - began, 2)
        self.results.append(
            {"check": name, "status": status, "detail": detail, "seconds": seconds, **values}
        )
        mark = {PASS: "ok  ", FAIL: "FAIL", SKIP: "skip"}[status]
        print(f"[{mark}] {name} ({seconds} s){': ' + detail if detail else ''}", flush=True)
        if values:
            print("       " + json.dumps(values, default=str)[:600], flush=True)
        return values


def setup_django(folder: Path) -> None:
    os.environ["DATABASE_URL"] = f"sqlite:///{folder / 'device-check.sqlite3'}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
    os.environ.setdefault("VAR_DIR", str(folder))
    from django.core.management import call_command

    django_setup()
    call_command("migrate", verbosity=0)


def django_setup() -> None:
    """django.setup(), without daphne where it did not travel: the check serves no
    page, and daphne's Twisted stack would take 11 MB of the bundle."""
    import importlib.util

    import django
    from django.conf import settings

    if importlib.util.find_spec("daphne") is None:
        settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "daphne"]
    django.setup()


# --- what this machine is -------------------------------------------------------------
def machine() -> dict:
    import llama_cpp

    from monitoring import nvml

    gpus = [
        {
            "index": r.index,
            "name": r.name,
            "uuid": r.uuid,
            "memory_total_gib": round(r.memory_total_bytes / GIB, 1),
        }
        for r in nvml.read_all()
    ]
    return {
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "nvml": nvml.available(),
        "gpus": gpus,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def on_gpu() -> bool:
    import llama_cpp

    from monitoring import nvml

    return bool(llama_cpp.llama_supports_gpu_offload()) and nvml.available()


def require_gpu() -> None:
    import llama_cpp

    from monitoring import nvml

    if not llama_cpp.llama_supports_gpu_offload():
        raise Skip("llama.cpp has no GPU to offload to (a CPU build, or no device)")
    if not nvml.available():
        raise Skip("NVML finds no NVIDIA GPU here")


def planner_device(name: str) -> str:
    """The planner catalog's device for an NVML name."""
    name = name.lower()
    if "h200" in name:
        return "h200"
    if "h100" in name:
        return "h100-pcie" if "pcie" in name else "h100-sxm"
    if "a100" in name:
        return "a100-40gb" if "40gb" in name else "a100-80gb"
    return "h200"


# --- the models -----------------------------------------------------------------------
def prepare_models(folder: Path, skeleton: str | None) -> dict[str, str]:
    from tests.device.models import from_skeleton
    from tests.fixtures.tiny_mixtral import build_tiny_mixtral

    models = {"tiny-mixtral": str(build_tiny_mixtral(folder / "tiny-mixtral.gguf"))}
    try:
        from inference.registry import embedded_model_path

        real = embedded_model_path()
        if real.is_file():
            models["smollm2"] = str(real)
    except Exception:  # noqa: BLE001 - not installed: the skeleton stands in
        pass
    if "smollm2" not in models:
        if not skeleton or not Path(skeleton).is_file():
            raise SystemExit("neither the embedded model nor --skeleton is here")
        began = time.monotonic()
        models["smollm2"] = str(from_skeleton(skeleton, folder / "smollm2-shaped.gguf"))
        print(f"SmolLM2-shaped model written in {time.monotonic() - began:.1f} s", flush=True)
    return models


class Loaded:
    """One model loaded by the engine as a worker loads it, with what it took."""

    def __init__(self, name: str, path: str, n_parallel: int = 4, n_ctx: int = 4096):
        from inference import engine as engine_module
        from inference.engine import Engine, LoadOptions
        from monitoring import nvml
        from monitoring.planner.report import read_model_file

        self.name, self.path, self.n_ctx = name, path, n_ctx
        self.gguf, self.arch, self.weights = read_model_file(path)
        gpu = on_gpu()
        before = nvml.read(0) if gpu else None
        # The whole load's log: a model of many tensors overflows the engine's tail.
        engine_module.LLAMA_LOG_TAIL = deque(maxlen=100_000)
        began = time.monotonic()
        self.engine = Engine(
            LoadOptions(
                path=path, n_ctx=n_ctx, n_parallel=n_parallel, n_gpu_layers=-1 if gpu else 0
            )
        ).start()
        self.load_s = time.monotonic() - began
        after = nvml.read(0) if gpu else None
        self.log = list(engine_module.LLAMA_LOG_TAIL)
        self.vram_before = before.memory_used_bytes if before else None
        self.vram_after = after.memory_used_bytes if after else None

    def offloaded(self) -> tuple[int, int] | None:
        for line in self.log:
            match = re.search(r"offloaded (\d+)/(\d+) layers to GPU", line)
            if match:
                return int(match[1]), int(match[2])
        return None

    def kv_bytes(self) -> int:
        from monitoring.planner.compute import kv_bytes_per_token

        return round(self.n_ctx * kv_bytes_per_token(self.arch, "f16"))

    def close(self) -> None:
        self.engine.close()


def run_request(engine, prompt: list[int], max_tokens: int, seed: int = 1):
    from inference.engine import Request, Sampling

    request = Request(
        prompt=prompt,
        sampling=Sampling(max_tokens=max_tokens, temperature=0.7, seed=seed),
        tenant="device-check",
    )
    engine.submit(request)
    return request


def wait(request) -> str:
    text = ""
    while True:
        kind, value = request.events.get()
        if kind == "text":
            text += value
        elif kind == "end":
            if value is not None:
                raise AssertionError(f"the request failed: {value}")
            return text


def chat_prompt(path: str, words: int = 20, salt: int = 0) -> list[int]:
    """A chat prompt; a different salt, a different first line (nothing reused)."""
    from inference.tokens import tokenizer_for

    content = f"Question {salt}. " + "Describe the sea in a few sentences. " * max(1, words // 7)
    return tokenizer_for(path).chat_tokens([{"role": "user", "content": content}])


# --- the checks -----------------------------------------------------------------------
def check_offload(model: Loaded) -> dict:
    require_gpu()
    layers = model.offloaded()
    assert layers is not None, "llama.cpp's load log names no offloaded layers"
    done, total = layers
    assert done == total, f"only {done}/{total} layers were offloaded"
    grew = model.vram_after - model.vram_before
    needed = model.weights.gpu_bytes + model.kv_bytes()
    assert grew >= needed, (
        f"VRAM grew by {grew / 2**20:.0f} MiB at load, less than the weights on the GPU "
        f"and the KV cache ({needed / 2**20:.0f} MiB)"
    )
    return {
        "layers": f"{done}/{total}",
        "vram_growth_mib": round(grew / 2**20),
        "weights_and_kv_mib": round(needed / 2**20),
        "load_s": round(model.load_s, 2),
    }


def check_recorded_generation(model: Loaded) -> dict:
    """One generation through the worker's receivers: sampled, then recorded."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from inference.models import Generation, LanguageModel
    from inference.signals import generation_ended, generation_started
    from monitoring import nvml

    language_model, _ = LanguageModel.objects.update_or_create(
        name=f"device-{model.name}",
        defaults={
            "path": model.path,
            "n_ctx": model.n_ctx,
            "n_gpu_layers": -1 if on_gpu() else 0,
        },
    )
    user, _ = get_user_model().objects.get_or_create(username="device-check")
    gen = Generation.objects.create(
        user=user, model=language_model, prompt_text="(device check)", params={}
    )
    gen.claim("device-check")
    generation_started.send(sender=Generation, generation=gen)
    request = run_request(model.engine, chat_prompt(model.path, 200), max_tokens=256)
    gen.text = wait(request)
    gen.first_token_at = timezone.now()
    gen.finish(Generation.DONE, stats=request.stats)
    generation_ended.send(
        sender=Generation, generation=gen, stats=request.stats, n_ctx=model.engine.n_ctx
    )
    metrics = Generation.objects.get(pk=gen.pk).metrics
    values = {
        "completion_tokens": metrics.completion_tokens,
        "decode_tokens_per_s": round(metrics.decode_tokens_per_s or 0, 1),
        "ttft_ms": round(metrics.ttft_ms or 0, 1),
        "rss_peak_mib": round((metrics.rss_peak_bytes or 0) / 2**20),
    }
    assert metrics.completion_tokens > 1, "the generation wrote fewer than two tokens"
    if not on_gpu():
        assert metrics.gpu_index is None and metrics.vram_device_peak_bytes is None, (
            "GPU figures were recorded for a run on the CPU"
        )
        return values | {"gpu": "none: GPU fields are empty, as they must be"}
    direct = nvml.read(metrics.gpu_index)
    values |= {
        "gpu_index": metrics.gpu_index,
        "vram_device_mib": [
            round(b / 2**20)
            for b in (
                metrics.vram_device_start_bytes,
                metrics.vram_device_peak_bytes,
                metrics.vram_device_end_bytes,
            )
        ],
        "vram_process_peak_mib": round(metrics.vram_process_peak_bytes / 2**20)
        if metrics.vram_process_peak_bytes
        else None,
        "power_mean_w": metrics.power_mean_w,
        "energy_j": metrics.energy_j,
        "temperature_max_c": metrics.temperature_max_c,
        "direct_nvml": {
            "memory_used_mib": round(direct.memory_used_bytes / 2**20),
            "power_w": direct.power_w,
            "temperature_c": direct.temperature_c,
        },
    }
    for field in ("vram_device_start_bytes", "vram_device_peak_bytes", "vram_device_end_bytes"):
        assert (getattr(metrics, field) or 0) > 0, f"{field} is not positive"
    assert metrics.vram_device_peak_bytes >= metrics.vram_device_start_bytes
    assert (metrics.power_mean_w or 0) > 0, "no positive mean power"
    assert (metrics.energy_j or 0) > 0, "no positive energy"
    assert (metrics.temperature_max_c or 0) > 0, "no positive temperature"
    # The model is still loaded: the device's memory now is what the run ended with.
    assert abs(direct.memory_used_bytes - metrics.vram_device_end_bytes) < GIB, (
        "the recorded end VRAM disagrees with NVML read directly by over 1 GiB"
    )
    assert abs(direct.temperature_c - metrics.temperature_max_c) <= 15
    assert direct.power_limit_w is None or metrics.power_mean_w <= direct.power_limit_w * 1.2
    return values


def llama_bench(binary: Path, path: str, gpu: bool, n: int) -> float:
    """llama.cpp's own decode tokens/s for the model (tg<n>, mean of 3 runs)."""
    args = [str(binary), "-m", path, "-p", "0", "-n", str(n), "-r", "3", "-o", "json"]
    args += ["-ngl", "99" if gpu else "0"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise AssertionError(f"llama-bench failed: {out.stderr[-500:]}")
    rows = json.loads(out.stdout)
    return float(rows[0]["avg_ts"])


def check_decode_speed(model: Loaded, bin_dir: Path | None) -> dict:
    """One sequence through the engine against llama-bench on the same file."""
    bench = bin_dir / "llama-bench" if bin_dir else None
    speeds = []
    for seed in range(3):
        prompt = chat_prompt(model.path, salt=100 + seed)
        request = run_request(model.engine, prompt, max_tokens=decode_tokens(), seed=seed)
        wait(request)
        if request.stats.decode_tokens_per_s:
            speeds.append(request.stats.decode_tokens_per_s)
    assert speeds, "no run decoded two tokens or more"
    ours = sorted(speeds)[len(speeds) // 2]
    values = {"engine_decode_tokens_per_s": round(ours, 1)}
    if bench is None or not bench.is_file():
        raise Skip(f"no llama-bench to compare with (engine: {ours:.1f} tokens/s)")
    theirs = llama_bench(bench, model.path, on_gpu(), decode_tokens())
    return values | {
        f"llama_bench_tg{decode_tokens()}_tokens_per_s": round(theirs, 1),
        "engine_over_llama_bench": round(ours / theirs, 3),
    }


def llama_server_aggregate(binary: Path, path: str, prompts: list[list[int]], users: int) -> dict:
    """llama.cpp's server on its defaults (its slots, unified KV), `users` requests of
    decode_tokens() tokens at once (the same prompt tokens as ours): aggregate tokens/s."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [str(binary), "-m", path, "--port", str(port), "-c", "4096"]
    args += ["-ngl", "99" if on_gpu() else "0"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "llama-server exited"
            assert time.monotonic() < deadline, "llama-server did not come up in 120 s"
            time.sleep(0.2)

        def ask(seed: int) -> dict:
            body = {"prompt": prompts[seed], "n_predict": decode_tokens(), "temperature": 0.7}
            body["seed"] = seed
            body |= {"ignore_eos": True, "cache_prompt": False}
            request = urllib.request.Request(
                url + "/completion",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=300) as answer:
                return json.loads(answer.read())

        ask(9)  # warm-up
        alone = [ask(i)["timings"] for i in range(4, 7)]
        one = sorted(alone, key=lambda t: t["predicted_per_second"])[1]
        results: list[dict] = []
        began = time.monotonic()
        threads = [
            threading.Thread(target=lambda i=i: results.append(ask(i))) for i in range(users)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        tokens = sum(r["timings"]["predicted_n"] for r in results)
        return {
            "llama_server_one_user_tokens_per_s": round(one["predicted_per_second"], 1),
            "llama_server_one_user_prompt_ms": round(one["prompt_ms"], 1),
            "llama_server_aggregate_tokens_per_s": round(tokens / elapsed, 1),
            "llama_server_prompt_ms": [round(r["timings"]["prompt_ms"]) for r in results],
        }
    finally:
        server.terminate()
        server.wait(30)


def check_several_sequences(model: Loaded, bin_dir: Path | None, users: int = 4) -> dict:
    """`users` requests at once share the engine's batches; beside llama-server."""
    alone = []
    for seed in range(3):
        prompt = chat_prompt(model.path, salt=200 + seed)
        request = run_request(model.engine, prompt, max_tokens=decode_tokens(), seed=seed)
        wait(request)
        alone.append(request.stats)
    single = sorted(alone, key=lambda s: s.decode_tokens_per_s or 0)[1]
    began = time.monotonic()
    requests = [
        run_request(
            model.engine, chat_prompt(model.path, salt=300 + i), max_tokens=decode_tokens(), seed=i
        )
        for i in range(users)
    ]
    texts = [wait(r) for r in requests]
    elapsed = time.monotonic() - began
    tokens = sum(r.stats.completion_tokens for r in requests)
    shared = max(r.stats.batch_size_max for r in requests)
    assert all(texts), "a sequence wrote nothing"
    assert shared >= 2, f"the {users} sequences never shared a decode step"
    peer = {}
    server = bin_dir / "llama-server" if bin_dir else None
    if server is not None and server.is_file():
        prompts = [chat_prompt(model.path, salt=i) for i in range(400, 410)]
        peer = llama_server_aggregate(server, model.path, prompts, users)
    return peer | {
        "users": users,
        "aggregate_tokens_per_s": round(tokens / elapsed, 1),
        "one_user_tokens_per_s": round(single.decode_tokens_per_s or 0, 1),
        "one_user_first_token_ms": round((single.first_token - single.started) * 1000, 1),
        "batch_size_max": shared,
        "first_token_s": [
            round(r.stats.first_token - r.stats.started, 3) for r in requests if r.stats.first_token
        ],
    }


PROCESS_HOLDING_A_TOKENIZER = """
import os, sys, time
sys.argv = [sys.argv[1]]  # what settings see: the program this process pretends to be
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
from tests.device.check import django_setup
django_setup()
from inference.tokens import tokenizer_for
tokenizer_for(os.environ["MODEL_PATH"]).tokenize("hello")
print("ready", flush=True)
time.sleep(4)
"""


def vram_of_a_process_holding_a_tokenizer(program: str, path: str) -> int:
    """Device VRAM growth while a process started as `program` holds a tokenizer."""
    from monitoring import nvml

    before = nvml.read(0).memory_used_bytes
    env = dict(os.environ, MODEL_PATH=path)
    env.pop("WORKER_MODEL", None)
    process = subprocess.Popen(
        [sys.executable, "-c", PROCESS_HOLDING_A_TOKENIZER, program],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout.readline().strip() == "ready", f"the {program} process failed"
        return nvml.read(0).memory_used_bytes - before
    finally:
        process.wait(30)


def check_web_processes_leave_the_gpu_alone(path: str) -> dict:
    """A web process's tokenizer creates no CUDA context; an ordinary process's does."""
    require_gpu()
    web = vram_of_a_process_holding_a_tokenizer("daphne", path)
    plain = vram_of_a_process_holding_a_tokenizer("python", path)
    values = {"web_process_vram_mib": round(web / 2**20), "other_vram_mib": round(plain / 2**20)}
    assert web < 64 * 2**20, f"a web process took {web / 2**20:.0f} MiB of VRAM"
    return values


def check_telemetry() -> dict:
    """A telemetry round stores every GPU's reading (announcing it needs Redis)."""
    require_gpu()
    from monitoring import telemetry
    from monitoring.models import GpuSample

    try:
        telemetry.sample_once("device-check")
    except Exception as exc:  # noqa: BLE001 - Redis is absent on the device
        print(f"       telemetry announce skipped: {type(exc).__name__}", flush=True)
    from monitoring import nvml

    for r in nvml.read_all():
        assert r.uuid.startswith(("GPU-", "MIG-")) and r.name, f"GPU {r.index}: no UUID or name"
        assert 0 < r.memory_used_bytes < r.memory_total_bytes, f"GPU {r.index}: memory"
        assert (r.sm_clock_mhz or 0) > 0 and (r.mem_clock_mhz or 0) > 0, f"GPU {r.index}: clocks"
        assert r.utilization_pct is None or 0 <= r.utilization_pct <= 100
    rows = list(GpuSample.objects.filter(host="device-check"))
    assert rows, "no GPU sample stored"
    for row in rows:
        assert row.memory_total_bytes > 0 and (row.power_w or 0) > 0
        assert row.temperature_c and 10 < row.temperature_c < 110
    return {
        "gpus": len(rows),
        "samples": [
            {
                "name": r.name,
                "memory_used_mib": round(r.memory_used_bytes / 2**20),
                "utilization_pct": r.utilization_pct,
                "power_w": r.power_w,
                "temperature_c": r.temperature_c,
                "throttle_reasons": r.throttle_reasons,
            }
            for r in rows
        ],
    }


def check_planner(model: Loaded) -> dict:
    """The planner's prediction beside what this run measured."""
    from monitoring import nvml
    from monitoring.planner.report import make_report

    gpus = nvml.read_all()
    device = planner_device(gpus[0].name) if gpus else "h200"
    report = make_report(gpu=device, model=f"device-{model.name}").as_json()
    measured = report["measured"]
    assert measured, "the planner found no measured run of the model"
    return {"device": device, "measured": measured}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="device-check.json", help="the JSON report")
    parser.add_argument("--bin", help="folder with llama-bench (llama.cpp's own figure)")
    parser.add_argument("--skeleton", help="the SmolLM2 skeleton, when the model is absent")
    parser.add_argument(
        "--large",
        action="store_true",
        help="on a GPU, also an 8B-class F16 model (15 GB written there): weights-bound steps",
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="device-check-"))
    setup_django(folder)
    from inference.engine import capture_llama_log

    capture_llama_log()
    checks = Checks()
    report = {"machine": machine(), "checks": checks.results}
    print(json.dumps(report["machine"]), flush=True)
    models = prepare_models(folder, args.skeleton)
    bin_dir = Path(args.bin) if args.bin else None
    if args.large and on_gpu():
        from tests.device.models import llama_shaped

        began = time.monotonic()
        skeleton = args.skeleton or models["smollm2"]
        models["llama-8b-shaped"] = str(llama_shaped(skeleton, folder / "llama-8b-shaped.gguf"))
        print(f"8B-shaped model written in {time.monotonic() - began:.1f} s", flush=True)
    checks.run(
        "web processes leave the GPU alone",
        check_web_processes_leave_the_gpu_alone,
        models["tiny-mixtral"],
    )
    for name, path in models.items():
        held: list[Loaded] = []

        def load(name=name, path=path, held=held) -> dict:
            held.append(Loaded(name, path))
            wanted = ("using device", "offloaded", "buffer size", "Flash Attention")
            lines = [line for line in held[0].log if any(w in line for w in wanted)]
            return {"load_s": round(held[0].load_s, 2), "log": lines[:24]}

        checks.run(f"{name}: load", load)
        if not held:
            continue
        model = held[0]
        checks.run(f"{name}: every layer offloaded", check_offload, model)
        checks.run(f"{name}: a generation records what it cost", check_recorded_generation, model)
        checks.run(f"{name}: decode speed against llama-bench", check_decode_speed, model, bin_dir)
        checks.run(f"{name}: several sequences at once", check_several_sequences, model, bin_dir)
        checks.run(f"{name}: the planner's comparison", check_planner, model)
        model.close()
    checks.run("telemetry: a round of every GPU", check_telemetry)
    report["seconds"] = round(time.monotonic() - began, 1)
    report["threads_alive"] = threading.active_count()
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    failed = [r["check"] for r in checks.results if r["status"] == FAIL]
    print(
        f"\n{len(checks.results)} checks: {len(failed)} failed, "
        f"{sum(r['status'] == SKIP for r in checks.results)} skipped; "
        f"report in {args.out} ({report['seconds']} s)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
