"""A Python client of the labelling API (the one the page uses), on urllib alone.

The iterated loop's simulated annotator labels through it, so the loop a person runs and the loop
the tests run go through the same HTTP endpoints. An error answer (4xx/5xx) raises `FeedbackError`
carrying the status and the server's one-line message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class FeedbackError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class FeedbackClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url, self.token, self.timeout = base_url.rstrip("/"), token, timeout

    def next(self, annotator: str) -> dict[str, Any]:
        """{"done", "candidate": {id, prompt, a, b, ...} | None, "progress": {"labelled", "total"}}"""
        return self._call("GET", "/api/next?" + urllib.parse.urlencode({"annotator": annotator}))

    def label(self, id: str, annotator: str, choice: str, reason: str = "", seconds: float = 0.0) -> dict[str, Any]:
        """choice: "a", "b", "tie", "both_bad" or "skip" (the candidate's own sides). Returns {"progress"}."""
        return self._call("POST", "/api/label", {"id": id, "annotator": annotator, "choice": choice,
                                                  "reason": reason, "seconds": seconds})

    def undo(self, annotator: str) -> dict[str, Any]:
        """Retract the annotator's latest label: {"undone": id | None, "progress"}."""
        return self._call("POST", "/api/undo", {"annotator": annotator})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace").strip() or error.reason
            raise FeedbackError(error.code, str(message)) from None
