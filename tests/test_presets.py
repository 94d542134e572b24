"""Chat presets (issue 20): a saved system prompt and sampling settings, a user's own
or shared with one of their teams.

The cast: Alice owns the presets and is Red's admin; Bob is in Red; Dana is Red's
other admin; Charlie is in no team."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from inference.models import LanguageModel, Preset
from inference.services import ChatError, clean_params
from mixtralweb.accounts import access
from mixtralweb.accounts.models import Membership, Team


@pytest.fixture
def people(db):
    User = get_user_model()
    red = Team.objects.create(name="Red")
    alice = User.objects.create_user("alice", password="alice-pass-123")
    bob = User.objects.create_user("bob", password="bob-pass-123")
    dana = User.objects.create_user("dana", password="dana-pass-123")
    charlie = User.objects.create_user("charlie", password="charlie-pass-123")
    Membership.objects.create(team=red, user=alice, role=Membership.ADMIN)
    Membership.objects.create(team=red, user=bob)
    Membership.objects.create(team=red, user=dana, role=Membership.ADMIN)
    return type(
        "People", (), {"alice": alice, "bob": bob, "dana": dana, "charlie": charlie, "red": red}
    )


def client_of(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


SETTINGS = {
    "system_prompt": "Answer in one sentence.",
    "temperature": "0.3",
    "top_p": "0.9",
    "max_tokens": "256",
    "seed": "",
}


def save(user, *, as_json=False, **fields):
    """Post the chat's save form, as the page does (the settings fields included)."""
    form = {**SETTINGS, "next": "/", **fields}
    headers = {"Accept": "application/json"} if as_json else {}
    return client_of(user).post("/presets/new/", form, headers=headers)


# --- saving ------------------------------------------------------------------------------
def test_saving_keeps_the_settings_checked_and_returns_to_the_page_with_it_chosen(people):
    response = save(people.alice, name="  Terse  ", next="/c/12/")
    preset = Preset.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/c/12/?preset={preset.pk}"
    assert (preset.owner, preset.team, preset.name) == (people.alice, None, "Terse")
    assert preset.system_prompt == "Answer in one sentence."
    assert preset.params == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 256, "seed": None}
    assert isinstance(preset.params["max_tokens"], int)
    assert preset.model_name == ""  # "with the model" was not ticked


def test_the_page_script_gets_the_new_preset_as_json(people):
    response = save(people.alice, name="Terse", team=str(people.red.pk), as_json=True)
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == Preset.objects.get().pk
    assert (body["name"], body["team"], body["model"]) == ("Terse", "Red", "")
    assert body["params"]["temperature"] == 0.3


def test_a_return_address_off_the_site_is_not_followed(people):
    response = save(people.alice, name="Terse", next="https://evil.example/")
    assert response["Location"].startswith("/?preset=")


def test_with_the_model_it_keeps_an_enabled_models_name_and_refuses_an_unknown_one(people):
    LanguageModel.objects.create(name="tiny", path="/models/tiny.gguf")
    save(people.alice, name="With model", include_model="1", model_name="tiny")
    assert Preset.objects.get().model_name == "tiny"
    response = save(people.alice, name="Other", include_model="1", model_name="nope", as_json=True)
    assert response.status_code == 400
    assert response.json()["error"] == "There is no model named 'nope'."


# The form posts text; the chat sends JSON numbers (null for what is not a number).
# Either way the same check refuses it, with the same words.
BAD = [
    ("temperature", "3", 3),
    ("top_p", "abc", None),
    ("max_tokens", "1.5", 1.5),
    ("max_tokens", "0", 0),
    ("seed", "-1", -1),
]


@pytest.mark.parametrize(("name", "posted", "sent_by_chat"), BAD)
def test_bad_settings_are_refused_with_the_chats_own_message(people, name, posted, sent_by_chat):
    with pytest.raises(ChatError) as chat:
        clean_params({name: sent_by_chat})
    response = save(people.alice, name="Bad", as_json=True, **{name: posted})
    assert response.status_code == 400
    assert response.json()["error"] == str(chat.value)
    assert not Preset.objects.exists()


def test_a_refused_form_post_says_why(people):
    response = save(people.alice, name="Bad", temperature="3")
    assert response.status_code == 400
    page = response.content.decode()
    assert "The preset was not saved: temperature must be between 0.0 and 2.0" in page
    assert not Preset.objects.exists()


def test_a_system_prompt_over_the_chats_limit_is_refused(people, settings):
    settings.CHAT_MESSAGE_MAX_CHARS = 10
    response = save(people.alice, name="Long", system_prompt="x" * 11, as_json=True)
    assert response.json()["error"] == "The system prompt is 11 characters; the limit is 10."


def test_a_name_is_needed_and_unique_per_owner(people):
    assert save(people.alice, name="  ", as_json=True).json()["error"] == "The preset needs a name."
    save(people.alice, name="Terse")
    again = save(people.alice, name="Terse", as_json=True)
    assert again.json()["error"] == "You already have a preset named “Terse”."
    # Another user's preset may have the same name.
    assert save(people.bob, name="Terse", as_json=True).status_code == 200
    assert Preset.objects.count() == 2


def test_only_a_team_of_ones_own_may_be_shared_with(people):
    blue = Team.objects.create(name="Blue")
    response = save(people.charlie, name="Mine", team=str(blue.pk), as_json=True)
    assert response.json()["error"] == "You are not a member of that team."
    assert save(people.charlie, name="Mine", team="x", as_json=True).status_code == 400
    assert not Preset.objects.exists()


# --- who sees and changes what ------------------------------------------------------------
@pytest.fixture
def shared(people):
    """Alice's preset shared with Red, and one she keeps to herself."""
    red = Preset.objects.create(
        owner=people.alice, team=people.red, name="Team style", params=clean_params({})
    )
    own = Preset.objects.create(owner=people.alice, name="Private", params=clean_params({}))
    return red, own


def test_a_team_mate_sees_the_team_preset_and_a_stranger_sees_none(people, shared):
    red, own = shared
    everyone = Preset.objects.all()
    assert set(access.presets(people.alice, everyone)) == {red, own}
    assert set(access.presets(people.bob, everyone)) == {red}
    assert set(access.presets(people.charlie, everyone)) == set()
    bobs_page = client_of(people.bob).get("/presets/").content.decode()
    assert "Team style" in bobs_page and "Private" not in bobs_page
    assert "Team style" not in client_of(people.charlie).get("/presets/").content.decode()


def test_a_stranger_cannot_rename_or_delete_and_is_told_it_does_not_exist(people, shared):
    red, _ = shared
    charlie = client_of(people.charlie)
    assert charlie.post(f"/presets/{red.pk}/delete/").status_code == 404
    assert charlie.post(f"/presets/{red.pk}/rename/", {"name": "Mine"}).status_code == 404
    red.refresh_from_db()
    assert red.name == "Team style"


@pytest.mark.parametrize("who", ["bob", "dana"])
def test_a_team_mate_or_team_admin_cannot_change_a_team_preset(people, shared, who):
    red, _ = shared
    client = client_of(getattr(people, who))
    response = client.post(f"/presets/{red.pk}/delete/", follow=True)
    assert "Only the preset&#x27;s owner can change it." in response.content.decode()
    client.post(f"/presets/{red.pk}/rename/", {"name": "Hijacked"})
    red.refresh_from_db()
    assert red.name == "Team style"


def test_the_owner_renames_and_deletes(people, shared):
    red, own = shared
    alice = client_of(people.alice)
    alice.post(f"/presets/{red.pk}/rename/", {"name": "Team voice"})
    red.refresh_from_db()
    assert red.name == "Team voice"
    # Not to a name she already uses.
    alice.post(f"/presets/{red.pk}/rename/", {"name": "Private"})
    red.refresh_from_db()
    assert red.name == "Team voice"
    assert alice.post(f"/presets/{own.pk}/delete/").status_code == 302
    assert not Preset.objects.filter(pk=own.pk).exists()


# --- the chat page -------------------------------------------------------------------------
def preset_data(html: str) -> dict:
    block = re.search(r'<script id="preset-data" type="application/json">(.*?)</script>', html)
    return json.loads(block.group(1))


def test_the_chat_page_lists_mine_and_my_teams_presets_with_their_settings(people, shared):
    red, own = shared
    Preset.objects.create(
        owner=people.bob,
        team=people.red,
        name="Bob's <b>style</b>",
        system_prompt="Talk like a pirate.</script>",
        params=clean_params({"temperature": 1.2, "seed": 7}),
        model_name="tiny",
    )
    Preset.objects.create(owner=people.charlie, name="Charlie's", params=clean_params({}))
    html = client_of(people.alice).get("/").content.decode()
    mine = re.search(r'<optgroup label="Mine" id="my-presets">(.*?)</optgroup>', html).group(1)
    assert "Private" in mine and "Team style · shared with Red" in mine
    team = re.search(r'<optgroup label="Red">(.*?)</optgroup>', html).group(1)
    assert "Bob&#x27;s &lt;b&gt;style&lt;/b&gt; · bob" in team
    data = preset_data(html)
    assert set(data) == {str(red.pk), str(own.pk), str(Preset.objects.get(owner=people.bob).pk)}
    bobs = next(p for p in data.values() if p["model"] == "tiny")
    assert bobs["system_prompt"] == "Talk like a pirate.</script>"  # escaped, not ended
    assert bobs["params"] == {"temperature": 1.2, "top_p": 0.95, "max_tokens": 512, "seed": 7}
    assert "Charlie" not in html


def test_the_chat_page_marks_a_just_saved_preset_chosen(people, shared):
    red, _ = shared
    html = client_of(people.alice).get(f"/?preset={red.pk}").content.decode()
    assert f'<option value="{red.pk}" selected>' in html
