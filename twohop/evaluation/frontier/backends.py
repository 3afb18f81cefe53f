"""Model back ends behind one interface: `complete_many(requests) -> replies`, in order.

- `local`: a model folder through the project's loader, batched greedy generation.
- `openai`: the Chat Completions wire format at any base URL (OpenAI, Together, vLLM, ...).
- `anthropic`: the Messages API.

HTTP back ends run `concurrency` requests at a time and retry 429, 5xx, timeouts, dropped
connections and malformed bodies with exponential backoff and jitter, honouring Retry-After; other
4xx fail at once. A refused connection or a host name that does not resolve is not transient: after
`down_after_failures` of them in a row the endpoint is marked down and every request still waiting
is returned at once as not asked, so a wrong port costs seconds rather than a retry cycle per
question. Keys come only from environment variables and are scrubbed from every error text.
A request that still fails is returned with its reason, never dropped.
"""
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
from urllib3.exceptions import NewConnectionError

from runner.errors import UserError

DEFAULT_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
DEFAULT_KEY_VARIABLES = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass
class Request:
    messages: list  # chat messages, the system prompt first if any
    max_tokens: int


@dataclass
class Reply:
    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""  # why it failed, after every retry; "" when answered
    attempts: int = 0
    asked: bool = True  # False: never answered because the endpoint was down


class Malformed(Exception):
    """A 200 response whose body is not what the wire format promises."""


def api_key(spec: dict) -> str:
    """The key of an HTTP endpoint, from the environment variable its spec names (checked at plan time too)."""
    variable = spec.get("api_key_env") or DEFAULT_KEY_VARIABLES[spec["backend"]]
    key = os.environ.get(variable, "")
    if not key:
        raise UserError(f"environment variable {variable} is not set (needed for {spec['backend']} model "
                        f"{spec['model']}); export it, or name another one with api_key_env")
    return key


class HttpBackend:
    def __init__(self, spec: dict, settings: dict, log):
        self.kind, self.model = spec["backend"], spec["model"]
        self.base_url = (spec.get("base_url") or DEFAULT_URLS[self.kind]).rstrip("/")
        self._key = api_key(spec)
        self.settings, self.log = settings, log
        self._local = threading.local()  # one HTTP session (connection pool) per worker thread
        self._lock, self._went_down = threading.Lock(), threading.Event()
        self._unreachable = 0  # connections in a row that could not be opened, over all threads
        self.down = ""  # why the endpoint is marked down; "" while it is up

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.model}"

    def identity(self) -> dict:
        """What a cached reply depends on (never the key)."""
        return {"backend": self.kind, "model": self.model, "base_url": self.base_url}

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***")

    def request(self, req: Request) -> tuple:
        system = "\n".join(m["content"] for m in req.messages if m["role"] == "system")
        turns = [m for m in req.messages if m["role"] != "system"]
        if self.kind == "openai":
            return (f"{self.base_url}/chat/completions", {"Authorization": f"Bearer {self._key}"},
                    {"model": self.model, "messages": req.messages, "max_tokens": req.max_tokens, "temperature": 0})
        body = {"model": self.model, "messages": turns, "max_tokens": req.max_tokens, "temperature": 0}
        if system:
            body["system"] = system
        return f"{self.base_url}/v1/messages", {"x-api-key": self._key, "anthropic-version": "2023-06-01"}, body

    def parse(self, data) -> Reply:
        try:
            if self.kind == "openai":
                usage = data.get("usage") or {}
                return Reply(data["choices"][0]["message"]["content"] or "", usage.get("prompt_tokens", 0),
                             usage.get("completion_tokens", 0))
            usage = data.get("usage") or {}
            text = "".join(block["text"] for block in data["content"] if block.get("type") == "text")
            return Reply(text, usage.get("input_tokens", 0), usage.get("output_tokens", 0))
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise Malformed(f"unexpected response shape ({type(error).__name__}: {error})") from None

    def complete(self, req: Request) -> Reply:
        """One request, retried while its failures are transient; not asked once the endpoint is down."""
        url, headers, body = self.request(req)
        reason, retry_after, tries = "", None, self.settings["max_retries"] + 1
        for attempt in range(tries):
            if attempt:  # the wait ends early if the endpoint is marked down meanwhile
                self._went_down.wait(backoff(attempt - 1, self.settings, retry_after))
            if self.down:
                return self._gave_up(reason, attempt)
            reply, reason, retry_after = self._attempt(url, headers, body)
            if reply is not None:
                reply.attempts = attempt + 1
                return reply
        return self._gave_up(reason, tries)

    def _attempt(self, url: str, headers: dict, body: dict) -> tuple:
        """One POST: (reply, "", None) when it settles the request (answered, or a 4xx that retrying
        cannot help), else (None, the transient failure, the server's Retry-After)."""
        session = getattr(self._local, "session", None) or requests.Session()
        self._local.session = session
        try:
            response = session.post(url, headers=headers, json=body, timeout=self.settings["timeout_s"])
        except requests.Timeout:
            return None, f"timeout after {self.settings['timeout_s']} s", None
        except requests.ConnectionError as error:
            self._local.session = requests.Session()  # the pooled connection may be dead
            return None, self._connection_failed(error), None
        with self._lock:
            self._unreachable = 0
        if response.status_code == 429 or response.status_code >= 500:
            return None, f"HTTP {response.status_code}", parse_retry_after(response.headers.get("Retry-After"))
        if response.status_code >= 400:
            return Reply(error=self.scrub(f"HTTP {response.status_code}: {response.text[:300]}")), "", None
        try:
            return self.parse(response.json()), "", None
        except (ValueError, Malformed) as error:  # ValueError: the body is not JSON
            return None, f"malformed response: {str(error)[:200]}", None

    def _connection_failed(self, error: requests.ConnectionError) -> str:
        """The failure's reason; one that opened no connection counts towards marking the endpoint down."""
        cause = unreachable(error)
        if not cause:  # a connection was made and dropped: transient
            return f"connection error ({type(error).__name__})"
        with self._lock:
            self._unreachable += 1
            if self._unreachable >= self.settings["down_after_failures"] and not self.down:
                self.down = f"{self.base_url}: {cause} ({self._unreachable} connection attempts in a row)"
                self._went_down.set()
        return f"cannot connect to {self.base_url}: {cause}"

    def _gave_up(self, reason: str, attempts: int) -> Reply:
        if self.down:
            return Reply(error=self.scrub(f"not asked: endpoint down, {self.down}"), attempts=attempts, asked=False)
        return Reply(error=self.scrub(f"{reason} (after {attempts} attempts)"), attempts=attempts)

    def complete_many(self, requests_: list, done=None) -> list:
        """Replies in request order; `done(index, reply)` is called as each one arrives."""
        def one(index):
            reply = self.complete(requests_[index])
            if done:
                done(index, reply)
            return reply

        with ThreadPoolExecutor(max_workers=self.settings["concurrency"]) as pool:
            return list(pool.map(one, range(len(requests_))))


def unreachable(error: requests.ConnectionError) -> str:
    """Why no connection could be opened (refused, unknown host, no route); "" when one was."""
    cause = getattr(error.args[0] if error.args else None, "reason", None)
    if not isinstance(cause, NewConnectionError):  # NameResolutionError is one too
        return ""
    return getattr(cause.__cause__, "strerror", None) or str(cause)


def parse_retry_after(value):
    """Seconds from a Retry-After header (delta-seconds form); None when absent or a date."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def backoff(attempt: int, settings: dict, retry_after=None) -> float:
    """Retry-After when the server gave one (capped), else exponential backoff with equal jitter."""
    if retry_after is not None:
        return min(retry_after, settings["max_retry_after_s"])
    ceiling = min(settings["max_backoff_s"], settings["backoff_s"] * 2 ** attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class LocalBackend:
    """A local model folder: every request of a batch generated together, greedy."""

    def __init__(self, path, label: str, batch_size: int):
        from models import load_model
        self.model, self.tokenizer = load_model(path)
        self.label, self.path, self.batch_size = label, str(path), batch_size

    @property
    def name(self) -> str:
        return f"local:{self.label}"

    def identity(self) -> dict:
        from models.loading import model_fingerprint
        return {"backend": "local", "model": self.label, "weights": model_fingerprint(self.path)}

    def complete_many(self, requests_: list, done=None) -> list:
        from twohop.evaluation import generation
        replies = [None] * len(requests_)
        for max_tokens in sorted({r.max_tokens for r in requests_}):
            indices = [i for i, r in enumerate(requests_) if r.max_tokens == max_tokens]
            prompts = [generation.prompt_text(self.tokenizer, requests_[i].messages) for i in indices]
            texts = generation.generate(self.model, self.tokenizer, prompts, max_tokens, self.batch_size)
            for i, prompt, text in zip(indices, prompts, texts):
                replies[i] = Reply(text, len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                                   len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), attempts=1)
                if done:
                    done(i, replies[i])
        return replies
