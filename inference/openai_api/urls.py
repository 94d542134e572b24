from django.urls import path

from . import batch_views, views

urlpatterns = [
    path("models", views.models, name="api_models"),
    path("chat/completions", views.chat_completions, name="api_chat_completions"),
    path("completions", views.completions, name="api_completions"),
    path("files", batch_views.files, name="api_files"),
    path("files/<str:file_id>/content", batch_views.file_content, name="api_file_content"),
    path("batches", batch_views.batch_create, name="api_batches"),
    path("batches/<str:batch_id>", batch_views.batch_detail, name="api_batch"),
    path("batches/<str:batch_id>/cancel", batch_views.batch_cancel, name="api_batch_cancel"),
]
