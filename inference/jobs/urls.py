from django.urls import path

from . import views

urlpatterns = [
    path("", views.job_list, name="job_list"),
    path("new/", views.job_new, name="job_new"),
    path("count/", views.job_count, name="job_count"),
    path("<int:job_id>/", views.job_detail, name="job_detail"),
    path("<int:job_id>/run/", views.job_run, name="job_run"),
    path("<int:job_id>/discard/", views.job_discard, name="job_discard"),
    path("<int:job_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("<int:job_id>/result.<str:fmt>", views.job_download, name="job_download"),
]
