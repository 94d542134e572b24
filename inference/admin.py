from django import forms
from django.contrib import admin
from django.utils.html import format_html, format_html_join

from .gguf import GGUFError, inspect_gguf
from .models import Conversation, Generation, LanguageModel, Message, Preset, WorkerHeartbeat
from .registry import (
    LOAD_OPTION_FIELDS,
    PRESETS,
    LoadOptionsError,
    check_load_options,
    format_tensor_split,
    parse_tensor_split,
    preset_options,
)
from .registry import inspection_fields as fields_from_report
from .services import ChatError, clean_params, clean_system_prompt


class LanguageModelForm(forms.ModelForm):
    """Registers a model the way `manage.py addmodel` does: the file is inspected and
    the load options are checked on save; problems show on their fields."""

    preset = forms.ChoiceField(
        choices=[("", "—")] + [(name, name) for name in PRESETS],
        required=False,
        help_text="Named load options; they replace the values below. See docs/models.md.",
    )

    class Meta:
        model = LanguageModel
        fields = ["name", "path", "description", "enabled", *LOAD_OPTION_FIELDS]

    def clean(self):
        cleaned = super().clean()
        path = cleaned.get("path")
        if not path:
            return cleaned
        try:
            self.report = inspect_gguf(path)
        except GGUFError as exc:
            self.add_error("path", str(exc))
            return cleaned
        try:
            cleaned.update(preset_options(cleaned.get("preset")))
            options = {f: cleaned.get(f) for f in LOAD_OPTION_FIELDS if f in cleaned}
            check_load_options(options, self.report)
            cleaned["tensor_split"] = format_tensor_split(
                parse_tensor_split(cleaned.get("tensor_split", ""))
            )
        except LoadOptionsError as exc:
            for field, reason in exc.errors.items():
                self.add_error(field if field in self.fields else None, reason)
        return cleaned

    def save(self, commit=True):
        for field, value in fields_from_report(self.report).items():
            setattr(self.instance, field, value)
        for field in LOAD_OPTION_FIELDS:
            setattr(self.instance, field, self.cleaned_data[field])
        return super().save(commit)


@admin.register(LanguageModel)
class LanguageModelAdmin(admin.ModelAdmin):
    form = LanguageModelForm
    list_display = [
        "name",
        "architecture",
        "parameters",
        "files",
        "n_ctx",
        "n_gpu_layers",
        "n_parallel",
        "enabled",
    ]
    readonly_fields = [
        "architecture",
        "context_length_trained",
        "has_chat_template",
        "files",
        "summary",
    ]
    fieldsets = [
        (None, {"fields": ["name", "path", "description", "enabled"]}),
        ("Load options", {"fields": ["preset", *LOAD_OPTION_FIELDS]}),
        ("From the file", {"fields": readonly_fields}),
    ]

    @admin.display(description="parameters")
    def parameters(self, obj):
        count = obj.inspection.get("parameter_count")
        return f"{count / 1e9:.2f} B" if count else "—"

    @admin.display(description="size")
    def files(self, obj):
        """The whole model: every file of a split one ("67.8 GB in 5 files")."""
        return obj.files_summary or "—"

    @admin.display(description="inspection")
    def summary(self, obj):
        if not obj.inspection:
            return "—"
        rows = [
            (k, ", ".join(v) if k == "files" else v)
            for k, v in obj.inspection.items()
            if k not in {"extra", "path"}
        ]
        return format_html(
            "<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
        )


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(admin.ModelAdmin):
    list_display = ["model_name", "host", "pid", "device", "state", "progress", "reason", "seen_at"]
    list_filter = ["state", "model_name"]
    readonly_fields = [f.name for f in WorkerHeartbeat._meta.fields]

    @admin.display(description="load")
    def progress(self, obj):
        return f"{obj.load_progress:.0%}" if obj.load_progress is not None else ""

    def has_add_permission(self, request):
        return False  # workers write their own heartbeats


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner", "team", "model", "updated_at"]
    search_fields = ["title"]


@admin.register(Generation)
class GenerationAdmin(admin.ModelAdmin):
    list_display = ["pk", "user", "model", "source", "state", "queued_at"]
    list_filter = ["state", "source", "model"]


admin.site.register(Message)


class PresetForm(forms.ModelForm):
    """Checks the parameters and system prompt as the chat does."""

    class Meta:
        model = Preset
        fields = ["owner", "team", "name", "system_prompt", "params", "model_name"]

    def clean_params(self):
        try:
            return clean_params(self.cleaned_data.get("params"))
        except ChatError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_system_prompt(self):
        try:
            return clean_system_prompt(self.cleaned_data.get("system_prompt"))
        except ChatError as exc:
            raise forms.ValidationError(str(exc)) from None


@admin.register(Preset)
class PresetAdmin(admin.ModelAdmin):
    form = PresetForm
    list_display = ["name", "owner", "team", "model_name", "updated_at"]
    search_fields = ["name", "owner__username"]
