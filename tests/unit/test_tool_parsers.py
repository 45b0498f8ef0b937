"""Free-form tool-call parsing (``tool_choice`` ``auto`` with ``--tool-call-parser hermes``): the calls
come out with their JSON arguments, the text around them stays the content, a malformed block stays text."""

import json

from bagualu.engine.outputs import CompletionOutput
from bagualu.serve.chat import message
from bagualu.serve.protocol import ChatCompletionRequest
from bagualu.serve.tool_parsers import parse_hermes

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_hermes_calls_content_and_malformed_blocks():
    text = ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me add."
    assert [(n, json.loads(a)) for n, a in calls] == [("add", {"a": 1, "b": 2}), ("add", {"a": 3})]
    bad = "x <tool_call>{not json}</tool_call> y"
    assert parse_hermes(bad) == (bad, [])
    assert parse_hermes("plain text") == ("plain text", [])
    assert parse_hermes('<tool_call>{"name": "add", "arguments": {}}</tool_call>') == (None, [("add", "{}")])


class _Ctx:
    tool_call_parser = "hermes"


def test_auto_tool_choice_answers_parsed_calls():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "1+2?"}], tools=TOOLS)
    req.check(auto_tools=True)
    c = CompletionOutput(index=0, text='<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', token_ids=[1],
                         finish_reason="stop")
    msg, finish = message(req, _Ctx(), c)
    assert finish == "tool_calls" and msg["content"] is None
    (call,) = msg["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": '{"a": 1}'} and call["id"].startswith("call_")
    c = CompletionOutput(index=0, text="no call here", token_ids=[1], finish_reason="length")
    assert message(req, _Ctx(), c) == ({"role": "assistant", "content": "no call here"}, "length")
