"""The Celery app. Settings come from Django settings under the CELERY_ namespace."""

import os

from celery import Celery

from monitoring.nvml import use_pci_bus_order

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
use_pci_bus_order()  # before llama.cpp starts CUDA, so CUDA's device numbers map to NVML's

app = Celery("mixtralweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
