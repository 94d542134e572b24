from django.apps import AppConfig


class MixtralwebConfig(AppConfig):
    """The project package as an app: its management commands (runstack) and the
    migrations that once held the accounts' models (now in mixtralweb.accounts)."""

    name = "mixtralweb"
    verbose_name = "Workbench"
