"""Admins and team admins invite people by link; the link works once."""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from mixtralweb.accounts.invitations import invitation_create
from mixtralweb.accounts.models import Invitation, Membership


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
    invitation = invitation_create(
        created_by=cast.alice, email="", team=cast.red, role="member", valid_days=7
    )
    first = Client().post(
        f"/invite/{invitation.token}/",
        {"username": "erin", "password1": "a-long-pass-9x", "password2": "a-long-pass-9x"},
    )
    assert first.status_code == 302
    again = Client().post(
        f"/invite/{invitation.token}/",
        {"username": "frank", "password1": "a-long-pass-9x", "password2": "a-long-pass-9x"},
    )
    assert again.status_code == 410 and b"already been used" in again.content
    assert not get_user_model().objects.filter(username="frank").exists()


def test_an_expired_link_says_so(cast):
    invitation = invitation_create(
        created_by=cast.alice, email="", team=None, role="member", valid_days=1
    )
    Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(1))
    response = Client().get(f"/invite/{invitation.token}/")
    assert response.status_code == 410 and b"expired" in response.content


def test_an_unknown_link_is_not_found(db):
    assert Client().get("/invite/nonsense/").status_code == 404


def test_a_plain_member_cannot_invite(cast):
    assert logged_in(cast.bob).get("/account/invitations/").status_code == 403
    assert logged_in(cast.charlie).get("/account/invitations/").status_code == 403


def test_a_team_admin_cannot_invite_into_another_team(cast):
    from mixtralweb.accounts.models import Team

    blue = Team.objects.create(name="Blue")
    response = logged_in(cast.alice).post(
        "/account/invitations/", {"team": blue.pk, "role": "member", "valid_days": 7}
    )
    assert response.status_code == 200 and response.context["link"] is None
    assert "team" in response.context["form"].errors
    assert not Invitation.objects.exists()
