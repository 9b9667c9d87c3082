"""Chat completions through the official ``openai`` SDK (any OpenAI-compatible endpoint).

One :class:`OpenAIChat` sends one request and returns the text with the
provider's token usage. Retries (429 honouring ``retry-after``, 408/409/5xx,
connection errors) and timeouts are the SDK's own; what still fails after them
becomes :class:`~pool_notebook.errors.LLMProviderError`. The SDK client is made
lazily (a replay never needs a key) and once per event loop (its connection
pool belongs to the loop that opened it).
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from typing import TYPE_CHECKING, Any

from ..errors import LLMError, LLMProviderError
from .store import ChatRequest, Recorded

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["OpenAIChat"]

#: Sent as the key when a custom endpoint (Ollama, vLLM, llama.cpp...) needs none.
NO_KEY = "not-needed"


class OpenAIChat:
    """The ``chat.completions`` endpoint of one OpenAI-compatible server, for one model."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 api_version: str | None = None, timeout: float = 60.0, max_retries: int = 2,
                 token_limit_field: str = "max_tokens", provider: str | None = None,
                 extra_body: dict[str, Any] | None = None) -> None:
        self.model = model
        self.azure = api_version is not None
        #: The provider part of the answers store's key (not the URL: replays travel).
        self.provider = provider or ("azure" if self.azure else "openai")
        self.base_url = base_url
        self.api_key = api_key
        self.api_version = api_version
        self.timeout = timeout
        self.max_retries = max_retries
        self.token_limit_field = token_limit_field
        self.extra_body = extra_body
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = (
            weakref.WeakKeyDictionary())

    def __repr__(self) -> str:
        return f"<OpenAIChat {self.provider}:{self.model} {self.endpoint}>"

    @property
    def endpoint(self) -> str:
        """Where requests go (for messages): the explicit URL, the environment's, or the SDK's."""
        env = "AZURE_OPENAI_ENDPOINT" if self.azure else "OPENAI_BASE_URL"
        return self.base_url or os.environ.get(env) or "https://api.openai.com/v1"

    def _client(self) -> AsyncOpenAI:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._make_client()
            self._clients[loop] = client
        return client

    def _make_client(self) -> AsyncOpenAI:
        try:
            import openai
        except ImportError as exc:
            raise LLMError("model responders need the openai SDK: "
                           "pip install 'pool-notebook[llm]'") from exc
        key_env = "AZURE_OPENAI_API_KEY" if self.azure else "OPENAI_API_KEY"
        api_key = self.api_key or os.environ.get(key_env)
        custom = self.base_url is not None or "OPENAI_BASE_URL" in os.environ
        if api_key is None and custom and not self.azure:
            api_key = NO_KEY  # local servers (Ollama, vLLM, llama.cpp) ignore the key
        options: dict[str, Any] = {"api_key": api_key, "timeout": self.timeout,
                                   "max_retries": self.max_retries}
        try:
            if self.azure:  # no base_url: the SDK reads AZURE_OPENAI_ENDPOINT
                if self.base_url:
                    options["azure_endpoint"] = self.base_url
                return openai.AsyncAzureOpenAI(api_version=self.api_version, **options)
            return openai.AsyncOpenAI(base_url=self.base_url, **options)
        except openai.OpenAIError as exc:
            raise LLMError(
                f"cannot set up model {self.model!r} at {self.endpoint}: {exc}. Set {key_env} "
                "(or pass api_key=...); for a local server pass base_url=... (no key needed); "
                "to run without any provider use cache=\"replay\" with a recorded store"
            ) from exc

    async def complete(self, request: ChatRequest) -> Recorded:
        """Ask the model once; the SDK retries, a final failure is LLMProviderError."""
        client = self._client()  # first: a missing SDK is an LLMError saying what to install
        import openai

        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        options: dict[str, Any] = {}
        if request.max_tokens is not None:
            options[self.token_limit_field] = request.max_tokens
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if self.extra_body:
            options["extra_body"] = self.extra_body
        start = time.perf_counter()
        try:
            reply = await client.chat.completions.create(
                model=self.model, messages=messages, **options)  # type: ignore[arg-type]
        except openai.APIStatusError as exc:
            raise LLMProviderError(self.model, self.endpoint, _status_text(exc),
                                   exc.status_code) from exc
        except openai.OpenAIError as exc:  # connection refused, timeouts, bad payloads
            raise LLMProviderError(self.model, self.endpoint,
                                   f"{type(exc).__name__}: {exc}") from exc
        latency_ms = (time.perf_counter() - start) * 1000.0
        choice = reply.choices[0] if reply.choices else None
        text = choice.message.content if choice else None
        if choice is None or text is None:
            finish = choice.finish_reason if choice else "no choices"
            raise LLMProviderError(self.model, self.endpoint,
                                   f"the reply carries no text (finish_reason={finish})")
        usage = reply.usage
        return Recorded(
            text=text,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            finish_reason=choice.finish_reason,
            response_model=reply.model,
            latency_ms=latency_ms,
        )


def _status_text(exc: Any) -> str:
    """The provider's own error message when its body has one, else the SDK's."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(exc.message)
