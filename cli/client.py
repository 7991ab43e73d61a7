"""The HTTP client every API command uses: base URL and token, JSON in and out, problem+json as ApiError.

The base URL comes from `--url`, `LAXCLUSTER_URL`, else the config's `[api]` host and port; the
token from `--token` or `LAXCLUSTER_TOKEN`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

import click
import requests

import config

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0


class ApiError(click.ClickException):
    """An error the API (or the way to it) reported, printed as `code: detail`, exit code 1."""

    exit_code = 1

    def __init__(self, code: str, detail: str, status: int | None = None, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail, self.status, self.problem = code, detail, status, problem or {}

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(self.format_message(), err=True, file=file)


@dataclass(frozen=True)
class Settings:
    """Where the API is and who we are, as given on the command line or in the environment."""

    url: str | None = None
    token: str | None = None


def default_url() -> str:
    """The API's URL from the config file: http://<api host>:<api port>."""
    api = config.load().section("api")
    host = api.get("host", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{api.get('port', 8080)}"


@dataclass
class Client:
    base_url: str
    token: str | None = None
    http: requests.Session = field(default_factory=requests.Session)

    def get(self, path: str, **params: Any) -> Any:
        """GET `path` and return its JSON; None-valued params are left out."""
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict[str, Any] | None = None, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", path, json=body or {}, headers=headers).json()

    def stream(self, path: str, headers: dict[str, str] | None = None) -> requests.Response:
        """An open streaming response (Server-Sent Events); the caller closes it."""
        return self.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})}, stream=True)

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        """Send a request; any answer but 2xx, or no answer, raises ApiError."""
        url = self.base_url.rstrip("/") + path
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self.http.request(method, url, headers=all_headers, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), **kwargs)
        except requests.ConnectionError as error:
            raise ApiError("Unreachable", f"cannot reach the LaxCluster API at {self.base_url} "
                                          "(is `laxcluster run` running? set --url or LAXCLUSTER_URL)") from error
        except requests.Timeout as error:
            raise ApiError("Timeout", f"no answer from {url} in time") from error
        if response.status_code >= 400:
            raise error_from(response)
        return response


def error_from(response: requests.Response) -> ApiError:
    """The ApiError a non-2xx response stands for, from its problem+json body when it has one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        return ApiError(str(body["code"]), str(body.get("detail", "")), response.status_code, body)
    return ApiError(f"HTTP{response.status_code}", response.text.strip()[:300] or response.reason, response.status_code)


def api() -> Client:
    """The client for the command being run, from the top-level --url/--token."""
    settings = click.get_current_context().find_object(Settings) or Settings()
    return Client(settings.url or default_url(), settings.token)
