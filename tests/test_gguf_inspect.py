"""GGUF inspection: the facts stored at registration, and the errors for bad files."""

import pytest

from inference.gguf_inspect import GGUFError, inspect_gguf
from inference.registry import embedded_model_path
from tests.fixtures import tiny_mixtral


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
