"""A judge behind an OpenAI-compatible chat-completions endpoint, with the standard library only.

``POST <url>/chat/completions`` (or ``<url>`` itself when it already ends in
``/chat/completions``) with ``{"model", "messages", "temperature": 0,
"max_tokens"}``; the judgment is ``choices[0].message.content``. The API key is
read from an environment variable and sent as ``Authorization: Bearer <key>``;
without the variable no key is sent (local servers need none).

A refused connection, a timeout, HTTP 408, 429 and 5xx, and an answer that is
not a chat completion are retried with exponential backoff; when the retries
are spent the request fails (:class:`RequestFailed`) and the caller records it.
401, 403 and 404 stop everything (a wrong key or URL fails every request); any
other HTTP status fails the one request without retry.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

from fusechat.errors import FusechatError

SUFFIX = "/chat/completions"
RETRIED_STATUS = {408, 429}
FATAL_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not found"}
MAX_BACKOFF_S = 60.0


class RequestFailed(Exception):
    """One judgment could not be had from the endpoint; the message says why."""


def completions_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith(SUFFIX) else url + SUFFIX


class EndpointJudge:
    batch_size = 1

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_new_tokens: int = 2048,
                 timeout_s: float = 120.0, retries: int = 5, backoff_s: float = 2.0):
        if not url.startswith(("http://", "https://")):
            raise FusechatError(f"eval.mt_bench.judge_endpoint must be an http:// or https:// URL, got {url!r}")
        self.url = completions_url(url)
        self.model = model
        self.api_key_env = api_key_env
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.where = f"the judge endpoint {self.url}"

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
