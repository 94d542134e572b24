from django.urls import path

from . import keys as account_views

urlpatterns = [
    path("keys/", account_views.api_keys, name="api_keys"),
    path("keys/<int:key_id>/revoke/", account_views.api_key_revoke, name="api_key_revoke"),
]
