from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "mixtralweb.accounts"
    label = "accounts"
    verbose_name = "Accounts and teams"
