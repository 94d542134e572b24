"""Admins and team admins invite people by link; the link works once, only while
its inviter may still invite to its team, and team admins revoke it."""

import importlib
from datetime import timedelta

from django.apps import apps
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from mixtralweb.accounts.invitations import invitation_create
from mixtralweb.accounts.models import Invitation, Membership, Team


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_team_admin_invites_someone_into_the_team(cast):
    response = logged_in(cast.alice).post(
        "/account/invitations/",
        {"email": "dora@example.com", "team": cast.red.pk, "role": "member", "valid_days": 7},
    )
    assert response.status_code == 200
    link = response.context["link"]
    assert link and "/invite/" in link
    invitation = Invitation.objects.get()
    assert invitation.team == cast.red and invitation.email == "dora@example.com"

    newcomer = Client()
    page = newcomer.get(link)
    assert page.status_code == 200 and b"Red" in page.content
    response = newcomer.post(
        link, {"username": "dora", "password1": "a-long-pass-9x", "password2": "a-long-pass-9x"}
    )
    assert response.status_code == 302 and response["Location"] == "/"
    dora = get_user_model().objects.get(username="dora")
    assert dora.email == "dora@example.com"
    assert Membership.objects.get(user=dora).team == cast.red
    invitation.refresh_from_db()
    assert invitation.accepted_by == dora
    assert newcomer.get("/").status_code == 200  # logged in


def test_a_used_link_does_not_work_twice(cast):
    _, token = invitation_create(
        created_by=cast.alice, email="", team=cast.red, role="member", valid_days=7
    )
    first = Client().post(
        f"/invite/{token}/",
        {"username": "erin", "password1": "a-long-pass-9x", "password2": "a-long-pass-9x"},
    )
    assert first.status_code == 302
    again = Client().post(
        f"/invite/{token}/",
        {"username": "frank", "password1": "a-long-pass-9x", "password2": "a-long-pass-9x"},
    )
    assert again.status_code == 410 and b"already been used" in again.content
    assert not get_user_model().objects.filter(username="frank").exists()


def test_an_expired_link_says_so(cast):
    invitation, token = invitation_create(
        created_by=cast.alice, email="", team=None, role="member", valid_days=1
    )
    Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(1))
    response = Client().get(f"/invite/{token}/")
    assert response.status_code == 410 and b"expired" in response.content


def test_an_unknown_link_is_not_found(db):
    assert Client().get("/invite/nonsense/").status_code == 404


def test_a_plain_member_cannot_invite(cast):
    assert logged_in(cast.bob).get("/account/invitations/").status_code == 403
    assert logged_in(cast.charlie).get("/account/invitations/").status_code == 403


def test_a_team_admin_cannot_invite_into_another_team(cast):
    blue = Team.objects.create(name="Blue")
    response = logged_in(cast.alice).post(
        "/account/invitations/", {"team": blue.pk, "role": "member", "valid_days": 7}
    )
    assert response.status_code == 200 and response.context["link"] is None
    assert "team" in response.context["form"].errors
    assert not Invitation.objects.exists()


SIGN_UP = {"username": "dora", "password1": "a-long-pass-9x", "password2": "a-long-pass-9x"}


def invite_to_red(cast, **kwargs) -> tuple[Invitation, str]:
    return invitation_create(
        created_by=cast.alice, email="", team=cast.red, role="member", valid_days=7, **kwargs
    )


def test_the_token_is_not_stored_only_its_hash(cast):
    response = logged_in(cast.alice).post(
        "/account/invitations/", {"team": cast.red.pk, "role": "member", "valid_days": 7}
    )
    token = response.context["link"].rstrip("/").rsplit("/", 1)[1]
    invitation = Invitation.objects.get()
    assert invitation.token_hash == Invitation.hash_token(token) != token
    assert token not in str(Invitation.objects.values().get())
    assert Client().get(f"/invite/{invitation.token_hash}/").status_code == 404
    page = logged_in(cast.alice).get("/account/invitations/")
    assert token.encode() not in page.content  # shown once, when it was made


def test_existing_links_keep_working_once_their_tokens_are_hashed(cast):
    migration = importlib.import_module("mixtralweb.accounts.migrations.0002_invitation_token_hash")
    invitation, _ = invite_to_red(cast)
    # A row as it was before the migration: the raw token in the column.
    Invitation.objects.filter(pk=invitation.pk).update(token_hash="an-old-raw-token")
    migration.hash_tokens(apps, None)
    invitation.refresh_from_db()
    assert invitation.token_hash == Invitation.hash_token("an-old-raw-token")
    assert Client().post("/invite/an-old-raw-token/", SIGN_UP).status_code == 302


def test_a_link_stops_working_when_its_inviter_is_no_longer_team_admin(cast):
    _, token = invite_to_red(cast)
    Membership.objects.filter(user=cast.alice).update(role=Membership.MEMBER)
    response = Client().post(f"/invite/{token}/", SIGN_UP)
    assert response.status_code == 410
    assert b"may no longer invite people to this team" in response.content
    assert not get_user_model().objects.filter(username="dora").exists()


def test_a_link_stops_working_when_its_inviter_leaves_the_team(cast):
    _, token = invite_to_red(cast)
    Membership.objects.filter(user=cast.alice).delete()
    assert Client().get(f"/invite/{token}/").status_code == 410


def test_a_link_stops_working_when_its_inviter_is_disabled(cast):
    _, token = invite_to_red(cast)
    get_user_model().objects.filter(pk=cast.alice.pk).update(is_active=False)
    assert Client().post(f"/invite/{token}/", SIGN_UP).status_code == 410
    assert not get_user_model().objects.filter(username="dora").exists()


def test_a_staff_link_stops_working_when_its_inviter_is_no_longer_staff(cast):
    cast.charlie.is_staff = True
    cast.charlie.save()
    _, token = invitation_create(
        created_by=cast.charlie, email="", team=None, role="member", valid_days=7
    )
    get_user_model().objects.filter(pk=cast.charlie.pk).update(is_staff=False)
    assert Client().post(f"/invite/{token}/", SIGN_UP).status_code == 410


def test_a_deleted_team_s_link_is_not_found(cast):
    _, token = invite_to_red(cast)
    Team.objects.filter(pk=cast.red.pk).delete()
    assert Client().post(f"/invite/{token}/", SIGN_UP).status_code == 404
    assert not get_user_model().objects.filter(username="dora").exists()


def test_a_team_admin_revokes_a_link_on_the_team_page(cast):
    invitation, token = invite_to_red(cast)
    alice = logged_in(cast.alice)
    team_page = f"/usage/teams/{cast.red.pk}/"
    page = alice.get(team_page)
    revoke_url = f"/account/invitations/{invitation.pk}/revoke/"
    assert revoke_url.encode() in page.content
    response = alice.post(revoke_url, {"next": team_page})
    assert response.status_code == 302 and response["Location"] == team_page
    invitation.refresh_from_db()
    assert invitation.state == "revoked"
    assert revoke_url.encode() not in alice.get(team_page).content
    refused = Client().post(f"/invite/{token}/", SIGN_UP)
    assert refused.status_code == 410 and b"revoked" in refused.content
    assert not get_user_model().objects.filter(username="dora").exists()


def test_another_team_admin_revokes_a_link_on_the_invitations_page(cast):
    invitation, _ = invite_to_red(cast)
    Membership.objects.filter(user=cast.bob).update(role=Membership.ADMIN)
    bob = logged_in(cast.bob)
    assert (
        f"/invitations/{invitation.pk}/revoke/".encode() in bob.get("/account/invitations/").content
    )
    response = bob.post(f"/account/invitations/{invitation.pk}/revoke/")
    assert response.status_code == 302 and response["Location"] == "/account/invitations/"
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None


def test_revoking_takes_a_post_with_the_csrf_token(cast):
    invitation, _ = invite_to_red(cast)
    client = Client(enforce_csrf_checks=True)
    client.force_login(cast.alice)
    url = f"/account/invitations/{invitation.pk}/revoke/"
    assert client.get(url).status_code == 405
    assert client.post(url).status_code == 403
    invitation.refresh_from_db()
    assert invitation.is_usable


def test_someone_outside_the_team_cannot_revoke(cast):
    invitation, _ = invite_to_red(cast)
    for user in (cast.bob, cast.charlie):
        response = logged_in(user).post(f"/account/invitations/{invitation.pk}/revoke/")
        assert response.status_code == 404
    invitation.refresh_from_db()
    assert invitation.is_usable


def test_revoking_goes_back_only_to_this_site(cast):
    invitation, _ = invite_to_red(cast)
    response = logged_in(cast.alice).post(
        f"/account/invitations/{invitation.pk}/revoke/", {"next": "https://evil.example/"}
    )
    assert response["Location"] == "/account/invitations/"
