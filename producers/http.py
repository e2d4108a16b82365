"""The HTTP app other services use: ``uvicorn producers.http:app`` (the Procfile's ``api:``).

(Work in progress: the jobs routes, auth, health and metrics are being added.)
"""

from __future__ import annotations

from fastapi import FastAPI

from producers.http_callbacks import router as callbacks_router

app = FastAPI(title="remixq", version="1")
app.include_router(callbacks_router)
