"""Two LangGraph agents publishing their spans to Kafka, with no network model calls.

A researcher agent takes notes on a question and a writer agent (a subgraph of its own, with
``draft`` and ``review`` nodes) turns them into an answer. Both run on langchain-core's fake
chat model, which reports token usage the way a provider's client does. One call to
``configure_tracing`` sends every span to the processor's topic; the worker then attributes
the graph's root span to ``orchestrator`` (the process's agent name) and every span inside a
node to that node's agent, ``researcher`` or ``writer``, with their token counts.

Run it against the local stack (``trace-processor stack up``) and a worker::

    pip install 'agent-trace-processor[agents,examples]'
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/langgraph_two_agents.py --questions 5

Needs ``langgraph``, ``langchain-core`` and ``openinference-instrumentation-langchain``.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from typing import Any, TypedDict

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate
from langgraph.graph import END, START, StateGraph

from processor.publishing import configure_tracing

ORCHESTRATOR = "orchestrator"
# Tokens each model call reports: (prompt, completion). The worker's rollups must show exactly
# questions x these, per agent.
RESEARCHER_USAGE = (120, 45)
WRITER_DRAFT_USAGE = (310, 160)
WRITER_REVIEW_USAGE = (190, 20)
AGENT_USAGE = {
    "researcher": [RESEARCHER_USAGE],
    "writer": [WRITER_DRAFT_USAGE, WRITER_REVIEW_USAGE],
}

QUESTIONS = (
    "Why did checkout latency double last Tuesday?",
    "Which customers are affected by the invoice rounding bug?",
    "Summarise the incident review of the search outage.",
)


class Question(TypedDict, total=False):
    question: str
    notes: str
    answer: str


class Draft(TypedDict, total=False):
    notes: str
    answer: str


def fake_model(text: str, usage: tuple[int, int]) -> GenericFakeChatModel:
    """A chat model that answers ``text`` forever and reports ``usage`` tokens per call."""
    prompt, completion = usage

    def replies() -> Iterator[AIMessage]:
        for number in itertools.count(1):
            yield AIMessage(
                content=f"{text} (#{number})",
                usage_metadata={
                    "input_tokens": prompt,
                    "output_tokens": completion,
                    "total_tokens": prompt + completion,
                },
                response_metadata={"model_name": "fake-chat"},
            )

    return GenericFakeChatModel(messages=replies())


def build_graph() -> Any:
    """orchestrator graph: researcher -> writer (a subgraph: draft -> review)."""
    research = ChatPromptTemplate.from_messages(
        [("system", "You research questions for a support team."), ("human", "{question}")]
    ) | fake_model("Notes: three causes, one dominant.", RESEARCHER_USAGE)
    drafter = fake_model("Draft answer based on the notes.", WRITER_DRAFT_USAGE)
    reviewer = fake_model("Reviewed answer, ready to send.", WRITER_REVIEW_USAGE)

    def researcher(state: Question) -> Question:
        return {"notes": str(research.invoke({"question": state["question"]}).content)}

    def draft(state: Draft) -> Draft:
        return {"answer": str(drafter.invoke(f"Write an answer from: {state['notes']}").content)}

    def review(state: Draft) -> Draft:
        return {"answer": str(reviewer.invoke(f"Review: {state['answer']}").content)}

    writer = StateGraph(Draft)
    writer.add_node("draft", draft)
    writer.add_node("review", review)
    writer.add_edge(START, "draft")
    writer.add_edge("draft", "review")
    writer.add_edge("review", END)

    graph = StateGraph(Question)
    graph.add_node("researcher", researcher)
    graph.add_node("writer", writer.compile())
    graph.add_edge(START, "researcher")
    graph.add_edge("researcher", "writer")
    graph.add_edge("writer", END)
    return graph.compile()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help="graph runs")
    parser.add_argument("--project", default=None, help="Phoenix project of the spans")
    args = parser.parse_args(argv)

    provider = configure_tracing(agent_name=ORCHESTRATOR, project_name=args.project)
    app = build_graph()
    for number in range(args.questions):
        result = app.invoke({"question": QUESTIONS[number % len(QUESTIONS)]})
        print(f"{number + 1}: {result['answer']}")
    # Spans are exported in the background; at exit the provider flushes them (atexit), but
    # saying it here makes the example's end the moment they are in Kafka.
    provider.shutdown()


if __name__ == "__main__":
    main()
