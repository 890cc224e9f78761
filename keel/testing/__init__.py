"""Test doubles shipped with keelgraph: a scripted chat model, for your tests as for ours."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from keelgraph.contracts.suspend import run_sync

__all__ = ["ScriptExhausted", "ScriptedChatModel", "answer", "call"]

Reply = str | dict[str, Any] | list[Any] | AIMessage | BaseException | Callable[[list[BaseMessage]], Any]


class ScriptExhausted(AssertionError):
    """The graph asked the scripted model more often than the script allows."""


def answer(**fields: Any) -> dict[str, Any]:
    """A final-answer step, as the JSON strategies expect it."""
    return {"action": "final_answer", "answer": fields}


def call(tool: str, **args: Any) -> dict[str, Any]:
    """A tool-call step, as the JSON strategies expect it."""
    return {"action": tool, "args": args}


class ScriptedChatModel(BaseChatModel):
    """A chat model that replies from a script, one entry per call, and records every call.

    Entries: text, a dict or list (sent as JSON text), an `AIMessage` (native tool calls), an
    exception (raised), or a function of the prompt messages returning any of these.

    >>> model = ScriptedChatModel(["not json", answer(text="hi")])
    >>> model.invoke("x").content, model.invoke("y").content
    ('not json', '{"action": "final_answer", "answer": {"text": "hi"}}')
    """

    script: list[Any]
    repeat_last: bool = False
    """Keep answering with the last entry instead of failing when the script runs out."""
    calls: list[dict[str, Any]] = Field(default_factory=list)
    """Each call's messages and keyword arguments (response format, tools, tool choice)."""

    def __init__(self, script: Sequence[Reply] = (), **kwargs: Any) -> None:
        super().__init__(script=list(script), **kwargs)

    @property
    def _llm_type(self) -> str:
        return "keelgraph-scripted"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._reply(messages, self._entry(messages, kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """The same script on the event loop: a function entry that is a coroutine function is
        awaited, any other function runs on an executor thread (it may block), the rest inline."""
        item = self._entry(messages, kwargs, call=False)
        if inspect.iscoroutinefunction(item):
            item = await item(list(messages))
        elif callable(item) and not isinstance(item, BaseException):
            item = await asyncio.get_running_loop().run_in_executor(None, item, list(messages))
        return self._reply(messages, item)

    def _entry(self, messages: list[BaseMessage], kwargs: dict[str, Any], *, call: bool = True) -> Any:
        index = len(self.calls)
        self.calls.append({"messages": list(messages), "kwargs": kwargs})
        if index >= len(self.script):
            if not (self.repeat_last and self.script):
                raise ScriptExhausted(
                    f"the script has {len(self.script)} replies; call {index + 1} asked for more"
                )
            index = len(self.script) - 1
        item = self.script[index]
        if call and callable(item) and not isinstance(item, BaseException):
            item = item(list(messages))
            if inspect.isawaitable(item):
                item = run_sync(item)
        return item

    @staticmethod
    def _reply(messages: list[BaseMessage], item: Any) -> ChatResult:
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, AIMessage):
            message = item.model_copy()
        else:
            message = AIMessage(item if isinstance(item, str) else json.dumps(item))
        prompt_chars = sum(len(str(m.content)) for m in messages)
        out = len(str(message.content)) + len(json.dumps([c["args"] for c in message.tool_calls]))
        message.usage_metadata = {
            "input_tokens": prompt_chars // 4,
            "output_tokens": max(1, out // 4),
            "total_tokens": prompt_chars // 4 + max(1, out // 4),
        }
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)
