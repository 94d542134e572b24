"""The default model's settings from the environment apply at the next start, or
the start says why not (issue 25): the registry side, in this process. The same
through a real worker, restarted, is in tests/test_worker_settings.py."""

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import override_settings

from inference.engine import physical_cores
from inference.models import LanguageModel
from inference.registry import (
    apply_default_model_settings,
    embedded_model_path,
    ensure_default_model,
    environment_notes,
    register_model,
)
from tests.fixtures import tiny_mixtral

ROOT = Path(__file__).resolve().parent.parent


def environment(**options):
    """settings as a process started with these default-model variables sees them."""
    return override_settings(DEFAULT_MODEL_OPTIONS=options)


def test_settings_given_later_apply_at_the_next_start_over_the_stored_ones(db):
    model = ensure_default_model()
    assert (model.n_threads, model.n_parallel) == (0, 4)
    with environment(n_threads=2, n_threads_batch=1, n_parallel=3, n_ctx=4096):
        notes = apply_default_model_settings()
        model.refresh_from_db()
        assert (model.n_threads, model.n_threads_batch, model.n_parallel, model.n_ctx) == (
            2,
            1,
            3,
            4096,
        )
        assert "n_threads 0 -> 2 (from LLAMA_N_THREADS)" in notes
        assert "n_parallel 4 -> 3 (from DEFAULT_MODEL_N_PARALLEL)" in notes
        assert "n_ctx 8192 -> 4096 (from DEFAULT_MODEL_N_CTX)" in notes
        # In force now: the worker that starts next has nothing to say.
        assert environment_notes(model) == []
        assert apply_default_model_settings() == []
    # Unset again: the registry keeps what it holds (an admin may have chosen it).
    with environment():
        assert apply_default_model_settings() == []
    model.refresh_from_db()
    assert model.n_threads == 2


def test_a_value_the_registry_refuses_is_not_applied_and_the_start_says_why(db):
    model = ensure_default_model()
    with environment(n_threads=2, n_ctx=100000, n_parallel=0):
        notes = apply_default_model_settings()
        model.refresh_from_db()
        # The valid one applies; the others keep the stored values, with the reason.
        assert (model.n_threads, model.n_ctx, model.n_parallel) == (2, 8192, 4)
        assert "n_threads 0 -> 2 (from LLAMA_N_THREADS)" in notes
        (ctx_note,) = [n for n in notes if n.startswith("DEFAULT_MODEL_N_CTX")]
        assert "DEFAULT_MODEL_N_CTX=100000 is not applied: n_ctx 100,000 is more than" in ctx_note
        assert ctx_note.endswith("The model keeps n_ctx 8192.")
        (parallel_note,) = [n for n in notes if n.startswith("DEFAULT_MODEL_N_PARALLEL")]
        assert "at least 1" in parallel_note and "keeps n_parallel 4" in parallel_note
        # The worker says the same at its start and on the Workers page.
        worker_notes = environment_notes(model)
        assert len(worker_notes) == 2
        assert any("n_ctx 100,000 is more than" in n for n in worker_notes)


def test_a_reason_that_names_another_option_is_the_settings_own(db):
    """DEFAULT_MODEL_N_CTX below the stored n_batch: check_load_options blames
    n_batch, which the environment did not set; the note still names the variable."""
    ensure_default_model()
    with environment(n_ctx=256):
        (note,) = apply_default_model_settings()
    assert note.startswith("DEFAULT_MODEL_N_CTX=256 is not applied: n_batch: n_batch 512")
    assert LanguageModel.objects.get().n_ctx == 8192


def test_a_first_registration_with_a_refused_value_still_registers_the_model(db):
    with environment(n_ctx=100000, n_threads=2), override_settings(DEFAULT_MODEL_N_CTX=100000):
        model = ensure_default_model()
        assert model.n_ctx == 8192 and model.n_threads == 0
        notes = apply_default_model_settings()
    assert any(n.startswith("DEFAULT_MODEL_N_CTX=100000 is not applied") for n in notes)
    assert LanguageModel.objects.get().n_threads == 2


def test_a_worker_started_without_applying_says_the_setting_is_not_in_force(db):
    model = ensure_default_model()
    with environment(n_threads=2):
        (note,) = environment_notes(model)
    assert note.startswith("LLAMA_N_THREADS=2 is not applied: this worker was not started by")
    assert note.endswith("The model keeps n_threads 0.")


def test_the_default_models_variables_do_not_set_another_model_and_its_worker_says_so(db):
    other = register_model(name="other", path=embedded_model_path(), n_ctx=2048)
    with environment(n_threads=1, n_parallel=2):
        notes = environment_notes(other)
    assert notes == [
        "LLAMA_N_THREADS=1 is not applied: it sets the default model (smollm2-135m) only. "
        "other has n_threads 0 (manage.py addmodel --n-threads, or the admin).",
        "DEFAULT_MODEL_N_PARALLEL=2 is not applied: it sets the default model (smollm2-135m) "
        "only. other has n_parallel 4 (manage.py addmodel --n-parallel, or the admin).",
    ]


def test_default_model_path_applies_as_given_or_the_start_says_why_not(db, tmp_path):
    model = ensure_default_model()
    embedded = model.path
    # Through a link, as the Hugging Face cache gives files: the link is kept (a split
    # model's other files are found by the name of the first).
    link = tmp_path / "served.gguf"
    link.symlink_to(tiny_mixtral.build_tiny_mixtral(tmp_path / "tiny.gguf"))
    with override_settings(DEFAULT_MODEL_PATH=str(link)), environment():
        # Its trained context (4,096) is below the stored n_ctx: not applied.
        (note,) = apply_default_model_settings()
        assert note.startswith(f"DEFAULT_MODEL_PATH={link} is not applied: n_ctx: n_ctx 8,192")
        assert note.endswith(f"The model keeps path {embedded}.")
        assert LanguageModel.objects.get().path == embedded
        assert environment_notes(LanguageModel.objects.get()) == [note]
    with override_settings(DEFAULT_MODEL_PATH=str(link)), environment(n_ctx=2048):
        assert apply_default_model_settings() == [
            "n_ctx 8192 -> 2048 (from DEFAULT_MODEL_N_CTX)",
            f"path {embedded} -> {link} (from DEFAULT_MODEL_PATH)",
        ]
        model = LanguageModel.objects.get()
        assert (model.path, model.n_ctx, model.architecture) == (str(link), 2048, "llama")
        assert apply_default_model_settings() == []
    gone = tmp_path / "gone.gguf"
    with override_settings(DEFAULT_MODEL_PATH=str(gone)), environment(n_parallel=2):
        notes = apply_default_model_settings()
        assert "n_parallel 4 -> 2 (from DEFAULT_MODEL_N_PARALLEL)" in notes
        (path_note,) = [n for n in notes if n.startswith("DEFAULT_MODEL_PATH")]
        assert f"DEFAULT_MODEL_PATH={gone} is not applied: " in path_note
        assert path_note.endswith(f"The model keeps path {link}.")
        assert LanguageModel.objects.get().path == str(link)


def test_addmodel_shows_the_threads_in_force_and_what_the_next_start_will_apply(db):
    out = StringIO()
    call_command("addmodel", str(embedded_model_path()), name="smollm2-135m", stdout=out)
    text = out.getvalue()
    cores = physical_cores()
    assert "n_threads=0 n_threads_batch=0" in text  # stored
    assert (
        f"In force for a worker on this machine: n_threads={cores} (llama.cpp's choice: "
        f"the physical cores) n_threads_batch={cores} n_ubatch=512"
    ) in text
    assert "flash_attn=auto (llama.cpp decides when the worker loads)" in text
    out = StringIO()
    with environment(n_threads=1):
        call_command(
            "addmodel",
            str(embedded_model_path()),
            "--n-threads",
            "2",
            name="smollm2-135m",
            stdout=out,
        )
    text = out.getvalue()
    assert "In force for a worker on this machine: n_threads=2 n_threads_batch=2" in text
    assert (
        "Note: LLAMA_N_THREADS=1 is set here: the default model's next start "
        "(`make run`, `manage.py modelworker`) applies it in place of n_threads 2."
    ) in text


def test_a_variable_that_is_not_a_number_stops_the_start_with_its_name():
    env = {**os.environ, "LLAMA_N_THREADS": "two"}
    code = "import mixtralweb.settings"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "LLAMA_N_THREADS must be a whole number, not 'two'." in result.stderr


@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_variable_is_unset(value, monkeypatch):
    from mixtralweb.settings import env_int

    monkeypatch.setenv("MX_TEST_BLANK", value)
    assert env_int("MX_TEST_BLANK", 7) == 7
