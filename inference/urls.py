from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.chat, name="chat"),
    path("c/<int:conversation_id>/", views.chat, name="conversation"),
    path("jobs/", include("inference.jobs.urls")),
]
