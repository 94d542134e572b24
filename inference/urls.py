from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.chat, name="chat"),
    path("c/<int:conversation_id>/", views.chat, name="conversation"),
    path("workers/", views.workers_page, name="workers"),
    path("status/", views.status_page, name="status"),
    path("c/<int:conversation_id>/rename/", views.conversation_rename, name="conversation_rename"),
    path("c/<int:conversation_id>/delete/", views.conversation_delete, name="conversation_delete"),
    path("c/<int:conversation_id>/share/", views.conversation_share, name="conversation_share"),
    path(
        "c/<int:conversation_id>/export.md",
        views.conversation_export,
        {"fmt": "md"},
        name="conversation_export_md",
    ),
    path(
        "c/<int:conversation_id>/export.json",
        views.conversation_export,
        {"fmt": "json"},
        name="conversation_export_json",
    ),
    path("import/", views.conversation_import, name="conversation_import"),
    path("presets/", views.presets_page, name="presets"),
    path("presets/new/", views.preset_create, name="preset_create"),
    path("presets/<int:preset_id>/rename/", views.preset_rename, name="preset_rename"),
    path("presets/<int:preset_id>/delete/", views.preset_delete, name="preset_delete"),
    path("jobs/", include("inference.jobs.urls")),
]
