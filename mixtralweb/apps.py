from django.apps import AppConfig


class MixtralwebConfig(AppConfig):
    name = "mixtralweb"
    verbose_name = "Accounts and teams"
