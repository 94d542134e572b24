"""Chat presets: a saved system prompt and sampling parameters, optionally a model.

Checked as the chat checks them (services.clean_params, clean_system_prompt), so a
preset says no more and no less than a chat message may. Who sees and changes one:
mixtralweb/accounts/access.py. Errors are ChatError, with a message to show as it is.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction

from mixtralweb.accounts import access

from .models import LanguageModel, Preset
from .services import ChatError, clean_params, clean_system_prompt

NAME_MAX_CHARS = 100
PARAM_NAMES = ("temperature", "top_p", "max_tokens", "seed")


def visible_presets(user):
    """The user's own presets and those shared with a team of theirs, by name."""
    return access.presets(user, Preset.objects.select_related("owner", "team")).order_by(
        "name", "pk"
    )


def params_from_form(data) -> dict:
    """The parameters as a form posts them (text; an empty field: not given). A
    number is read as one; anything else goes on as it is, for clean_params to refuse
    with the chat's own message."""
    params = {}
    for name in PARAM_NAMES:
        value = (data.get(name) or "").strip()
        if not value:
            continue
        try:
            params[name] = float(value)
        except ValueError:
            params[name] = value
    return params


def _clean_name(name) -> str:
    name = (name or "").strip() if isinstance(name, str) else ""
    if not name:
        raise ChatError("The preset needs a name.", code="empty")
    if len(name) > NAME_MAX_CHARS:
        raise ChatError(f"The name is longer than {NAME_MAX_CHARS} characters.", code="too_large")
    return name


def _clean_model_name(model_name) -> str:
    """An enabled model's name, or "" (no model: the chat keeps the one picked)."""
    if model_name in (None, ""):
        return ""
    if not isinstance(model_name, str) or not (
        LanguageModel.objects.filter(name=model_name[:100], enabled=True).exists()
    ):
        raise ChatError(f"There is no model named {str(model_name)[:100]!r}.", "unknown_model")
    return model_name


def _team_of(user, team_id):
    if team_id in (None, ""):
        return None
    team = access.teams_of(user).filter(pk=team_id).first() if str(team_id).isdigit() else None
    if team is None:
        raise ChatError("You are not a member of that team.", code="not_found")
    return team


def _save(preset: Preset) -> Preset:
    """Saved, or ChatError when the owner already has a preset of that name (checked
    first for the message, and by the constraint for two saves at once)."""
    taken = Preset.objects.filter(owner=preset.owner, name=preset.name).exclude(pk=preset.pk)
    if taken.exists():
        raise ChatError(f"You already have a preset named “{preset.name}”.", code="exists")
    try:
        with transaction.atomic():
            preset.save()
    except IntegrityError:
        raise ChatError(
            f"You already have a preset named “{preset.name}”.", code="exists"
        ) from None
    return preset


def preset_create(
    *, user, name, system_prompt="", params=None, model_name="", team_id=None
) -> Preset:
    return _save(
        Preset(
            owner=user,
            name=_clean_name(name),
            system_prompt=clean_system_prompt(system_prompt),
            params=clean_params(params),
            model_name=_clean_model_name(model_name),
            team=_team_of(user, team_id),
        )
    )


def _manageable(user, preset_id) -> Preset:
    """The preset, if the user sees it and may change it; ChatError otherwise (one
    they cannot see is "not found", as if it did not exist)."""
    preset = visible_presets(user).filter(pk=preset_id).first()
    if preset is None:
        raise ChatError("Preset not found.", code="not_found")
    if not access.may_manage_preset(user, preset):
        raise ChatError("Only the preset's owner can change it.", code="forbidden")
    return preset


def preset_rename(*, user, preset_id, name) -> Preset:
    preset = _manageable(user, preset_id)
    preset.name = _clean_name(name)
    return _save(preset)


def preset_delete(*, user, preset_id) -> Preset:
    preset = _manageable(user, preset_id)
    preset.delete()
    return preset


def preset_data(presets) -> dict:
    """What the chat page's script fills the settings with, by preset id (embedded
    with json_script)."""
    return {
        str(p.pk): {
            "name": p.name,
            "system_prompt": p.system_prompt,
            "params": p.params,
            "model": p.model_name,
            "team": p.team.name if p.team else "",
        }
        for p in presets
    }
