"""Answer paused queries with real models, recorded and replayable.

``respond = pool_notebook.llm.openai("gpt-4o-mini")`` (or the string
``"openai:gpt-4o-mini"`` wherever a responder is accepted) answers every query
of a pause through the official ``openai`` SDK, so any OpenAI-compatible
endpoint works (OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp, LM Studio...).
Every answer is recorded in a local SQLite answers store and replayed on the
next run of the same requests (see :mod:`.store`).

Modules: ``providers`` (the SDK call), ``store`` (the answers store),
``responder`` (occurrences, record/replay, concurrency).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import LLMError
from .providers import OpenAIChat
from .responder import FLAG_NOTES, CacheMode, ModelResponder
from .store import AnswerStore, ChatRequest, Recorded

__all__ = ["FLAG_NOTES", "AnswerStore", "CacheMode", "ChatRequest", "ModelResponder",
           "OpenAIChat", "Recorded", "azure", "from_spec", "openai"]

_PREFIXES = ("openai", "azure")
#: The environment a spec's responder is built from: a change gives a new responder.
_SPEC_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT",
             "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION", "POOL_NOTEBOOK_ANSWERS",
             "POOL_NOTEBOOK_HOME")
_from_spec: dict[tuple[str | None, ...], ModelResponder] = {}


def openai(model: str, *, base_url: str | None = None, api_key: str | None = None,
           temperature: float | None = None, max_concurrency: int = 8,
           cache: CacheMode = "record", store: AnswerStore | str | os.PathLike[str] | None = None,
           provider: str | None = None, api_version: str | None = None,
           timeout: float = 60.0, max_retries: int = 2, token_limit_field: str = "max_tokens",
           flag_notes: Mapping[str, str] | None = FLAG_NOTES,
           extra_body: dict[str, Any] | None = None) -> ModelResponder:
    """A responder asking ``model`` through the openai SDK.

    Endpoint and key are the SDK's (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) unless
    given; a local server needs only ``base_url``. ``api_version`` switches to Azure
    OpenAI (``base_url`` = the resource endpoint, ``model`` = the deployment).
    ``cache``: ``"record"`` replays recorded answers and asks for the rest,
    ``"replay"`` never calls the provider, ``"off"`` neither reads nor records.
    ``store``: an :class:`AnswerStore` or its path (default ``<home>/answers.sqlite``).
    ``provider`` names the endpoint in the store's key (default ``openai``/``azure``).
    ``token_limit_field``: ``"max_completion_tokens"`` for models that refuse
    ``max_tokens``. ``flag_notes``: how ``grounded``/``underspecified`` reach the
    model (None sends the query as is). ``extra_body``: extra request fields.
    """
    chat = OpenAIChat(model, base_url=base_url, api_key=api_key, api_version=api_version,
                      timeout=timeout, max_retries=max_retries, provider=provider,
                      token_limit_field=token_limit_field, extra_body=extra_body)
    if store is not None and not isinstance(store, AnswerStore):
        store = AnswerStore(store)
    return ModelResponder(chat, temperature=temperature, max_concurrency=max_concurrency,
                          cache=cache, store=store, flag_notes=flag_notes)


def azure(deployment: str, **options: Any) -> ModelResponder:
    """An Azure OpenAI deployment: endpoint, key and version from ``AZURE_OPENAI_ENDPOINT``,
    ``AZURE_OPENAI_API_KEY`` and ``OPENAI_API_VERSION`` unless given."""
    options.setdefault("api_version", os.environ.get("OPENAI_API_VERSION"))
    if not options["api_version"]:
        raise LLMError("Azure OpenAI needs an API version: set OPENAI_API_VERSION "
                       "or pass api_version=...")
    return openai(deployment, **options)


def from_spec(spec: str) -> ModelResponder:
    """``"openai:MODEL"`` or ``"azure:DEPLOYMENT"`` as a responder (endpoint, key and
    store from the environment). The same spec in the same environment gives the
    same responder, so its concurrency bound holds across the kernel's sessions."""
    prefix, _, model = spec.partition(":")
    if prefix not in _PREFIXES or not model:
        raise LLMError(f"unknown responder {spec!r}: use 'openai:MODEL' (any OpenAI-compatible "
                       "endpoint, via OPENAI_BASE_URL / OPENAI_API_KEY) or 'azure:DEPLOYMENT'")
    key = (spec, *map(os.environ.get, _SPEC_ENV))
    responder = _from_spec.get(key)
    if responder is None:
        responder = _from_spec[key] = openai(model) if prefix == "openai" else azure(model)
    return responder
