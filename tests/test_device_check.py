"""The device check's model skeleton: what travels instead of the weights writes a
model that llama.cpp loads with the same keys, tokenizer, tensor shapes and types."""

from __future__ import annotations

import gguf
import pytest

from inference.engine import Engine, LoadOptions, Request, Sampling
from inference.tokens import tokenizer_for
from tests.device.check import planner_device
from tests.device.models import TENSORS_KEY, from_skeleton, write_skeleton
from tests.fixtures.tiny_mixtral import build_tiny_mixtral


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device")
    real = build_tiny_mixtral(folder / "real.gguf")
    skeleton = write_skeleton(real, folder / "skeleton.gguf")
    return real, skeleton, from_skeleton(skeleton, folder / "shaped.gguf", seed=3)


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and key != TENSORS_KEY
    }


def tensors(path) -> list[tuple]:
    reader = gguf.GGUFReader(str(path))
    return [(t.name, tuple(int(n) for n in t.shape), t.tensor_type) for t in reader.tensors]


def test_the_skeleton_holds_no_weights_and_the_shaped_model_every_tensor(files):
    real, skeleton, shaped = files
    assert tensors(skeleton) == []
    assert skeleton.stat().st_size < real.stat().st_size / 5
    assert tensors(shaped) == tensors(real)
    assert fields(shaped) == fields(real)


def test_the_shaped_model_tokenizes_as_the_real_one_and_generates(files):
    real, _, shaped = files
    messages = [{"role": "user", "content": "hello sea world"}]
    prompt = tokenizer_for(str(real)).chat_tokens(messages)
    assert tokenizer_for(str(shaped)).chat_tokens(messages) == prompt
    engine = Engine(LoadOptions(path=str(shaped), n_ctx=512, n_parallel=1)).start()
    try:
        request = Request(prompt=prompt, sampling=Sampling(max_tokens=8, seed=1), tenant="t")
        engine.submit(request)
        while (event := request.events.get())[0] != "end":
            pass
        assert event[1] is None
        assert request.stats.completion_tokens > 0
    finally:
        engine.close()


@pytest.mark.parametrize(
    "name, device",
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ],
)
def test_the_planner_compares_with_the_gpu_nvml_names(name, device):
    assert planner_device(name) == device
