"""HTTP client for kie.ai's File Upload API: a source image given as a file becomes a URL.

createTask takes image URLs only, so the worker uploads a job's files just before its
createTask (:mod:`worker.policies.submit`) and sends the URLs the upload answers. The API
lives on its own host (``KIE_UPLOAD_BASE_URL``) but takes the same key and answers with the
same envelope, so this client shares :class:`~worker.upstreams.kie.KieClient`'s session, total
deadline, answer cap, error mapping (:func:`worker.upstreams.kie.error_from_response`) and
redaction. The upstream deletes uploaded files after 3 days (:data:`UPLOAD_LIFETIME_S`).
"""

from __future__ import annotations

from typing import Any

from worker.models import check_http_url
from worker.upstreams.errors import BadAnswerError
from worker.upstreams.kie import KieClient

UPLOAD_PATH = "/api/file-stream-upload"
#: The folder (``uploadPath``) remixq's files go to upstream.
UPLOAD_FOLDER = "remixq"
#: How long the upstream keeps an uploaded file.
UPLOAD_LIFETIME_S = 3 * 86400.0


class KieUploadClient(KieClient):
    """Uploads files; ``base_url`` is ``KIE_UPLOAD_BASE_URL``."""

    def __repr__(self) -> str:
        return f"KieUploadClient(base_url={self.base_url!r})"

    def upload(self, data: bytes, file_name: str, content_type: str) -> str:
        """Upload one file; returns its download URL (``data.downloadUrl``)."""
        answer = self._call(
            "POST",
            UPLOAD_PATH,
            fields={"uploadPath": UPLOAD_FOLDER, "fileName": file_name},
            files={"file": (file_name, data, content_type)},
        )
        return parse_download_url(answer)


def parse_download_url(data: Any) -> str:
    """The ``downloadUrl`` of an upload answer's ``data``: an http(s) URL."""
    url = data.get("downloadUrl") if isinstance(data, dict) else None
    if not isinstance(url, str):
        raise BadAnswerError("upload answer lacks data.downloadUrl")
    try:
        return check_http_url(url)
    except ValueError:
        raise BadAnswerError("upload answer's downloadUrl is not an http(s) URL") from None
