"""Celery transport: the app, its configuration, and tasks that each call one pipeline function."""
