"""GGUF inspection: the facts stored at registration, and the errors for bad files,
for a model in one file and for one in several (shards)."""

from dataclasses import replace

import pytest
from django.core.cache import caches

from inference import gguf
from inference.gguf import GGUFError, inspect_gguf
from inference.registry import embedded_model_path
from tests.fixtures import tiny_mixtral
from tests.fixtures.split_gguf import write_shards


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_mixtral.build_tiny_mixtral(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_it_reports_the_mixture_of_experts_shape(tiny_path):
    report = inspect_gguf(tiny_path)
    assert report.architecture == "llama"
    assert report.expert_count == 8 and report.expert_used_count == 2
    assert report.block_count == tiny_mixtral.N_LAYER
    assert report.head_count == 4 and report.head_count_kv == 2 and report.head_dim == 16
    assert report.embedding_length == 64
    assert report.context_length == tiny_mixtral.CONTEXT_LENGTH
    assert report.has_chat_template


def test_it_counts_parameters_exactly_from_tensor_shapes(tiny_path):
    report = inspect_gguf(tiny_path)
    assert report.parameter_count == tiny_mixtral.expected_parameter_count()
    # f16 matrices (2 bytes) and f32 norms (4 bytes): the exact bytes follow.
    norms = 2 * tiny_mixtral.N_LAYER + 1
    norm_params = norms * tiny_mixtral.N_EMBD
    assert report.tensor_bytes == 2 * (report.parameter_count - norm_params) + 4 * norm_params


def test_it_histograms_the_tensor_types(tiny_path):
    report = inspect_gguf(tiny_path)
    # embeddings and output; per layer q, k, v, output, router and 3 merged experts
    matrices = 2 + 8 * tiny_mixtral.N_LAYER
    assert report.tensor_types == {"F16": matrices, "F32": 2 * tiny_mixtral.N_LAYER + 1}
    assert report.file_type == "F16"


def test_it_reads_the_embedded_model_without_loading_it():
    report = inspect_gguf(embedded_model_path())
    assert report.parameter_count == 134_515_008  # SmolLM2-135M
    assert report.file_type == "Q4_1"
    assert report.expert_count is None
    assert report.context_length == 8192
    assert report.head_count_kv == 3 and report.head_dim == 64
    assert report.kv_bytes_per_token_f16 == 2 * 30 * 3 * 64 * 2


def test_it_names_a_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(GGUFError, match="nope.gguf: no such file"):
        inspect_gguf(path)


def test_it_refuses_a_directory(tmp_path):
    with pytest.raises(GGUFError, match="not a file"):
        inspect_gguf(tmp_path)


def test_it_refuses_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, not a model")
    with pytest.raises(GGUFError, match="notes.gguf: not a GGUF file"):
        inspect_gguf(path)


def test_it_refuses_a_file_cut_in_its_tensor_data(tiny_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_path.read_bytes()[: tiny_path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="cut.gguf: (damaged or truncated|truncated)"):
        inspect_gguf(cut)


def test_it_refuses_a_file_missing_its_last_bytes(tiny_path, tmp_path):
    cut = tmp_path / "tail.gguf"
    cut.write_bytes(tiny_path.read_bytes()[:-64])
    with pytest.raises(GGUFError, match="tail.gguf: (damaged or truncated|truncated)"):
        inspect_gguf(cut)


def test_it_refuses_a_file_cut_inside_its_header(tiny_path, tmp_path):
    cut = tmp_path / "header.gguf"
    cut.write_bytes(tiny_path.read_bytes()[:200])
    with pytest.raises(GGUFError, match="header.gguf: (damaged or truncated|truncated)"):
        inspect_gguf(cut)


def test_another_process_takes_the_header_from_the_shared_cache(tiny_path, tmp_path):
    """Reading a header takes the gguf library seconds over a real vocabulary: the
    first process to read a file leaves it in Django's "gguf" cache for the others,
    under the file's path, size and modification time."""
    copy = tmp_path / "shared.gguf"
    copy.write_bytes(tiny_path.read_bytes())
    inspect_gguf(copy)
    stat = copy.stat()
    key = gguf._cache_key(copy, stat.st_size, stat.st_mtime_ns)
    cached = caches["gguf"].get(key)
    assert cached is not None and cached.tensors
    # Mark the shared copy, then read as a new process would (its own cache empty).
    caches["gguf"].set(key, replace(cached, metadata={**cached.metadata, "general.name": "X"}))
    gguf._read_header.cache_clear()
    assert inspect_gguf(copy).name == "X"


def test_a_file_changed_after_its_inspection_is_read_again(tiny_path, tmp_path):
    """Reports are kept per process while the file stays the same (the library takes
    seconds over a real vocabulary); a file cut or replaced since is read anew."""
    copy = tmp_path / "model.gguf"
    copy.write_bytes(tiny_path.read_bytes())
    first = inspect_gguf(copy)
    first.tensor_types.clear()  # a caller's change does not reach the kept report
    again = inspect_gguf(copy)
    assert again.tensor_types and again.parameter_count == first.parameter_count
    copy.write_bytes(tiny_path.read_bytes()[:-64])
    with pytest.raises(GGUFError, match="model.gguf: (damaged or truncated|truncated)"):
        inspect_gguf(copy)
    copy.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(GGUFError, match="model.gguf"):
        inspect_gguf(copy)


# --- a model in several files -------------------------------------------------------

# What differs between a split model's report and the single file's: where it is.
# (file_bytes too: each shard has a header and padding of its own.)
PLACE = {"path", "files", "file_bytes"}


@pytest.fixture(scope="module")
def smol_shards(tmp_path_factory):
    """The embedded SmolLM2 in three files of at most 100 tensors each."""
    dest = tmp_path_factory.mktemp("smol-split") / "smol.gguf"
    return write_shards(embedded_model_path(), dest, max_tensors=100)


@pytest.fixture(scope="module")
def tiny_shards(tiny_path, tmp_path_factory):
    """The tiny Mixtral in files of at most 20 kB of tensors each."""
    dest = tmp_path_factory.mktemp("tiny-split") / "tiny.gguf"
    return write_shards(tiny_path, dest, max_size=20_000)


def facts(report) -> dict:
    data = report.as_json()
    return {key: value for key, value in data.items() if key not in PLACE}


def test_the_split_embedded_model_is_inspected_exactly_as_the_single_file(smol_shards):
    single = inspect_gguf(embedded_model_path())
    split = inspect_gguf(smol_shards[0])
    assert len(smol_shards) == 3
    assert facts(split) == facts(single)
    assert split.parameter_count == 134_515_008 and split.tensor_bytes == 96_576_768
    assert split.tensor_count == 272
    assert [t.name for t in split.tensors] == [t.name for t in single.tensors]
    assert split.path == str(smol_shards[0])
    assert split.files == [str(p) for p in smol_shards]
    assert split.file_bytes == sum(p.stat().st_size for p in smol_shards)


def test_the_split_tiny_mixtral_is_inspected_exactly_as_the_single_file(tiny_path, tiny_shards):
    split = inspect_gguf(tiny_shards[0])
    assert len(tiny_shards) > 3
    assert facts(split) == facts(inspect_gguf(tiny_path))
    assert split.parameter_count == tiny_mixtral.expected_parameter_count()
    assert split.expert_count == 8 and split.expert_used_count == 2
    assert split.files == [str(p) for p in tiny_shards]


def test_a_first_file_without_tensors_still_counts_every_tensor(tiny_path, tmp_path):
    shards = write_shards(tiny_path, tmp_path / "meta-first.gguf", first_without_tensors=True)
    split = inspect_gguf(shards[0])
    assert len(shards) == 2
    assert facts(split) == facts(inspect_gguf(tiny_path))


def copy_set(shards, folder, skip=()):
    """The shards copied into `folder`, leaving out those numbered in `skip` (1-based)."""
    folder.mkdir()
    for number, shard in enumerate(shards, start=1):
        if number not in skip:
            (folder / shard.name).write_bytes(shard.read_bytes())
    return folder / shards[0].name


def test_a_missing_file_is_named_with_every_other_missing_one(tiny_shards, tmp_path):
    first = copy_set(tiny_shards, tmp_path / "incomplete", skip={2, 4})
    with pytest.raises(GGUFError) as caught:
        inspect_gguf(first)
    message = str(caught.value)
    assert f"split into {len(tiny_shards)} files and 2 are missing" in message
    assert tiny_shards[1].name in message and tiny_shards[3].name in message
    assert tiny_shards[2].name not in message


def test_a_later_file_gets_the_name_of_the_first(tiny_shards):
    with pytest.raises(GGUFError) as caught:
        inspect_gguf(tiny_shards[2])
    message = str(caught.value)
    assert f"this is file 3 of {len(tiny_shards)} of a split model" in message
    assert f"give the first one: {tiny_shards[0]}" in message


def test_a_first_file_renamed_away_from_llama_cpps_naming_is_refused(tiny_shards, tmp_path):
    renamed = tmp_path / "tiny-q3.gguf"
    renamed.write_bytes(tiny_shards[0].read_bytes())
    with pytest.raises(GGUFError, match=r"tiny-q3.gguf: .* not named <prefix>-00001-of-000"):
        inspect_gguf(renamed)


def swap_in(shards, folder, number, foreign):
    """A copy of the set in `folder` with file `number` replaced by `foreign`."""
    first = copy_set(shards, folder)
    (folder / shards[number - 1].name).write_bytes(foreign.read_bytes())
    return first


def test_a_file_from_a_set_of_another_size_is_refused(tiny_path, tiny_shards, tmp_path):
    other = write_shards(tiny_path, tmp_path / "halves.gguf", max_size=60_000)
    assert len(other) != len(tiny_shards)
    first = swap_in(tiny_shards, tmp_path / "mixed", 2, other[1])
    with pytest.raises(GGUFError) as caught:
        inspect_gguf(first)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'mixed' / tiny_shards[1].name}: not part of")
    assert f"it says it is file 2 of {len(other)}" in message


def test_a_file_of_another_model_split_alike_is_refused(smol_shards, tiny_path, tmp_path):
    """Same count of files, but another model: its set holds another number of tensors."""
    other = write_shards(tiny_path, tmp_path / "tiny3.gguf", max_tensors=8)
    assert len(other) == len(smol_shards)
    first = swap_in(other, tmp_path / "mixed", 2, smol_shards[1])
    with pytest.raises(GGUFError) as caught:
        inspect_gguf(first)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'mixed' / other[1].name}: not part of")
    assert "a model of 272 tensors" in message


def test_a_file_of_the_same_model_split_otherwise_is_refused(tiny_path, tmp_path):
    """Same model, same count of files, split at other tensors: a tensor is in two."""
    one = write_shards(tiny_path, tmp_path / "a.gguf", max_tensors=10)
    other = write_shards(tiny_path, tmp_path / "b.gguf", max_tensors=9)
    assert len(one) == len(other) == 3
    first = swap_in(one, tmp_path / "mixed", 2, other[1])
    with pytest.raises(GGUFError) as caught:
        inspect_gguf(first)
    message = str(caught.value)
    assert message.startswith(f"{first}: a-00001-of-00003.gguf and a-00002-of-00003.gguf")
    assert "both hold the tensor" in message and "not of one set" in message


def test_a_single_file_model_in_place_of_a_shard_is_refused(tiny_path, tiny_shards, tmp_path):
    first = swap_in(tiny_shards, tmp_path / "mixed", 2, tiny_path)
    with pytest.raises(GGUFError, match="not part of .* a model of its own"):
        inspect_gguf(first)
