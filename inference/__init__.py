"""Asking the model: registry, engine (llama.cpp), Celery tasks, chat, jobs, OpenAI API."""
