from django.urls import include, path

from . import views, workers

urlpatterns = [
    path("", views.chat, name="chat"),
    path("c/<int:conversation_id>/", views.chat, name="conversation"),
    path("workers/", workers.workers_page, name="workers"),
    path("jobs/", include("inference.jobs.urls")),
]
