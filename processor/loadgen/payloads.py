"""Realistic span text: the prompts, completions and chat messages instrumentations record.

OpenInference's LangChain instrumentation puts a call's input and output on LLM and agent spans
(``input.value``, ``output.value``) and an LLM call's messages once more, one attribute per
field (``llm.input_messages.<i>.message.content``); the GenAI conventions put the messages on
the span as JSON (``gen_ai.input.messages``, ``gen_ai.output.messages``). Each text is 0.3-4 KB,
log-uniform (median ~1.1 KB, mean ~1.45 KB), as prompts and answers of agent calls are.

Text comes from a trace RNG of its own, so a trace's ids, shape and usage are the same with
payloads as without, and so is the truth of what is published.
"""

from __future__ import annotations

import random

import orjson
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

MIN_TEXT_BYTES = 300
MAX_TEXT_BYTES = 4096

_PROSE = (
    "the agent retrieved quarterly revenue figures for each region and compared them with "
    "forecast values before drafting a concise summary, noting that churn rose among small "
    "business customers after the price change while enterprise renewals stayed flat; the "
    "tool returned three documents, two of which cite the same incident report, so the answer "
    "should weigh them once and flag the missing data for March. Next, check the retry loop "
    "in the payment client: it sleeps a fixed second between attempts, ignores the server's "
    "retry-after header and never caps the total wait, which explains the timeouts users saw."
)
# One long text to cut slices from: a slice is a view of fresh-looking prose at no cost per span.
_WORDS = _PROSE.split()
_CORPUS = " ".join(random.Random("loadgen-corpus").choice(_WORDS) for _ in range(2_000))
_SYSTEM_PROMPT = (
    "You are a specialist agent in a team of agents. Answer the orchestrator's request "
    "precisely, cite the documents and tool results you used, and say when data is missing."
)


class PayloadWriter:
    """Adds the texts of one trace's spans, from that trace's own RNG."""

    def __init__(self, seed: int, index: int) -> None:
        self._rng = random.Random(f"loadgen-payload/{seed}/{index}")

    def text(self) -> str:
        rng = self._rng
        size = round(MIN_TEXT_BYTES * (MAX_TEXT_BYTES / MIN_TEXT_BYTES) ** rng.random())
        start = rng.randrange(len(_CORPUS) - size)
        return _CORPUS[start : start + size]

    def add_agent(self, attributes: RepeatedCompositeFieldContainer[KeyValue], ok: bool) -> None:
        """An agent step's input and, when it finished, its output."""
        _add(attributes, "input.value", self.text())
        if ok:
            _add(attributes, "output.value", self.text())

    def add_llm(
        self, attributes: RepeatedCompositeFieldContainer[KeyValue], genai: bool, ok: bool
    ) -> None:
        """An LLM call's prompt and, when it returned, its completion, as the convention of
        the span writes them."""
        prompt = self.text()
        completion = self.text() if ok else None
        if genai:
            messages = [
                {"role": "system", "parts": [{"type": "text", "content": _SYSTEM_PROMPT}]},
                {"role": "user", "parts": [{"type": "text", "content": prompt}]},
            ]
            _add(attributes, "gen_ai.input.messages", orjson.dumps(messages).decode())
            if completion is not None:
                answer = [{"role": "assistant", "parts": [{"type": "text", "content": completion}]}]
                _add(attributes, "gen_ai.output.messages", orjson.dumps(answer).decode())
            return
        _add(attributes, "input.value", prompt)
        _add(attributes, "input.mime_type", "text/plain")
        _add(attributes, "llm.input_messages.0.message.role", "system")
        _add(attributes, "llm.input_messages.0.message.content", _SYSTEM_PROMPT)
        _add(attributes, "llm.input_messages.1.message.role", "user")
        _add(attributes, "llm.input_messages.1.message.content", prompt)
        if completion is not None:
            _add(attributes, "output.value", completion)
            _add(attributes, "output.mime_type", "text/plain")
            _add(attributes, "llm.output_messages.0.message.role", "assistant")
            _add(attributes, "llm.output_messages.0.message.content", completion)


def _add(attributes: RepeatedCompositeFieldContainer[KeyValue], key: str, value: str) -> None:
    attributes.add(key=key).value.string_value = value
