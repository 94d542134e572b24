"""Conversations on models whose chat template refuses some turns: Mistral's and
Mixtral's instruct templates, as llama-cpp-python ships them, raise when the roles
do not alternate user/assistant and on a system turn. In a tiny Mixtral GGUF that
carries them, a conversation still always continues (two user turns in a row
become one, the system prompt opens the first user turn), and what the template
cannot take at all is a clear error, not a closed socket or a 500."""

import openai
import pytest
from llama_cpp.llama_chat_format import (
    MISTRAL_INSTRUCT_CHAT_TEMPLATE,
    MIXTRAL_INSTRUCT_CHAT_TEMPLATE,
)

from inference.models import Conversation, Generation, Message
from inference.registry import register_model
from inference.services import clean_params
from inference.tokens import ChatTemplateError, count_chat_tokens, tokenizer_for
from mixtralweb.accounts.models import ApiKey
from tests.fixtures import tiny_mixtral

MODEL = "tiny-mistral"
TEMPLATES = {"mistral": MISTRAL_INSTRUCT_CHAT_TEMPLATE, "mixtral": MIXTRAL_INSTRUCT_CHAT_TEMPLATE}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def template_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    return request.param, tiny_mixtral.build_tiny_mixtral(
        path, chat_template=TEMPLATES[request.param]
    )


def test_two_user_turns_in_a_row_become_one(template_file):
    _, path = template_file
    tokenizer = tokenizer_for(str(path))
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
    ]
    prompt = tokenizer.render(messages)
    assert prompt.startswith("<s>[INST] hello [/INST]hi</s>")
    assert prompt.endswith("[INST] first\n\nsecond [/INST]")
    assert tokenizer.chat_tokens(messages)


def test_the_system_prompt_opens_the_first_user_turn(template_file):
    _, path = template_file
    tokenizer = tokenizer_for(str(path))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "the sea"},
    ]
    prompt = tokenizer.render(messages)
    assert prompt.startswith("<s>[INST] Be brief.\n\nhello [/INST]hi</s>")
    assert prompt.endswith("[INST] the sea [/INST]")


def test_a_conversation_the_template_cannot_take_is_a_clear_error(template_file):
    _, path = template_file
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        count_chat_tokens(type("Model", (), {"path": str(path)}), messages)


# --- through the chat socket and the API, with a worker serving the model ----------


@pytest.fixture(scope="module")
def mistral_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "served.gguf"
    return tiny_mixtral.build_tiny_mixtral(path, chat_template=MISTRAL_INSTRUCT_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def mistral_worker(stack, mistral_path, django_db_blocker):
    with django_db_blocker.unblock():
        register_model(name=MODEL, path=mistral_path, n_ctx=1024, n_batch=64)
    stack.start_worker("tiny-mistral-worker", model=MODEL)
    try:
        yield stack.wait_model(MODEL)
    finally:
        stack.stop("tiny-mistral-worker")


@pytest.fixture
def mistral_model(transactional_db, mistral_path):
    return register_model(name=MODEL, path=mistral_path, n_ctx=1024, n_batch=64)


PARAMS = {"max_tokens": 8, "seed": 3, "temperature": 1.0}


def test_a_message_after_an_answer_stopped_before_its_first_word_is_answered(
    mistral_worker, mistral_model, cast, default_model, ws_factory
):
    conversation = Conversation.objects.create(
        owner=cast.alice,
        model=mistral_model,
        system_prompt="Be brief.",
        params=clean_params(PARAMS),
    )
    Message.objects.create(
        conversation=conversation, role="user", content="hello", author=cast.alice
    )
    stopped = Generation.objects.create(
        user=cast.alice,
        model=mistral_model,
        conversation=conversation,
        state=Generation.CANCELLED,
        reason="Stopped during prompt evaluation.",
    )
    Message.objects.create(conversation=conversation, role="assistant", generation=stopped)
    ws = ws_factory(cast.alice)
    ws.send(
        {
            "type": "chat.send",
            "request_id": 1,
            "conversation": conversation.pk,
            "content": "the sea",
        }
    )
    accepted, _ = ws.recv_until(lambda f: f["type"] in {"chat.accepted", "error"})
    assert accepted["type"] == "chat.accepted", accepted
    final, _ = ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == accepted["generation"],
        timeout=120,
    )
    assert final["state"] == "done", final["reason"]
    gen = Generation.objects.select_related("metrics").get(pk=accepted["generation"])
    assert gen.metrics.prompt_tokens == count_chat_tokens(mistral_model, gen.input_messages)


def test_the_api_answers_repeated_roles_and_refuses_what_the_template_cannot_take(
    mistral_worker, mistral_model, stack, cast, default_model
):
    key, secret = ApiKey.issue(user=cast.alice, name="script")
    client = openai.OpenAI(
        base_url=f"{stack.http_url}/v1", api_key=secret, max_retries=0, timeout=120
    )
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "user", "content": "the sea"},
        ],
        **PARAMS,
    )
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert (
        answer.usage.prompt_tokens == Generation.objects.latest("queued_at").metrics.prompt_tokens
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}],
            **PARAMS,
        )
    assert refused.value.code == "invalid_messages"
    assert "roles must alternate" in refused.value.message


REFUSING_TEMPLATE = "{{ raise_exception('This template takes tool calls only.') }}"


@pytest.fixture
def refusing_model(transactional_db, tmp_path):
    path = tiny_mixtral.build_tiny_mixtral(
        tmp_path / "refusing.gguf", chat_template=REFUSING_TEMPLATE
    )
    return register_model(name="refusing", path=path, n_ctx=1024)


def test_a_chat_the_template_refuses_is_refused_with_the_templates_reason(
    refusing_model, cast, settings
):
    from inference.services import ChatError, chat_send

    settings.CHAT_REQUIRE_WORKER = False
    with pytest.raises(ChatError, match="takes tool calls only") as refused:
        chat_send(user=cast.alice, content="hello", model_name="refusing")
    assert refused.value.code == "template"
    assert not Conversation.objects.exists()


def test_a_job_the_template_refuses_is_refused_with_the_templates_reason(refusing_model, cast):
    from inference.jobs.services import JobError, job_draft

    with pytest.raises(JobError, match="takes tool calls only"):
        job_draft(
            user=cast.alice,
            instruction="Sum up.",
            max_tokens=64,
            model_name="refusing",
            text="a sea",
        )
