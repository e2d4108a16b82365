"""remixq worker: Celery app, settings, upstream clients, tasks, job store."""
