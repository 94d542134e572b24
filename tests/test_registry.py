"""Registering models: inspection stored, load options checked before any worker
tries them, nothing half-registered, and the two ways in (addmodel, admin); models
in several files registered as a whole; the Mixtral preset's n_parallel."""

import os
from dataclasses import replace

import llama_cpp
import pytest
from django.core.management import CommandError, call_command

from inference.gguf import GGUFError
from inference.models import LanguageModel
from inference.registry import LoadOptionsError, register_model
from tests.fixtures import tiny_mixtral
from tests.fixtures.split_gguf import write_shards


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_mixtral.build_tiny_mixtral(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def long_context_path(tmp_path_factory):
    """The tiny model, claiming Mixtral 8x22B's trained context of 65,536 tokens."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-64k.gguf"
    return tiny_mixtral.build_tiny_mixtral(path, context_length=65536)


def test_it_stores_the_inspection_of_a_mixtral_file(db, tiny_path):
    model = register_model(name="tiny-mixtral", path=tiny_path, n_ctx=2048)
    model.refresh_from_db()
    assert model.inspection["expert_count"] == 8
    assert model.inspection["expert_used_count"] == 2
    assert model.inspection["parameter_count"] == tiny_mixtral.expected_parameter_count()
    assert model.architecture == "llama"
    assert model.context_length_trained == tiny_mixtral.CONTEXT_LENGTH
    assert model.has_chat_template
    for key in ("block_count", "head_count", "head_count_kv", "head_dim", "embedding_length"):
        assert model.inspection[key], key
    assert model.inspection["tensor_types"] == {"F16": 18, "F32": 5}
    assert model.inspection["tensor_bytes"] > 0 and model.inspection["file_type"] == "F16"


def test_a_bad_file_registers_nothing(db, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(GGUFError, match="bogus.gguf"):
        register_model(name="bogus", path=bogus)
    assert not LanguageModel.objects.filter(name="bogus").exists()


def test_a_bad_file_leaves_the_registered_model_as_it_was(db, tiny_path, tmp_path):
    register_model(name="tiny-mixtral", path=tiny_path, n_ctx=2048)
    with pytest.raises(GGUFError):
        register_model(name="tiny-mixtral", path=tmp_path / "gone.gguf", n_ctx=1024)
    model = LanguageModel.objects.get(name="tiny-mixtral")
    assert model.path == os.path.abspath(tiny_path) and model.n_ctx == 2048


def test_a_quantized_v_cache_without_flash_attention_is_refused(db, tiny_path):
    with pytest.raises(LoadOptionsError) as caught:
        register_model(
            name="tiny-mixtral", path=tiny_path, n_ctx=2048, type_v="q8_0", flash_attn="off"
        )
    assert "flash attention" in caught.value.errors["type_v"]
    assert not LanguageModel.objects.filter(name="tiny-mixtral").exists()


def test_a_quantized_k_cache_alone_is_accepted(db, tiny_path):
    model = register_model(name="tiny-mixtral", path=tiny_path, n_ctx=2048, type_k="q8_0")
    assert model.type_k == "q8_0" and model.type_v == "f16" and model.flash_attn == "auto"


def test_a_context_longer_than_the_trained_one_is_refused(db, tiny_path):
    with pytest.raises(LoadOptionsError) as caught:
        register_model(name="tiny-mixtral", path=tiny_path, n_ctx=8192)
    assert "4,096" in caught.value.errors["n_ctx"] and "8,192" in caught.value.errors["n_ctx"]


@pytest.mark.parametrize("n_batch", [0, 4096])
def test_a_batch_outside_one_and_n_ctx_is_refused(db, tiny_path, n_batch):
    with pytest.raises(LoadOptionsError) as caught:
        register_model(name="tiny-mixtral", path=tiny_path, n_ctx=2048, n_batch=n_batch)
    assert "n_batch" in caught.value.errors


def test_the_a100_preset_sets_the_64k_quantized_cache(db, long_context_path):
    model = register_model(
        name="mixtral-8x22b", path=long_context_path, preset="mixtral-8x22b-a100-80gb"
    )
    assert (model.n_ctx, model.n_gpu_layers, model.flash_attn) == (65536, -1, "on")
    assert (model.type_k, model.type_v) == ("q8_0", "q8_0")


def test_the_a100_preset_takes_its_parallel_sequences_from_the_planner(db, long_context_path):
    from monitoring.planner.report import make_report

    model = register_model(
        name="mixtral-8x22b", path=long_context_path, preset="mixtral-8x22b-a100-80gb"
    )
    answer = make_report(
        gpu="a100-80gb", model="mixtral-8x22b", quant="Q3_K_M", n_ctx=65536, kv="q8_0",
        flash_attn=True,
    ).concurrency  # fmt: skip
    # 4 chats of 8,192 tokens and one job with the other 32,768 (docs/planner.md).
    assert model.n_parallel == answer.n_parallel == 5
    assert model.job_sequences == answer.job_sequences == 1


def test_the_presets_parallel_sequences_follow_the_catalog(db, long_context_path, monkeypatch):
    """Computed from the catalog when the preset is used, not written down beside it:
    a card with less memory holds a smaller KV pool, so fewer people at once."""
    from monitoring.planner import catalog

    card = catalog.GPUS["a100-80gb"]
    # 72,000 MiB leaves 6.5 GB after the weights and buffers: a pool of 53,620 q8_0
    # tokens, 3 chats of 8,192 in its half, and the job.
    monkeypatch.setitem(catalog.GPUS, "a100-80gb", replace(card, memory_bytes=72_000 * 2**20))
    model = register_model(name="m", path=long_context_path, preset="mixtral-8x22b-a100-80gb")
    assert model.n_parallel == 4


def test_options_given_with_the_preset_override_its_parallel_sequences(db, long_context_path):
    model = register_model(
        name="m", path=long_context_path, preset="mixtral-8x22b-a100-80gb", n_parallel=2
    )
    assert model.n_parallel == 2


def test_the_preset_is_refused_for_a_model_trained_on_less_context(db, tiny_path):
    with pytest.raises(LoadOptionsError, match="n_ctx"):
        register_model(name="m", path=tiny_path, preset="mixtral-8x22b-a100-80gb")


def test_addmodel_registers_and_prints_what_it_found(db, tiny_path, capsys):
    call_command(
        "addmodel",
        str(tiny_path),
        "--name",
        "tiny-mixtral",
        "--n-ctx",
        "1024",
        "--flash-attn",
        "on",
        "--type-v",
        "q4_0",
    )
    out = capsys.readouterr().out
    assert '"expert_count": 8' in out and "modelworker tiny-mixtral" in out
    model = LanguageModel.objects.get(name="tiny-mixtral")
    assert (model.n_ctx, model.flash_attn, model.type_v) == (1024, "on", "q4_0")


def test_addmodel_names_the_file_and_the_problem(db, tmp_path):
    with pytest.raises(CommandError, match="missing.gguf: no such file"):
        call_command("addmodel", str(tmp_path / "missing.gguf"), "--name", "m")
    assert not LanguageModel.objects.exists()


def test_addmodel_explains_refused_options(db, tiny_path):
    with pytest.raises(CommandError, match="--type-v: A quantized V cache"):
        call_command(
            "addmodel", str(tiny_path), "--name", "m", "--type-v", "q8_0", "--flash-attn", "off"
        )


@pytest.fixture
def admin_client_logged_in(db, client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-12345678")
    client.force_login(admin)
    return client


def admin_form(path, **overrides):
    form = {
        "name": "tiny-mixtral",
        "path": str(path),
        "description": "",
        "enabled": "on",
        "preset": "",
        "n_ctx": "2048",
        "n_gpu_layers": "0",
        "type_k": "f16",
        "type_v": "f16",
        "flash_attn": "auto",
        "n_threads": "0",
        "n_threads_batch": "0",
        "n_batch": "512",
        "n_parallel": "4",
        "job_sequences": "1",
        "split_mode": "layer",
        "main_gpu": "0",
        "tensor_split": "",
    }
    form.update(overrides)
    return form


def test_the_admin_page_inspects_the_file_on_save(admin_client_logged_in, tiny_path):
    response = admin_client_logged_in.post(
        "/admin/inference/languagemodel/add/", admin_form(tiny_path)
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    model = LanguageModel.objects.get(name="tiny-mixtral")
    assert model.inspection["expert_count"] == 8


def test_the_admin_page_shows_why_a_file_is_refused(admin_client_logged_in, tmp_path):
    text = tmp_path / "readme.gguf"
    text.write_text("hello")
    response = admin_client_logged_in.post("/admin/inference/languagemodel/add/", admin_form(text))
    assert response.status_code == 200
    assert "not a GGUF file" in response.content.decode()
    assert not LanguageModel.objects.exists()


def test_the_admin_page_shows_why_options_are_refused(admin_client_logged_in, tiny_path):
    form = admin_form(tiny_path, type_v="q8_0", flash_attn="off")
    response = admin_client_logged_in.post("/admin/inference/languagemodel/add/", form)
    assert response.status_code == 200
    assert "needs flash attention" in response.content.decode()
    assert not LanguageModel.objects.exists()


def test_the_admin_page_takes_and_checks_the_gpu_split(admin_client_logged_in, tiny_path):
    form = admin_form(tiny_path, n_gpu_layers="-1", split_mode="none", tensor_split="3,1")
    response = admin_client_logged_in.post("/admin/inference/languagemodel/add/", form)
    assert response.status_code == 200
    assert "with split_mode none one GPU" in response.content.decode()
    form = admin_form(tiny_path, n_gpu_layers="-1", split_mode="row", tensor_split="3, 1")
    response = admin_client_logged_in.post("/admin/inference/languagemodel/add/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    model = LanguageModel.objects.get(name="tiny-mixtral")
    assert (model.split_mode, model.main_gpu, model.tensor_split) == ("row", 0, "3,1")


# --- flash attention, KV cache types and several GPUs ---------------------------------


def test_flash_attention_is_auto_unless_asked_everywhere(db, tiny_path):
    """llama.cpp's default: the model field, the registry, addmodel and the engine."""
    from inference.engine import FLASH_ATTN_TYPES, LoadOptions
    from inference.registry import load_options

    model = register_model(name="m", path=tiny_path, n_ctx=1024)
    assert model.flash_attn == "auto" and load_options(model).flash_attn == "auto"
    assert LoadOptions(path="x").flash_attn == "auto"
    assert FLASH_ATTN_TYPES["auto"] == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    for choice in ("on", "off", "auto"):
        call_command(
            "addmodel", str(tiny_path), "--name", "m", "--n-ctx", "1024", "--flash-attn", choice
        )
        assert LanguageModel.objects.get(name="m").flash_attn == choice
    with pytest.raises(LoadOptionsError, match='"auto", "on" or "off"'):
        register_model(n_ctx=1024, name="m", path=tiny_path, flash_attn="maybe")


@pytest.mark.parametrize("flash_attn", ["auto", "on"])
def test_mixed_kv_cache_types_on_a_gpu_are_refused_naming_the_build_flag(db, tiny_path, flash_attn):
    with pytest.raises(LoadOptionsError) as caught:
        register_model(
            n_ctx=1024, name="m", path=tiny_path, n_gpu_layers=-1, type_k="q8_0", type_v="q4_0",
            flash_attn=flash_attn,
        )  # fmt: skip
    assert "GGML_CUDA_FA_QUANTS=all" in caught.value.errors["type_v"]
    assert not LanguageModel.objects.exists()


def test_mixed_kv_cache_types_are_accepted_where_no_cuda_kernel_is_needed(db, tiny_path):
    # On the CPU; and on a GPU without flash attention (only K quantized then).
    register_model(n_ctx=1024, name="cpu", path=tiny_path, type_k="q8_0", type_v="q4_0")
    model = register_model(
        n_ctx=1024, name="gpu", path=tiny_path, n_gpu_layers=-1, type_k="q8_0", flash_attn="off"
    )
    assert (model.type_k, model.type_v) == ("q8_0", "f16")
    # The same types on a GPU have their kernel in the default build.
    register_model(
        n_ctx=1024, name="same", path=tiny_path, n_gpu_layers=-1, type_k="q8_0", type_v="q8_0"
    )


def test_a_build_with_every_kernel_accepts_mixed_types_on_a_gpu(db, tiny_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CUDA_FA_QUANTS", "all")
    register_model(
        n_ctx=1024, name="m", path=tiny_path, n_gpu_layers=-1, type_k="q8_0", type_v="q4_0"
    )
    monkeypatch.setenv("LLAMA_CUDA_FA_QUANTS", "q8_0-q8_0;q8_0-f16")
    register_model(
        n_ctx=1024, name="m", path=tiny_path, n_gpu_layers=-1, type_k="q8_0", type_v="f16"
    )
    with pytest.raises(LoadOptionsError, match="q4_0 V cache"):
        register_model(
            n_ctx=1024, name="m", path=tiny_path, n_gpu_layers=-1, type_k="q8_0", type_v="q4_0"
        )


def test_the_gpu_split_defaults_are_llama_cpps(db, tiny_path):
    from inference.registry import load_options

    model = register_model(name="m", path=tiny_path, n_ctx=1024)
    assert (model.split_mode, model.main_gpu, model.tensor_split) == ("layer", 0, "")
    options = load_options(model)
    assert (options.split_mode, options.main_gpu, options.tensor_split) == ("layer", 0, ())


def test_a_gpu_split_is_registered_and_given_to_the_engine(db, tiny_path):
    from inference.registry import load_options

    model = register_model(
        n_ctx=1024,
        name="m",
        path=tiny_path,
        n_gpu_layers=-1,
        split_mode="row",
        tensor_split=" 3, 1.5 ",
    )
    assert model.tensor_split == "3,1.5"
    options = load_options(model)
    assert (options.split_mode, options.tensor_split) == ("row", (3.0, 1.5))
    model = register_model(
        n_ctx=1024, name="one", path=tiny_path, n_gpu_layers=-1, split_mode="none", main_gpu=1
    )
    assert (load_options(model).split_mode, load_options(model).main_gpu) == ("none", 1)


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"split_mode": "tensor"}, "split_mode", "split_mode is one of none, layer, row"),
        ({"main_gpu": -1}, "main_gpu", "main_gpu is a GPU index"),
        ({"main_gpu": 1}, "main_gpu", "with split_mode layer llama.cpp spreads"),
        ({"main_gpu": 1, "split_mode": "none", "n_gpu_layers": 0}, "main_gpu", "n_gpu_layers is 0"),
        ({"tensor_split": "3;1"}, "tensor_split", "comma-separated numbers"),
        ({"tensor_split": "3,-1"}, "tensor_split", "at least 0"),
        ({"tensor_split": "0,0"}, "tensor_split", "at least one share above 0"),
        ({"tensor_split": ",".join(["1"] * 17)}, "tensor_split", "at most 16 GPUs"),
        ({"tensor_split": "3,1", "split_mode": "none"}, "tensor_split", "split_mode none"),
        ({"tensor_split": "3,1", "n_gpu_layers": 0}, "tensor_split", "n_gpu_layers is 0"),
    ],
)  # fmt: skip
def test_a_bad_gpu_split_is_refused_with_its_reason(db, tiny_path, options, field, message):
    options = {"n_gpu_layers": -1} | options
    with pytest.raises(LoadOptionsError) as caught:
        register_model(n_ctx=1024, name="m", path=tiny_path, **options)
    assert message in caught.value.errors[field]
    assert not LanguageModel.objects.exists()


def test_addmodel_takes_the_gpu_split(db, tiny_path, capsys):
    call_command(
        "addmodel", str(tiny_path), "--name", "m", "--n-ctx", "1024", "--n-gpu-layers", "-1",
        "--split-mode", "none", "--main-gpu", "1",
    )  # fmt: skip
    assert "split_mode=none main_gpu=1 tensor_split=-" in capsys.readouterr().out
    call_command(
        "addmodel", str(tiny_path), "--name", "m", "--n-ctx", "1024",
        "--split-mode", "layer", "--main-gpu", "0", "--tensor-split", "1,1",
    )  # fmt: skip
    model = LanguageModel.objects.get(name="m")
    assert (model.split_mode, model.main_gpu, model.tensor_split) == ("layer", 0, "1,1")
    with pytest.raises(CommandError, match="--tensor-split: tensor_split is comma-separated"):
        call_command(
            "addmodel", str(tiny_path), "--name", "m", "--n-ctx", "1024", "--tensor-split", "a,b"
        )


# --- a model in several files ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shards(tiny_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    return write_shards(tiny_path, folder / "tiny-q.gguf", max_tensors=8)


def copy_set(shards, folder, skip=()):
    folder.mkdir()
    for number, shard in enumerate(shards, start=1):
        if number not in skip:
            (folder / shard.name).write_bytes(shard.read_bytes())
    return folder / shards[0].name


def test_a_split_model_is_registered_as_a_whole(db, tiny_path, tiny_shards):
    single = register_model(name="one", path=tiny_path, n_ctx=1024).inspection
    model = register_model(name="split", path=tiny_shards[0], n_ctx=1024)
    model.refresh_from_db()
    assert model.path == str(tiny_shards[0])
    assert model.inspection["files"] == [str(p) for p in tiny_shards]
    for key in ("parameter_count", "tensor_count", "tensor_bytes", "tensor_types"):
        assert model.inspection[key] == single[key], key
    assert model.inspection["parameter_count"] == tiny_mixtral.expected_parameter_count()
    total = sum(p.stat().st_size for p in tiny_shards)
    assert model.inspection["file_bytes"] == total
    assert model.files_summary == f"{total / 1e6:.1f} MB in 3 files"


def test_addmodel_lists_every_file_of_a_split_model(db, tiny_shards, capsys):
    call_command("addmodel", str(tiny_shards[0]), "--name", "split", "--n-ctx", "1024")
    out = capsys.readouterr().out
    assert "MB in 3 files:" in out
    for shard in tiny_shards:
        assert f"\n  {shard}" in out
    assert f'"parameter_count": {tiny_mixtral.expected_parameter_count()}' in out


def test_a_missing_file_registers_nothing_and_names_it(db, tiny_shards, tmp_path):
    first = copy_set(tiny_shards, tmp_path / "partial", skip={3})
    with pytest.raises(CommandError) as caught:
        call_command("addmodel", str(first), "--name", "split")
    assert "split into 3 files and 1 is missing" in str(caught.value)
    assert tiny_shards[2].name in str(caught.value)
    assert not LanguageModel.objects.exists()


def test_a_foreign_file_registers_nothing_and_names_it(db, tiny_path, tiny_shards, tmp_path):
    other = write_shards(tiny_path, tmp_path / "other.gguf", max_tensors=5)
    first = copy_set(tiny_shards, tmp_path / "mixed")
    foreign = tmp_path / "mixed" / tiny_shards[1].name
    foreign.write_bytes(other[1].read_bytes())
    register_model(name="split", path=tiny_shards[0], n_ctx=1024)
    with pytest.raises(GGUFError, match=f"{foreign}: not part of .* file 2 of 5"):
        register_model(name="split", path=first, n_ctx=2048)
    model = LanguageModel.objects.get()
    assert model.path == str(tiny_shards[0]) and model.n_ctx == 1024


def test_addmodel_given_a_later_file_names_the_first(db, tiny_shards):
    with pytest.raises(CommandError) as caught:
        call_command("addmodel", str(tiny_shards[1]), "--name", "split")
    assert f"give the first one: {tiny_shards[0]}" in str(caught.value)
    assert not LanguageModel.objects.exists()


def test_a_split_model_in_the_hubs_cache_is_registered_by_its_links(db, tiny_shards, tmp_path):
    """The Hub's cache keeps each file as a blob named by its hash and links the
    published name to it; llama.cpp finds the other files by the link's name."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for number, shard in enumerate(tiny_shards):
        blob = blobs / f"{number:064x}"
        blob.write_bytes(shard.read_bytes())
        (snapshot / shard.name).symlink_to(blob)
    model = register_model(name="split", path=snapshot / tiny_shards[0].name, n_ctx=1024)
    assert model.path == str(snapshot / tiny_shards[0].name)
    assert len(model.inspection["files"]) == 3


def test_the_admin_page_refuses_a_split_model_missing_a_file(
    admin_client_logged_in, tiny_shards, tmp_path
):
    first = copy_set(tiny_shards, tmp_path / "partial", skip={2})
    response = admin_client_logged_in.post(
        "/admin/inference/languagemodel/add/", admin_form(first, n_ctx="1024")
    )
    assert response.status_code == 200
    assert tiny_shards[1].name in response.content.decode()
    assert not LanguageModel.objects.exists()


def test_the_admin_lists_a_split_model_with_its_size_and_files(admin_client_logged_in, tiny_shards):
    register_model(name="split", path=tiny_shards[0], n_ctx=1024)
    page = admin_client_logged_in.get("/admin/inference/languagemodel/").content.decode()
    assert "MB in 3 files" in page


def test_the_admin_preset_takes_the_planners_parallel_sequences(
    admin_client_logged_in, long_context_path
):
    form = admin_form(long_context_path, preset="mixtral-8x22b-a100-80gb", n_parallel="4")
    response = admin_client_logged_in.post("/admin/inference/languagemodel/add/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    model = LanguageModel.objects.get(name="tiny-mixtral")
    assert (model.n_ctx, model.type_v, model.n_parallel) == (65536, "q8_0", 5)
