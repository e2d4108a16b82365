"""Flower's settings for remixq, read by ``celery -A worker.app flower`` from the working
directory (or ``--conf=/path/to/flowerconfig.py``); command-line options win over these.

Flower's tasks page shows only name, uuid, state and times by default. A job's id is the
task id of its submits, but a poll's jobs, a submit's prompt and a failed job's
``fail_code`` are in the kwargs, result and exception columns, so those are shown.
Authentication is not set here: pass ``--basic-auth=user:password`` (or OAuth) where
Flower runs, and never set ``FLOWER_UNAUTHENTICATED_API``.
"""

tasks_columns = "name,uuid,state,kwargs,exception,result,received,runtime,worker"
#: Flower switches task events on in the workers every 5 s, so a restarted worker's
#: tasks are seen even when it was started without ``-E``.
enable_events = True
#: Tasks kept in Flower's memory (each holds its events' fields).
max_tasks = 10000
