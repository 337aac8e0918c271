"""Tool calls (engine/tools.py) for a model without tool tokens: the answer shape each tool_choice allows, how a
conversation with calls and results is written into the Mixtral prompt, and the Python API's tool_calls."""
from __future__ import annotations

import json

import pytest
from mixlocal.engine.tools import (
    ToolError,
    answer_schema,
    parse_answer,
    render_messages,
    tool_spec,
)
from mixlocal.tokenizer import Tokenizer

from mixlocal import engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_tool_spec_checks_what_openai_allows():
    assert not tool_spec(None, None).active and not tool_spec([WEATHER], "none").active
    assert tool_spec([WEATHER], None).choice == "auto"
    named = tool_spec([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named.choice == "get_time"
    for tools, choice, where in [([WEATHER], {"type": "function", "function": {"name": "nope"}}, "nope"),
                                 ([{"type": "function"}], None, r"tools\[0\]"), (None, "required", "needs"),
                                 ([WEATHER, WEATHER], None, "same name"), ([WEATHER], "sometimes", "tool_choice")]:
        with pytest.raises(ToolError, match=where):
            tool_spec(tools, choice)
    with pytest.raises(ValueError):
        tool_spec([WEATHER], None, "yes")


def test_answer_schema_by_choice():
    required = answer_schema(tool_spec([WEATHER, TIME], "required"))
    assert required["required"] == ["tool_calls"] and "maxItems" not in required["properties"]["tool_calls"]
    names = [c["properties"]["name"]["const"] for c in required["properties"]["tool_calls"]["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    one = answer_schema(tool_spec([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}))
    assert one["properties"]["tool_calls"]["maxItems"] == 1
    assert [c["properties"]["name"]["const"] for c in one["properties"]["tool_calls"]["items"]["anyOf"]] == \
        ["get_time"]
    auto = answer_schema(tool_spec([WEATHER], "auto", False))
    assert auto["anyOf"][1]["required"] == ["response"] and auto["anyOf"][0]["properties"]["tool_calls"]["maxItems"] == 1


def test_a_conversation_with_calls_and_results_becomes_alternating_turns():
    from importlib.resources import files
    tok = Tokenizer.from_file(str(files("mistral_common") / "data" / "tokenizer.model.v1"))
    spec = tool_spec([WEATHER], "auto")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "rain, 8C"},
            {"role": "user", "content": "And should I take an umbrella?"}]
    out = render_messages(msgs, spec)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert json.loads(out[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    assert out[3]["content"] == "Result of get_weather (call call_1): rain, 8C\n\nAnd should I take an umbrella?"
    tok.encode_chat(out)  # the Mixtral v1 format takes it (strict alternation)
    with pytest.raises(ToolError, match="role"):
        render_messages([{"role": "tool", "content": "x"}], spec)


def test_parse_answer():
    content, calls, finish = parse_answer('{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}', "stop")
    assert content is None and finish == "tool_calls" and calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert parse_answer('{"response": "hi"}', "stop") == ("hi", None, "stop")
    assert parse_answer('{"tool_calls": [{"na', "length") == ('{"tool_calls": [{"na', None, "length")


@pytest.mark.parametrize("stream", [False, True])
def test_python_api_returns_tool_calls(stream):
    llm = engine.load(n_ctx=1024, kv_type="f32")
    kw = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "max_tokens": 40, "temperature": 0.7, "seed": 4}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        chunks = list(llm.create_chat_completion(msgs, stream=True, **kw))
        calls = [c for ch in chunks for c in (ch["choices"][0]["delta"].get("tool_calls") or [])]
        finish = chunks[-1]["choices"][0]["finish_reason"]
        assert calls[0]["index"] == 0
    else:
        res = llm.create_chat_completion(msgs, **kw)
        calls, finish = res["choices"][0]["message"]["tool_calls"], res["choices"][0]["finish_reason"]
        assert res["choices"][0]["message"]["content"] is None
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"])["city"] in ("Paris", "Oslo")
