from django.contrib import admin

from .models import Conversation, Generation, LanguageModel, Message


@admin.register(LanguageModel)
class LanguageModelAdmin(admin.ModelAdmin):
    list_display = ["name", "architecture", "n_ctx", "n_gpu_layers", "enabled"]
    readonly_fields = ["architecture", "context_length_trained", "has_chat_template", "inspection"]


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner", "team", "model", "updated_at"]
    search_fields = ["title"]


@admin.register(Generation)
class GenerationAdmin(admin.ModelAdmin):
    list_display = ["pk", "user", "model", "source", "state", "queued_at"]
    list_filter = ["state", "source", "model"]


admin.site.register(Message)
