"""Flower's settings for remixq, read by ``celery -A worker.app flower`` from the working
directory (or ``--conf=/path/to/flowerconfig.py``); command-line options win over these.

Flower's tasks page shows only name, uuid, state and times by default. A job's id is the
task id of its submits, but a poll's jobs, a submit's prompt and a failed job's
``fail_code`` are in the kwargs, result and exception columns, so those are shown.

Flower refuses to start here without a login: ``FLOWER_BASIC_AUTH=user:password`` (or
``--basic-auth=``; several comma-separated), or OAuth (``FLOWER_AUTH`` and its
``FLOWER_OAUTH2_*``); an entry without a user or a password stops it too. (With a login,
``FLOWER_UNAUTHENTICATED_API`` opens nothing.) Flower runs this file after reading its
``FLOWER_*`` variables and its command line; only the names of Flower's options set here
are used (the helpers are prefixed with ``_``). See docs/security.md.
"""

from tornado.options import options as _given

tasks_columns = "name,uuid,state,kwargs,exception,result,received,runtime,worker"
#: Flower switches task events on in the workers every 5 s, so a restarted worker's
#: tasks are seen even when it was started without ``-E``.
enable_events = True
#: Tasks kept in Flower's memory (each holds its events' fields).
max_tasks = 10000


def _login_problem(logins: list[str], oauth: str | None) -> str | None:
    """Why Flower must not start with these options (None: it may)."""
    if oauth:
        return None
    if not logins:
        return "no login: set FLOWER_BASIC_AUTH=user:password (or OAuth with FLOWER_AUTH)"
    for user, _sep, password in (entry.partition(":") for entry in logins):
        if not user.strip() or not password.strip():
            return "FLOWER_BASIC_AUTH has an entry without a user or a password (user:password)"
    return None


_problem = _login_problem(list(_given.basic_auth or []), _given.auth)
if _problem is not None:
    raise SystemExit(f"flower: {_problem}")
