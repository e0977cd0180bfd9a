"""A judge behind an OpenAI-compatible chat-completions endpoint, with the standard library only.

``POST <url>/chat/completions`` (the suffix joined onto the URL's path, before any query;
nothing added when the path already ends in ``/chat/completions``) with ``{"model", "messages", "temperature": 0,
"max_tokens"}``; the judgment is ``choices[0].message.content``. The API key is
read from an environment variable and sent as ``Authorization: Bearer <key>``;
without the variable no key is sent (local servers need none). A user and password written
in the URL are sent as HTTP basic authentication. Messages show the URL redacted: no user or
password, and every query value replaced by ``***``.

A refused connection, a timeout, HTTP 408, 429 and 5xx, and an answer that is
not a chat completion are retried with exponential backoff; when the retries
are spent the request fails (:class:`RequestFailed`) and the caller records it.
401, 403 and 404 stop everything (a wrong key or URL fails every request); any
other HTTP status fails the one request without retry.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from fusechat.config import redacted_url
from fusechat.errors import FusechatError

SUFFIX = "/chat/completions"
RETRIED_STATUS = {408, 429}
FATAL_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not found"}
MAX_BACKOFF_S = 60.0


class RequestFailed(Exception):
    """One judgment could not be had from the endpoint; the message says why."""


def completions_url(url: str) -> str:
    """The chat-completions URL of a base URL (…/v1): the suffix goes onto the path, the query stays after it."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit(parts._replace(path=path if path.endswith(SUFFIX) else path + SUFFIX))


def _without_userinfo(url: str) -> tuple[str, str | None]:
    """(the URL without user and password, the basic-authentication header value they make, or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(token).decode()


class EndpointJudge:
    batch_size = 1

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_new_tokens: int = 2048,
                 timeout_s: float = 120.0, retries: int = 5, backoff_s: float = 2.0):
        if not url.startswith(("http://", "https://")):
            raise FusechatError(f"eval.mt_bench.judge_endpoint must be an http:// or https:// URL, got "
                                f"{redacted_url(url)!r}")
        self.url, self.basic_auth = _without_userinfo(completions_url(url))
        self.model = model
        self.api_key_env = api_key_env
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.where = f"the judge endpoint {redacted_url(self.url)}"

    def complete(self, conversations: list[list[dict]]) -> list[str | RequestFailed]:
        out = []
        for messages in conversations:
            try:
                out.append(self.ask(messages))
            except RequestFailed as e:
                out.append(e)
        return out

    def ask(self, messages: list[dict]) -> str:
        """The judgment, after up to ``retries`` retries; RequestFailed when none came."""
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1)))
            try:
                return self._post(messages)
            except _Retry as e:
                problem = str(e)
        tries = self.retries + 1
        raise RequestFailed(f"{problem} ({tries} attempt{'s' if tries > 1 else ''})")

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_new_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif self.basic_auth:
            headers["Authorization"] = self.basic_auth
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code in FATAL_STATUS:
                hint = (f"; set ${self.api_key_env} to the API key (eval.mt_bench.judge_api_key_env names the "
                        "variable)" if e.code in (401, 403) else "; check the URL and the judge's model name")
                raise FusechatError(f"{self.where} answered HTTP {e.code} ({FATAL_STATUS[e.code]}){detail}{hint}") \
                    from None
            if e.code in RETRIED_STATUS or e.code >= 500:
                raise _Retry(f"HTTP {e.code}{detail}") from None
            raise RequestFailed(f"HTTP {e.code}{detail}") from None
        except TimeoutError:
            raise _Retry(f"no answer within {self.timeout_s:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"no answer within {self.timeout_s:g} s") from None
            raise _Retry(f"cannot connect: {e.reason}") from None
        except (ConnectionError, OSError) as e:
            raise _Retry(f"connection lost: {e}") from None
        return _content(payload)


class _Retry(Exception):
    """A failure worth asking again."""


def _content(payload: bytes) -> str:
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retry(f"the answer is not a chat completion: {payload[:200]!r}") from None
    if not isinstance(content, str):
        raise _Retry(f"the answer's choices[0].message.content is not text: {content!r:.100}")
    return content


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode("utf-8", "replace").strip()
    except OSError:  # the body is only a hint for the message
        return ""
    return f": {text[:200]}" if text else ""
