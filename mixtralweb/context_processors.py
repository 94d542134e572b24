from django.conf import settings

from mixtralweb.accounts.access import teams_administered


def site(request):
    user = getattr(request, "user", None)
    can_invite = False
    if user is not None and user.is_authenticated:
        can_invite = user.is_staff or teams_administered(user).exists()
    return {"SITE_NAME": settings.SITE_NAME, "can_invite": can_invite}
