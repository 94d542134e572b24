from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from mixtralweb.accounts import invitations

handler500 = "mixtralweb.errors.server_error"

urlpatterns = [
    path("", include("inference.urls")),
    path("", include("monitoring.urls")),
    path("planner/", include("monitoring.planner.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "password/",
        auth_views.PasswordChangeView.as_view(success_url="/"),
        name="password_change",
    ),
    path("account/", include("inference.openai_api.key_urls")),
    path("account/invitations/", invitations.invitations, name="invitations"),
    path(
        "account/invitations/<int:invitation_id>/revoke/",
        invitations.invitation_revoke,
        name="invitation_revoke",
    ),
    path("invite/<str:token>/", invitations.invitation_accept, name="invitation_accept"),
    path("v1/", include("inference.openai_api.urls")),
    path("admin/", admin.site.urls),
]
