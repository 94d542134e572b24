"""The job submission form. Reading and counting the document is services' job."""

from __future__ import annotations

from django import forms

from inference.services import serving_models
from mixtralweb.accounts.models import Team


class JobForm(forms.Form):
    title = forms.CharField(max_length=200, required=False)
    instruction = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What to do with the document: summarize it, answer questions, extract a table…",
    )
    text = forms.CharField(
        label="Paste the document",
        widget=forms.Textarea(attrs={"rows": 8}),
        required=False,
        strip=False,
    )
    file = forms.FileField(
        label="…or upload a .txt, .md or .pdf file", required=False, allow_empty_file=True
    )
    # Only models a live worker serves, as the chat offers: a job on any other would
    # wait for a worker that may never come.
    model = forms.ChoiceField(
        error_messages={
            "invalid_choice": "No worker is serving the model %(value)s right now; "
            "choose one from the list."
        }
    )
    max_tokens = forms.IntegerField(
        label="Maximum new tokens (per pass)", min_value=1, max_value=32768, initial=512
    )
    team = forms.ModelChoiceField(
        queryset=Team.objects.none(), required=False, empty_label="Only me"
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.fields["model"]
        model.choices = [
            (m.name, f"{m.name} (context {m.n_ctx:,} tokens)") for m in serving_models()
        ]
        if not model.choices:
            model.help_text = "No worker is serving a model right now, so no job can run."
        self.fields["team"].queryset = Team.objects.filter(memberships__user=user)
        self.fields["file"].widget.attrs["accept"] = ".txt,.md,.markdown,.pdf"
