"""The capacity planner: its arithmetic against numbers worked out by hand, the
`plan` command, the page, calibration from recorded runs, and bad input.

Hand computations are written out in the comments; constants are bytes unless named.
"""

from __future__ import annotations

import json
import statistics
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from monitoring.planner import catalog
from monitoring.planner.compute import (
    DOES_NOT_FIT,
    FITS,
    GIB,
    KIB,
    MIB,
    TIGHT,
    PlanError,
    compute_buffer_bytes,
    decode_bound_tokens_per_s,
    kv_bytes_per_token,
    plan,
    prompt_flops_per_token,
)
from monitoring.planner.concurrency import experts_touched
from monitoring.planner.present import as_text
from monitoring.planner.report import (
    _catalog_weights,
    make_report,
    read_model_file,
    suggested_n_parallel,
)

MIXTRAL_8X22B = catalog.MODELS["mixtral-8x22b"]
A100_80GB = catalog.GPUS["a100-80gb"]
HOST = catalog.HOSTS["cpu-ddr4-8ch"]


def catalog_plan(model, quant, gpu, n_ctx, kv="f16", flash_attn=None):
    entry = catalog.MODELS[model]
    weights = _catalog_weights(entry, catalog.QUANTS[quant])
    return plan(
        weights=weights,
        arch=entry.arch,
        device=catalog.GPUS[gpu],
        n_ctx=n_ctx,
        kv_type=kv,
        flash_attn=flash_attn,
        host=HOST,
    )


def embedded_gguf():
    from inference.registry import embedded_model_path

    return embedded_model_path()


# --- arithmetic ------------------------------------------------------------------


def test_it_sizes_the_mixtral_8x22b_kv_cache_at_224_kib_per_token_in_f16():
    # 2 (K and V) x 56 layers x 8 KV heads x 128 dims x 2 bytes = 229,376 = 224 KiB
    assert kv_bytes_per_token(MIXTRAL_8X22B.arch, "f16") == 229_376 == 224 * KIB


def test_it_sizes_the_mixtral_8x22b_64k_kv_cache_at_15_gb_f16_and_8_gb_q8_0():
    p16 = catalog_plan("mixtral-8x22b", "Q3_K_M", "a100-80gb", 65536, kv="f16")
    p8 = catalog_plan("mixtral-8x22b", "Q3_K_M", "a100-80gb", 65536, kv="q8_0")
    p4 = catalog_plan("mixtral-8x22b", "Q3_K_M", "a100-80gb", 65536, kv="q4_0")
    # 229,376 x 65,536 = 15,032,385,536 (15.0 GB)
    assert p16.kv_bytes == 15_032_385_536
    # q8_0: 34 bytes per 32 values: 229,376 / 2 x 34/32 = 121,856 per token x 65,536
    assert p8.kv_bytes == 121_856 * 65536 == 7_985_954_816
    # q4_0: 18 bytes per 32 values: 114,688 x 18/32 = 64,512 per token
    assert p4.kv_bytes == 64_512 * 65536
    assert round(p16.kv_bytes / 1e9, 1) == 15.0
    assert round(p8.kv_bytes / 1e9, 1) == 8.0


def test_it_counts_catalog_parameters_as_the_published_models_have_them():
    # Published parameter counts (Hugging Face model cards / safetensors metadata).
    assert catalog.MODELS["llama-3.1-8b"].arch.params_total == 8_030_261_248
    assert catalog.MODELS["llama-3.1-70b"].arch.params_total == 70_553_706_496
    assert catalog.MODELS["mistral-7b"].arch.params_total == 7_241_732_096
    assert catalog.MODELS["mixtral-8x7b"].arch.params_total == 46_702_792_704
    assert catalog.MODELS["smollm2-135m"].arch.params_total == 134_515_008
    # Mixtral 8x22B: ~140.6B in all, ~39B read per token (2 of 8 experts).
    assert round(MIXTRAL_8X22B.arch.params_total / 1e9, 1) == 140.6
    assert round(MIXTRAL_8X22B.arch.params_active / 1e9) == 39


def test_it_plans_llama_3_1_8b_q4_k_m_on_an_rtx_4090_as_worked_by_hand():
    p = catalog_plan("llama-3.1-8b", "Q4_K_M", "rtx-4090", 8192)
    # File: 8,030,261,248 params x 4.80 bits / 8 = 4,818,156,749 bytes (0.6 bytes/param).
    assert p.weights.file_bytes == 4_818_156_749
    # The embedding (128,256 x 4,096 = 525,336,576 params x 0.6) stays on the host.
    assert p.weights.token_embedding_bytes == 315_201_946
    gpu_weights = 4_818_156_749 - 315_201_946
    # KV: 2 x 32 x 8 x 128 x 2 = 131,072 per token x 8,192 = 1 GiB.
    assert p.kv_bytes == GIB
    # Compute (flash attention on): logits 512 x 128,256 x 4 = 262,668,288 beat the FFN
    # (512 x 14,336 x 2 x 4); plus residual 512 x 4,096 x 16 = 33,554,432.
    assert p.compute_buffer_bytes == 262_668_288 + 33_554_432
    total = gpu_weights + GIB + 296_222_720 + GIB
    assert p.total_bytes == total == 6_946_661_171
    assert p.headroom_bytes == 24564 * MIB - total
    assert p.verdict == FITS
    # Decode bound: 1,008 GB/s / (4,502,954,803 weights read + 1 GiB of KV) = 180.75
    assert p.decode_bound_tokens_per_s == pytest.approx(1008e9 / (4_502_954_803 + GIB))
    assert round(p.decode_bound_tokens_per_s, 1) == 180.8
    assert p.decode_estimate_tokens_per_s == pytest.approx(p.decode_bound_tokens_per_s * 0.6)
    assert p.settings.n_gpu_layers == -1


def test_it_offloads_llama_3_1_70b_to_44_layers_on_a_24_gb_card():
    p = catalog_plan("llama-3.1-70b", "Q4_K_M", "rtx-4090", 8192)
    assert p.verdict == DOES_NOT_FIT
    # Free for layers: 24,564 MiB - 1 GiB overhead - compute (logits 262,668,288 +
    # residual 512 x 8,192 x 16) = 24,353,701,888. Per layer: 41,071,411,201 / 80 bytes
    # of weights + 2 x 8 x 128 x 2 x 8,192 = 33,554,432 of KV = 546,947,072.
    # 24,353,701,888 / 546,947,072 = 44.5 -> 44 layers.
    assert p.compute_buffer_bytes == 262_668_288 + 67_108_864
    assert p.n_gpu_layers == 44
    assert p.settings.n_gpu_layers == 44
    assert p.offload_slowdown > 2
    assert p.decode_estimate_tokens_per_s < p.decode_bound_tokens_per_s * 0.6 / 2


def test_it_reads_only_the_experts_used_for_a_mixture_of_experts():
    p = catalog_plan("mixtral-8x7b", "Q4_K_M", "l40s", 32768, kv="q8_0")
    arch = catalog.MODELS["mixtral-8x7b"].arch
    # 2 of 8 experts: layers read = layers bytes x active layer params / layer params.
    expected_layers_read = round(
        p.weights.layers_bytes * arch.layer_params_active / arch.layer_params
    )
    assert p.weights.layers_read_per_token_bytes == expected_layers_read
    assert p.weights.read_per_token_bytes < p.weights.file_bytes / 3
    assert p.decode_bound_empty_tokens_per_s == pytest.approx(
        864e9 / (expected_layers_read + p.weights.output_bytes)
    )


def test_it_finds_the_largest_context_without_flash_attention_by_hand():
    p = catalog_plan("mixtral-8x22b", "Q3_K_M", "a100-80gb", 65536, flash_attn=False)
    # 80 GiB - 67,705,205,787 weights on the GPU - 1 GiB - residual 50,331,648
    # = 17,070,066,661 for the KV cache (229,376 per token), the f32 attention scores
    # and their f16 mask (512 x (48 heads x 4 + 2) = 99,328 per token): 51,932 tokens
    # -> 51,712 in steps of 256.
    assert p.weights.gpu_bytes == 67_705_205_787
    assert p.max_context_tokens == 51_712
    assert p.max_context_limited_by == "memory"
    assert p.verdict == DOES_NOT_FIT


def test_it_says_64k_of_mixtral_8x22b_on_80_gb_wants_a_quantized_kv_cache_and_flash_attention():
    p = catalog_plan("mixtral-8x22b", "Q3_K_M", "a100-80gb", 65536, kv="q8_0")
    verdicts = {(o.kv_type, o.flash_attn): (o.supported, o.verdict) for o in p.options}
    assert verdicts[("f16", False)] == (True, DOES_NOT_FIT)
    # f16 with flash attention fits on paper with 1.9 GB (2%) to spare: too tight.
    assert verdicts[("f16", True)] == (True, TIGHT)
    assert verdicts[("q8_0", True)] == (True, FITS)
    assert verdicts[("q4_0", True)] == (True, FITS)
    assert verdicts[("q8_0", False)][0] is False
    assert p.verdict == FITS
    assert p.flash_attn is True
    assert p.max_context_tokens == 65536
    assert p.max_context_limited_by == "trained context"
    assert "-fa auto -ctk q8_0 -ctv q8_0" in p.settings.command_line()


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_the_suggested_command_tells_llama_cpp_the_engines_flash_attention_mode(mode):
    """-fa as LanguageModel.flash_attn (the engine's flash_attn_type): off said
    explicitly, since llama-server's own default is auto."""
    from inference.engine import FLASH_ATTN_TYPES
    from monitoring.planner.report import FLASH_ATTN_MODES

    assert set(FLASH_ATTN_MODES) == set(FLASH_ATTN_TYPES)
    p = catalog_plan(
        "mixtral-8x22b", "Q3_K_M", "a100-80gb", 8192, flash_attn=FLASH_ATTN_MODES[mode]
    )
    assert f" -fa {mode} " in p.settings.command_line()
    assert p.settings.flash_attn_mode == mode
    assert p.flash_attn is (mode != "off")  # auto: llama.cpp turns it on, on CUDA and CPU


@pytest.mark.django_db
def test_the_command_takes_flash_attention_on_off_or_auto():
    for args, fa in (((), "auto"), (("--flash-attn", "off"), "off"), (("--no-flash-attn",), "off")):
        data = json.loads(run_plan("--gpu", "cpu-ddr4-2ch", "--model", str(embedded_gguf()),
                                   "--json", *args))  # fmt: skip
        assert f" -fa {fa} " in data["plan"]["settings"]["command_line"]
        assert data["plan"]["settings"]["flash_attn_mode"] == fa


def test_it_sets_the_rule_of_thumb_beside_the_real_q3_k_m_file():
    report = make_report(
        gpu="a100-80gb", model="mixtral-8x22b", quant="Q3_K_M", n_ctx=65536, kv="q8_0"
    )
    rule = report.rule_of_thumb
    # 141B x 0.4 bytes = 56.4 GB against a 67.8 GB file.
    assert rule.weights_bytes == 56_400_000_000
    assert rule.real_weights_bytes == 67_800_000_000
    assert report.claim.headroom_bytes == 23_600_000_000
    # 31 tokens/s against the bound: 2,039 GB/s / (18.78 GB of weights + 8.0 GB of KV).
    bound = 2039e9 / (report.plan.weights.read_per_token_bytes + 7_985_954_816)
    assert report.plan.decode_bound_tokens_per_s == pytest.approx(bound)
    assert report.claim_fraction_of_bound == pytest.approx(31 / bound)
    assert 0.35 < report.claim_fraction_of_bound < 0.45


def test_it_estimates_prompt_processing_from_flops():
    p = catalog_plan("llama-3.1-8b", "Q8_0", "h100-sxm", 4096)
    arch = catalog.MODELS["llama-3.1-8b"].arch
    # 2 x 7,504,924,672 active params + 2 x 32 x 32 x 128 x 4,096 attention FLOPs.
    flops = 2 * 7_504_924_672 + 2 * 32 * 32 * 128 * 4096
    assert arch.params_active == 7_504_924_672
    assert p.prompt_estimate_tokens_per_s == pytest.approx(989e12 * 0.3 / flops)
    assert p.full_prompt_seconds == pytest.approx(4096 / p.prompt_estimate_tokens_per_s)


def test_it_sizes_the_attention_scores_without_flash_attention():
    arch = MIXTRAL_8X22B.arch
    # 512 x 65,536 x 48 heads x 4 bytes = 6,442,450,944 of scores, 512 x 65,536 x 2
    # of mask, plus the residual stream.
    assert compute_buffer_bytes(arch, n_ctx=65536, flash_attn=False) == (
        6_442_450_944 + 67_108_864 + 512 * 6144 * 16
    )


# --- a real GGUF file -----------------------------------------------------------------


def test_it_reads_exact_bytes_and_architecture_from_a_gguf_file():
    gguf, arch, weights = read_model_file(embedded_gguf())
    assert gguf.architecture == "llama"
    assert gguf.file_type == "Q4_1"
    assert arch.n_layers == 30
    assert arch.n_kv_heads == 3
    assert arch.head_dim == 64
    assert arch.tied_embeddings is True
    # Sum of the tensors' n_bytes: Q4_1 layers, a Q8_0 embedding, f32 norms.
    assert weights.file_bytes == 96_576_768
    assert weights.token_embedding_bytes == 30_081_024
    # Tied: the output head is the embedding, read whole for every token.
    assert weights.read_per_token_bytes == weights.file_bytes
    # The catalog's architecture numbers agree with the file's.
    assert gguf.parameter_count == catalog.MODELS["smollm2-135m"].arch.params_total
    assert arch.params_total == gguf.parameter_count
    # 2 x 30 x 3 x 64 x 2 = 23,040 bytes per token in f16.
    assert kv_bytes_per_token(arch, "f16") == 23_040


LLAMA_CPP_SIZES = """
import sys
import llama_cpp
path = sys.argv[1]
for n_ctx, flash_attn, kv in ((4096, False, 1), (8192, False, 1), (8192, True, 8)):
    print(f"config {n_ctx} {flash_attn} {kv}", file=sys.stderr, flush=True)
    llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=1, flash_attn=flash_attn,
                    type_k=kv, type_v=kv, verbose=True)
"""


def test_it_predicts_the_kv_cache_and_compute_buffer_llama_cpp_allocates():
    """Load the real model with llama.cpp (CPU) and read the sizes it reports."""
    import re
    import subprocess
    import sys

    path = embedded_gguf()
    run = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_SIZES, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    blocks = run.stderr.split("config ")[1:]
    assert len(blocks) == 3
    _, arch, _ = read_model_file(path)
    for block, (n_ctx, flash_attn, kv) in zip(
        blocks, [(4096, False, "f16"), (8192, False, "f16"), (8192, True, "q8_0")], strict=True
    ):
        kv_mib = float(re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB", block).group(1))
        compute_mib = float(re.search(r"CPU compute buffer size =\s+([\d.]+) MiB", block).group(1))
        predicted_kv = kv_bytes_per_token(arch, kv) * n_ctx / MIB
        predicted_compute = compute_buffer_bytes(arch, n_ctx=n_ctx, flash_attn=flash_attn) / MIB
        assert predicted_kv == pytest.approx(kv_mib, abs=0.01)
        assert predicted_compute == pytest.approx(compute_mib, rel=0.10)


def test_it_refuses_a_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_bytes(b"hello, not a model")
    with pytest.raises(PlanError, match="notes.gguf: not a GGUF file"):
        read_model_file(bogus)


# --- the command -----------------------------------------------------------------------


def run_plan(*args) -> str:
    out = StringIO()
    call_command("plan", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_the_command_prints_the_plan_as_json():
    data = json.loads(
        run_plan(
            "--gpu",
            "a100-80gb",
            "--model",
            "mixtral-8x22b",
            "--quant",
            "Q3_K_M",
            "--ctx",
            "65536",
            "--kv",
            "q8_0",
            "--json",
        )
    )
    assert data["plan"]["kv_bytes"] == 7_985_954_816
    assert data["plan"]["kv_bytes_per_token"] == 121_856
    assert data["plan"]["fits"] is True
    assert data["plan"]["settings"]["type_k"] == "q8_0"
    assert data["rule_of_thumb"]["weights_bytes"] == 56_400_000_000
    assert data["claim"]["decode_tokens_per_s"] == 31.0


@pytest.mark.django_db
def test_the_command_explains_the_plan_in_words():
    text = run_plan("--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q3_K_M",
                    "--ctx", "65536")  # fmt: skip
    assert "tight" in text  # f16 is the default KV cache
    assert "229.4 kB" in text  # 224 KiB, in the decimal units the planner shows
    assert "15.0 GB" in text
    assert "56.4 GB" in text and "67.8 GB" in text
    assert "q8_0 KV cache with flash attention on" in text


@pytest.mark.django_db
def test_the_command_plans_a_gguf_path_from_its_own_tensors():
    data = json.loads(run_plan("--gpu", "l4", "--model", str(embedded_gguf()), "--json"))
    assert data["source"] == "file"
    assert data["quant"] == "Q4_1"
    assert data["plan"]["weights"]["file_bytes"] == 96_576_768
    assert data["plan"]["n_ctx"] == 8192  # the trained context, when --ctx is not given
    assert data["plan"]["kv_bytes"] == 23_040 * 8192


@pytest.mark.django_db
def test_the_command_plans_a_registered_model_by_name():
    from inference.models import LanguageModel

    LanguageModel.objects.create(name="smol", path=str(embedded_gguf()), n_ctx=2048)
    data = json.loads(run_plan("--gpu", "cpu-ddr4-2ch", "--model", "smol", "--json"))
    assert data["source"] == "registered"
    assert data["registered_model"] == "smol"
    assert data["plan"]["n_ctx"] == 2048  # the registered n_ctx
    assert data["plan"]["device"]["kind"] == "cpu"
    assert data["measured"] == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "a100-90gb", "--model", "mixtral-8x22b", "--quant", "Q3_K_M"],
         "unknown GPU 'a100-90gb'; valid: a100-40gb, a100-80gb, h100-pcie"),
        (["--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q3_K_X"],
         "unknown quantization 'Q3_K_X'; valid: Q2_K"),
        (["--gpu", "a100-80gb", "--model", "mixtral-8x22b"],
         "a catalog model needs a quantization"),
        (["--gpu", "a100-80gb", "--model", "gpt-5", "--quant", "Q4_K_M"],
         "unknown model 'gpt-5'; valid: catalog models: mixtral-8x22b"),
        (["--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q4_K_M", "--kv", "q5_1"],
         "unknown KV cache type 'q5_1'; valid: f16, q8_0, q4_0"),
        (["--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q4_K_M", "--kv", "q8_0",
          "--no-flash-attn"], "needs flash attention"),
        (["--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q4_K_M", "--ctx", "0"],
         "the context must be between 1 and"),
        (["--gpu", "a100-80gb", "--model", "missing/model.gguf"],
         "missing/model.gguf: no such file"),
        (["--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q3_K_M", "--users", "0"],
         "the number of users at once is at least 1, not 0"),
        (["--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q3_K_M", "--kv", "q8_0",
          "--users", "300"], "300 users at once would get less than 256 tokens each of a "
         "65,536-token KV pool; at most 255 users"),
    ],
)  # fmt: skip
def test_the_command_refuses_bad_input_with_the_valid_choices(args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        run_plan(*args)


@pytest.mark.django_db
def test_the_command_refuses_a_quantization_for_a_gguf_file():
    with pytest.raises(CommandError, match="--quant applies to catalog models only"):
        run_plan("--gpu", "l4", "--model", str(embedded_gguf()), "--quant", "Q8_0")


# --- estimate vs measured ---------------------------------------------------------------


def record_run(user, model, *, decode_tokens_per_s, context_used, vram=None, gpu_index=None):
    from inference.models import Generation
    from monitoring.models import RequestMetrics

    generation = Generation.objects.create(user=user, model=model, state=Generation.DONE)
    return RequestMetrics.objects.create(
        generation=generation,
        n_ctx=model.n_ctx,
        prompt_tokens=context_used - 20,
        completion_tokens=20,
        context_used=context_used,
        decode_tokens_per_s=decode_tokens_per_s,
        prompt_tokens_per_s=900.0,
        gpu_index=gpu_index,
        vram_process_peak_bytes=vram,
        rss_peak_bytes=300 * MIB,
    )


@pytest.fixture
def smol(db):
    from inference.models import LanguageModel

    return LanguageModel.objects.create(name="smol", path=str(embedded_gguf()), n_ctx=4096)


@pytest.mark.django_db
def test_it_calibrates_the_cpu_efficiency_from_recorded_runs(django_user_model, smol):
    user = django_user_model.objects.create_user("alice", password="alice-pass-123")
    runs = [(70.0, 100), (60.0, 1000), (65.0, 3000)]
    for tokens_per_s, context in runs:
        record_run(user, smol, decode_tokens_per_s=tokens_per_s, context_used=context)

    report = make_report(gpu="cpu-ddr4-2ch", model="smol")

    _, arch, weights = read_model_file(embedded_gguf())
    ratios = [
        t
        / decode_bound_tokens_per_s(
            weights,
            arch,
            bandwidth_bytes_per_s=51.2e9,
            kv_per_token=23_040,
            n_ctx=c,
        )
        for t, c in runs
    ]
    (cpu,) = report.comparisons
    assert cpu.runs == 3
    assert cpu.measured_decode_tokens_per_s == pytest.approx(65.0)
    assert cpu.measured_vram_peak_bytes is None
    assert cpu.calibrated.factor == pytest.approx(statistics.median(ratios))
    # The plan's realistic estimate now uses the calibrated factor.
    assert report.plan.decode_efficiency == cpu.calibrated
    assert report.plan.decode_estimate_tokens_per_s == pytest.approx(
        report.plan.decode_bound_tokens_per_s * statistics.median(ratios)
    )


@pytest.mark.django_db
def test_it_compares_gpu_runs_with_the_predicted_vram(django_user_model, smol):
    user = django_user_model.objects.create_user("alice", password="alice-pass-123")
    record_run(user, smol, decode_tokens_per_s=400.0, context_used=500, vram=900 * MIB, gpu_index=0)
    record_run(user, smol, decode_tokens_per_s=50.0, context_used=500)  # a CPU run

    report = make_report(gpu="l4", model="smol", n_ctx=4096)

    gpu, cpu = report.comparisons
    assert (gpu.device.name, gpu.runs, cpu.device.name, cpu.runs) == ("l4", 1, HOST.name, 1)
    assert gpu.measured_vram_peak_bytes == 900 * MIB
    # Predicted at the model's own settings: f16 KV at 4,096 tokens, no flash attention.
    p = report.plan
    assert gpu.predicted_vram_bytes == (
        p.weights.gpu_bytes
        + 23_040 * 4096
        + compute_buffer_bytes(p.arch, n_ctx=4096, flash_attn=False)
        + GIB
    )
    assert report.plan.decode_efficiency == gpu.calibrated
    # Prompt: 900 tokens/s x FLOPs per token of a 480-token prompt / the L4's 121 TFLOPS.
    flops = 2 * p.arch.params_active + 2 * 30 * 9 * 64 * 480
    assert prompt_flops_per_token(p.arch, 480) == flops
    assert gpu.calibrated_prompt.factor == pytest.approx(900 * flops / 121e12)
    assert report.plan.prompt_efficiency == gpu.calibrated_prompt


# --- the page ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_page_needs_a_login(client):
    response = client.get("/planner/")
    assert response.status_code == 302
    assert "/login/" in response["Location"]


@pytest.mark.django_db
def test_the_page_plans_the_target_deployment(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("bob", password="bob-pass-123"))
    response = client.get(
        "/planner/",
        {"gpu": "a100-80gb", "model": "mixtral-8x22b", "quant": "Q3_K_M", "ctx": "65536",
         "kv": "q8_0"},
    )  # fmt: skip
    assert response.status_code == 200
    html = response.content.decode()
    assert "fits, 8.9 GB free" in html
    assert "8.0 GB" in html and "56.4 GB" in html and "67.8 GB" in html
    assert "-ctk q8_0 -ctv q8_0" in html
    assert 'href="/planner/"' in html  # the nav links here


@pytest.mark.django_db
def test_the_page_shows_measurements_of_a_registered_model(client, django_user_model, smol):
    user = django_user_model.objects.create_user("bob", password="bob-pass-123")
    record_run(user, smol, decode_tokens_per_s=70.0, context_used=300)
    client.force_login(user)
    response = client.get("/planner/", {"gpu": "cpu-ddr4-2ch", "model": "smol", "ctx": "4096"})
    html = response.content.decode()
    assert response.status_code == 200
    assert "Estimate vs. measured" in html
    assert "no GPU measurements" in html
    assert "measured 70.0 tokens/s mean" in html


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gpu": "voodoo-2"}, "unknown GPU &#x27;voodoo-2&#x27;; valid: a100-40gb"),
        ({"ctx": "lots"}, "the context must be a whole number, not &#x27;lots&#x27;"),
        ({"users": "many"}, "the number of users at once must be a whole number"),
        ({"model": "../../etc/passwd.gguf"}, "unknown model"),
        ({"kv": "f32"}, "unknown KV cache type"),
    ],
)
def test_the_page_explains_bad_input(client, django_user_model, params, message):
    client.force_login(django_user_model.objects.create_user("bob", password="bob-pass-123"))
    response = client.get("/planner/", params)
    assert response.status_code == 400
    assert message in response.content.decode()


@pytest.mark.django_db
def test_the_page_says_when_a_registered_model_has_lost_its_file(client, django_user_model):
    from inference.models import LanguageModel

    LanguageModel.objects.create(name="gone", path="missing/gone.gguf")
    client.force_login(django_user_model.objects.create_user("bob", password="bob-pass-123"))
    response = client.get("/planner/", {"gpu": "l4", "model": "gone"})
    assert response.status_code == 400
    assert "missing/gone.gguf: no such file" in response.content.decode()


# --- sizes in one convention, offloading in plain words (issue 20) -----------------------


@pytest.mark.django_db
def test_every_size_is_shown_in_decimal_units(client, django_user_model):
    text = run_plan("--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q3_K_M",
                    "--ctx", "65536", "--kv", "q8_0")  # fmt: skip
    client.force_login(django_user_model.objects.create_user("bob", password="bob-pass-123"))
    page = client.get("/planner/").content.decode()
    for output in (text, page):
        for binary in ("GiB", "MiB", "KiB"):
            assert binary not in output
    # 81,920 MiB of GPU memory, 1 GiB of overhead, 121,856 bytes of KV per token.
    assert "85.9 GB" in text and "1.07 GB" in text and "121.9 kB" in text
    assert "1 GB = 10^9 bytes" in text


@pytest.mark.django_db
def test_offloading_says_how_many_layers_go_on_the_gpu():
    text = run_plan("--gpu", "rtx-4090", "--model", "llama-3.1-70b", "--quant", "Q4_K_M",
                    "--ctx", "8192")  # fmt: skip
    headline = text.splitlines()[0]
    assert "does not fit with every layer on the GPU" in headline
    assert "44 of the 80 layers fit on the GPU (n_gpu_layers 44)" in headline
    assert "the other 36 run on the host" in headline
    assert "offload 44" not in text


# --- how many people at once (issue 17) ---------------------------------------------------


def test_b_tokens_touch_the_expected_number_of_distinct_experts():
    # E x (1 - (1 - k/E)^B): each expert is missed by one token with probability 3/4.
    assert experts_touched(8, 2, 1) == 2.0
    assert experts_touched(8, 2, 4) == 8 * (1 - 0.75**4) == 5.46875
    assert experts_touched(8, 2, 8) == pytest.approx(7.2, abs=0.01)
    assert experts_touched(8, 2, 64) == pytest.approx(8.0)
    assert experts_touched(1, 1, 16) == 1.0  # a dense model reads its one FFN


def q8_mixtral_report(**kwargs):
    return make_report(
        gpu="a100-80gb", model="mixtral-8x22b", quant="Q3_K_M", n_ctx=65536, kv="q8_0", **kwargs
    )


def test_it_counts_the_kv_tokens_left_after_the_weights_and_buffers():
    c = q8_mixtral_report().concurrency
    # 81,920 MiB - 67,705,205,787 of weights on the GPU - compute buffer (FFN 512 x 16,384
    # x 2 experts x 2 x 4 = 134,217,728 + residual 50,331,648) - 1 GiB of overhead
    # = 16,935,848,933 bytes; / 121,856 per q8_0 token = 138,982 tokens.
    assert c.kv_free_bytes == 85_899_345_920 - 67_705_205_787 - 184_549_376 - 1_073_741_824
    assert c.kv_tokens_left == 138_982
    # The pool is the context planned: 65,536 tokens, the trained context.
    assert (c.pool_tokens, c.pool_limited_by) == (65536, "the context planned")


def test_it_suggests_four_chats_and_one_job_for_mixtral_on_an_a100():
    c = q8_mixtral_report().concurrency
    # Half the 65,536-token pool in 8,192-token chats: 4; the job keeps the other half.
    assert c.users_suggested and c.users == 4
    assert c.chat_context_tokens == 8192
    assert c.job_context_tokens == 32768
    assert (c.n_parallel, c.job_sequences) == (5, 1)


def test_an_f16_cache_holds_half_the_tokens_and_the_same_split():
    c = make_report(
        gpu="a100-80gb", model="mixtral-8x22b", quant="Q3_K_M", n_ctx=65536, kv="f16"
    ).concurrency
    # The same free memory (flash attention on), at 229,376 bytes per token.
    assert c.kv_tokens_left == 16_935_848_933 // 229_376 == 73_834
    assert c.users == 4 and c.n_parallel == 5


def test_asked_for_more_users_it_shares_the_pool_evenly():
    c = q8_mixtral_report(users=12).concurrency
    # 12 chats and a job share 65,536 tokens: 5,041 each, the job gets the rest.
    assert not c.users_suggested
    assert c.chat_context_tokens == 65536 // 13 == 5041
    assert c.job_context_tokens == 65536 - 12 * 5041 == 5044
    assert c.n_parallel == 13


def test_the_aggregate_decode_counts_the_experts_the_batch_touches():
    report = q8_mixtral_report()
    p, c = report.plan, report.concurrency
    w = p.weights
    # 5 sequences: shared weights and output head once, 6.1 of 8 experts per layer,
    # and every sequence's own KV cache (4 x 8,192 + 32,768 = 65,536 tokens).
    touched = 8 * (1 - 0.75**5)
    weights_read = w.read_per_token_bytes + w.expert_bytes * (touched - 2) / 8
    kv_read = 121_856 * 65536
    step_s = (weights_read + kv_read) / (2039e9 * 0.6)
    assert c.full.experts_touched == pytest.approx(touched)
    assert c.full.limited_by == "memory bandwidth"
    assert c.aggregate_decode_tokens_per_s == pytest.approx(5 / step_s)
    assert c.per_sequence_decode_tokens_per_s == pytest.approx(1 / step_s)
    # Reading 5 x 2 experts' worth (every expert, and more) would be slower.
    naive_s = (w.read_per_token_bytes + w.expert_bytes * (5 - 1) * 2 / 8 + kv_read) / (2039e9 * 0.6)
    assert c.aggregate_decode_tokens_per_s > 5 / naive_s * 1.3
    # More sequences, more tokens in all, fewer for each.
    assert c.aggregate_decode_tokens_per_s > p.decode_estimate_tokens_per_s * 2
    assert c.per_sequence_decode_tokens_per_s < c.single_tokens_per_s


def test_one_sequence_alone_decodes_as_fast_as_the_plan_estimates():
    from monitoring.planner.concurrency import decode_step

    p = q8_mixtral_report().plan
    alone = decode_step(
        p.weights,
        p.arch,
        p.device,
        contexts=[p.n_ctx],
        kv_bytes_per_token=p.kv_bytes_per_token,
        efficiency=p.decode_efficiency.factor,
        compute_efficiency=None,
    )
    assert alone.experts_touched == 2.0
    assert alone.tokens_per_s == pytest.approx(p.decode_estimate_tokens_per_s)


def test_a_model_that_needs_offloading_gets_no_concurrency_answer():
    report = make_report(gpu="rtx-4090", model="llama-3.1-70b", quant="Q4_K_M", n_ctx=8192)
    assert report.plan.n_gpu_layers == 44 and report.concurrency is None
    assert "does not fit the GPU with room for a KV cache" in as_text(report)


@pytest.mark.django_db
def test_the_command_answers_how_many_people_at_once():
    text = run_plan("--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant", "Q3_K_M",
                    "--ctx", "65536", "--kv", "q8_0")  # fmt: skip
    assert "KV tokens left after the weights and buffers  138,982 tokens" in text
    assert "4 chats x 8,192 tokens + 1 job x 32,768 tokens" in text
    assert "Context left for one job" in text and "32,768 tokens" in text
    assert "5 tokens at once read 6.1 of the 8 experts of each layer, not 5 x 2" in text
    assert "-np 5 -kvu" in text
    data = json.loads(run_plan("--gpu", "a100-80gb", "--model", "mixtral-8x22b", "--quant",
                               "Q3_K_M", "--kv", "q8_0", "--users", "8", "--json"))  # fmt: skip
    c = data["concurrency"]
    assert (c["users"], c["users_suggested"], c["n_parallel"]) == (8, False, 9)
    assert c["chat_context_tokens"] == 65536 // 9
    assert c["aggregate_decode_tokens_per_s"] == pytest.approx(c["full"]["tokens_per_s"])


@pytest.mark.django_db
def test_the_page_answers_how_many_people_at_once(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("bob", password="bob-pass-123"))
    html = client.get("/planner/", {"users": "12"}).content.decode()
    assert 'id="planner-concurrency"' in html
    assert "12 chats x 5,041 tokens + 1 job x 5,044 tokens" in html
    assert "n_parallel 13, job_sequences 1" in html
    html = client.get("/planner/").content.decode()
    assert "4 chats x 8,192 tokens + 1 job x 32,768 tokens" in html


def test_the_preset_answer_is_the_planners_for_the_presets_options():
    from inference.registry import PRESETS

    options = PRESETS["mixtral-8x22b-a100-80gb"]
    n_parallel = suggested_n_parallel(
        gpu="a100-80gb", model="mixtral-8x22b", quant="Q3_K_M", options=options
    )
    assert n_parallel == q8_mixtral_report(flash_attn=True).concurrency.n_parallel == 5


# --- a model in several files (issue 26) ---------------------------------------------------


def numbers(data, prefix="") -> dict:
    """Every number in a JSON report, by its path: what "planned exactly alike" compares."""
    if isinstance(data, dict):
        found = {}
        for key, value in data.items():
            found |= numbers(value, f"{prefix}.{key}")
        return found
    if isinstance(data, list):
        found = {}
        for index, value in enumerate(data):
            found |= numbers(value, f"{prefix}[{index}]")
        return found
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return {prefix: data}
    return {}


@pytest.fixture(scope="module")
def split_models(tmp_path_factory):
    """(single file, first shard) of the embedded model and of the tiny Mixtral."""
    from tests.fixtures import tiny_mixtral
    from tests.fixtures.split_gguf import write_shards

    folder = tmp_path_factory.mktemp("split")
    tiny = tiny_mixtral.build_tiny_mixtral(folder / "tiny.gguf")
    return {
        "smollm2": (
            embedded_gguf(),
            write_shards(embedded_gguf(), folder / "smol.gguf", max_tensors=100),
        ),  # fmt: skip
        "tiny-mixtral": (tiny, write_shards(tiny, folder / "tiny-split.gguf", max_size=20_000)),
    }


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["smollm2", "tiny-mixtral"])
def test_a_split_model_is_planned_exactly_as_the_single_file(split_models, name):
    single, shards = split_models[name]
    for gpu in ("l4", "cpu-ddr4-2ch"):
        one = make_report(gpu=gpu, model=str(single), n_ctx=2048).as_json()
        split = make_report(gpu=gpu, model=str(shards[0]), n_ctx=2048).as_json()
        assert numbers(split) == numbers(one)
        assert len(numbers(split)) > 50
        assert split["files"] == [str(p) for p in shards] and len(shards) > 2
    text = run_plan("--gpu", "l4", "--model", str(shards[0]))
    assert f"in {len(shards)} files" in text


@pytest.mark.django_db
def test_a_split_registered_model_is_compared_with_its_runs_as_the_single_file(
    split_models, django_user_model
):
    from inference.registry import register_model

    single, shards = split_models["smollm2"]
    user = django_user_model.objects.create_user("alice", password="alice-pass-123")
    for name, path in (("one", single), ("split", shards[0])):
        model = register_model(name=name, path=path, n_ctx=4096)
        for tokens_per_s, context in [(70.0, 100), (60.0, 1000)]:
            record_run(user, model, decode_tokens_per_s=tokens_per_s, context_used=context)
        record_run(user, model, decode_tokens_per_s=400.0, context_used=500, vram=900 * MIB,
                   gpu_index=0)  # fmt: skip

    one = make_report(gpu="l4", model="one").as_json()
    split = make_report(gpu="l4", model="split").as_json()
    assert len(split["measured"]) == 2
    assert numbers(split["measured"]) == numbers(one["measured"])
    assert numbers(split["plan"]) == numbers(one["plan"])


@pytest.mark.django_db
def test_the_page_plans_a_split_registered_model_as_a_whole(
    split_models, client, django_user_model
):
    from inference.registry import register_model

    single, shards = split_models["tiny-mixtral"]
    register_model(name="tiny-split", path=shards[0], n_ctx=1024)
    client.force_login(django_user_model.objects.create_user("bob", password="bob-pass-123"))
    html = client.get("/planner/", {"gpu": "l4", "model": "tiny-split"}).content.decode()
    _, _, weights = read_model_file(single)
    size = f"{weights.file_bytes / 1e6:.1f} MB"
    assert f"all the model&#x27;s tensors {size}, in {len(shards)} files" in html


@pytest.mark.django_db
def test_a_registered_model_named_like_a_catalog_model_is_planned_from_its_files(
    client, django_user_model
):
    """The default model is registered as smollm2-135m, a catalog name too."""
    from inference.models import LanguageModel

    LanguageModel.objects.create(name="smollm2-135m", path=str(embedded_gguf()), n_ctx=2048)
    data = json.loads(run_plan("--gpu", "l4", "--model", "smollm2-135m", "--json"))
    assert (data["source"], data["plan"]["n_ctx"]) == ("registered", 2048)
    assert data["plan"]["weights"]["file_bytes"] == 96_576_768
    data = json.loads(run_plan("--gpu", "l4", "--model", "smollm2-135m", "--quant", "Q8_0",
                               "--json"))  # fmt: skip
    assert (data["source"], data["quant"]) == ("catalog", "Q8_0")

    client.force_login(django_user_model.objects.create_user("bob", password="bob-pass-123"))
    html = client.get("/planner/", {"gpu": "l4", "model": "smollm2-135m", "quant": "",
                                    "ctx": ""}).content.decode()  # fmt: skip
    assert "at 2,048 tokens" in html and "Estimate vs. measured" in html
    html = client.get("/planner/", {"gpu": "l4", "model": "smollm2-135m", "quant": "Q8_0",
                                    "ctx": ""}).content.decode()  # fmt: skip
    assert "SmolLM2-135M Q8_0" in html and "at 8,192 tokens" in html
