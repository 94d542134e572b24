"""Pages for chat. Plain functions; access goes through services' helpers."""

from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import Http404
from django.shortcuts import render

from . import services
from .models import Conversation, LanguageModel


@login_required
def chat(request, conversation_id: int | None = None):
    conversation = None
    if conversation_id is not None:
        try:
            conversation = services.get_conversation_for_user(request.user, conversation_id)
        except services.ChatError:
            raise Http404("Conversation not found") from None
    mine = Conversation.objects.filter(owner=request.user)
    team = Conversation.objects.visible_to(request.user).filter(~Q(owner=request.user))
    return render(
        request,
        "inference/chat.html",
        {
            "conversation": conversation,
            "my_conversations": mine[:50],
            "team_conversations": team.select_related("owner", "team")[:50],
            "models": LanguageModel.objects.filter(enabled=True),
            "default_params": services.DEFAULT_PARAMS,
        },
    )
