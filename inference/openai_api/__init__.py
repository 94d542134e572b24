"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions.

Requests become Generations on the same Celery queues as chat (docs/api.md).
"""
