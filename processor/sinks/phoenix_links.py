"""Links from a rollup window to its exemplar traces in the Phoenix UI.

Phoenix's UI has a route that opens a trace by its OpenTelemetry trace id alone:
``<phoenix>/redirects/traces/<trace id, 32 hex digits>``. The page looks the trace up
(GraphQL ``getTraceByOtelId``) and moves on to ``/projects/<project id>/traces/<trace id>``, so a
link needs neither the Phoenix project the spans went to nor Phoenix's internal ids, and stays
valid whatever project a producer chose. (Checked against Phoenix 20.26.)

The base URL is the one people open in a browser, which is not always where the worker sends
spans (a collector endpoint may be an internal address, or end in ``/v1/traces``).
"""

from __future__ import annotations

from urllib.parse import quote

OTLP_TRACES_PATH = "/v1/traces"
TRACE_REDIRECT_PATH = "/redirects/traces/"


def ui_base_url(url: str) -> str:
    """The Phoenix UI's base URL from ``url``, which may end in ``/`` or ``/v1/traces`` (a
    collector endpoint); the result ends in neither. Raises ValueError for a non-http(s) URL."""
    base = url.strip().rstrip("/").removesuffix(OTLP_TRACES_PATH).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(
            f"expected the Phoenix UI's http(s):// URL, got {url!r}; "
            "set PROCESSOR_PHOENIX_PUBLIC_URL like https://phoenix.example.com"
        )
    return base


def trace_url(base_url: str, trace_id_hex: str) -> str:
    """The URL that opens the trace ``trace_id_hex`` (lowercase hex) in Phoenix."""
    return f"{base_url}{TRACE_REDIRECT_PATH}{quote(trace_id_hex, safe='')}"
