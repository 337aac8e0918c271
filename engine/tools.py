"""Tool calls for a model that has no tool tokens (Mixtral 8x7B Instruct v0.1), as llama.cpp's generic handler does
them: the tools are described to the model in the system prompt, and the answer is constrained (engine/constraints.py)
to one JSON object, either {"tool_calls": [{"name": ..., "arguments": {...}}, ...]} or, when the model may answer
in words (tool_choice "auto"), {"response": "..."}.

How a conversation with tool calls is written into the Mixtral prompt, which only alternates user and assistant:
  - the tool descriptions and the answer format go into the system prompt (Mixtral v1 puts it before the first user
    message);
  - an assistant message that called tools is written as the JSON object it answered with;
  - "tool" messages (the results) become the next user turn, one line each: `Result of <name> (call <id>): <content>`,
    followed by the user's next message if there is one.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

__all__ = ["ToolError", "ToolSpec", "answer_schema", "parse_answer", "render_messages", "tool_spec"]


class ToolError(ValueError):
    """Tools, a tool_choice or a tool message that cannot be used; the message names the field."""


class ToolSpec:
    """The checked tools of one request and what the model may do with them."""

    def __init__(self, functions: list[dict], choice: str | None, parallel: bool = True):
        self.functions = functions  # [{"name", "description", "parameters"}]
        self.choice = choice        # "auto", "required", or a function name (None: no tools offered)
        self.parallel = parallel    # OpenAI's parallel_tool_calls: several calls in one answer

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice is not None


def tool_spec(tools: Any, tool_choice: Any, parallel_tool_calls: Any = None) -> ToolSpec:
    """OpenAI's tools, tool_choice and parallel_tool_calls, checked. tool_choice "none" (or no tools) means answer
    in words."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("'parallel_tool_calls' must be true or false")
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'")
        return ToolSpec([], None)
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of {'type': 'function', 'function': {...}}")
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"'tools[{i}]' must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"'tools[{i}].function.parameters' must be a JSON schema object")
        functions.append({"name": f["name"], "description": str(f.get("description", "")), "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("'tools' has two functions with the same name")
    if tool_choice is None:
        choice = "auto" if functions else None
    elif tool_choice in ("auto", "required"):
        choice = tool_choice
    elif tool_choice == "none":
        choice = None
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        choice = tool_choice["function"].get("name")
        if choice not in names:
            raise ToolError(f"'tool_choice' names {choice!r}, which is not one of the tools ({', '.join(names)})")
    else:
        raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                        "{'name': ...}}")
    return ToolSpec(functions, choice, parallel_tool_calls is not False)


def answer_schema(spec: ToolSpec) -> dict:
    """The JSON schema the answer is constrained to."""
    wanted = [f for f in spec.functions if spec.choice in ("auto", "required") or f["name"] == spec.choice]
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False} for f in wanted]}
    calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
             "required": ["tool_calls"], "additionalProperties": False}
    if not spec.parallel or spec.choice not in ("auto", "required"):
        calls["properties"]["tool_calls"]["maxItems"] = 1
    if spec.choice != "auto":
        return calls
    words = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
             "additionalProperties": False}
    return {"anyOf": [calls, words]}


def _system_text(spec: ToolSpec) -> str:
    lines = ["You can call these tools (JSON schemas of their arguments):"]
    for f in spec.functions:
        lines.append(json.dumps(f, ensure_ascii=False))
    if spec.choice == "auto":
        lines.append('Answer with one JSON object: {"tool_calls": [{"name": ..., "arguments": {...}}]} to call '
                     'tools, or {"response": "..."} to answer the user directly.')
    elif spec.choice == "required":
        lines.append('Answer with one JSON object: {"tool_calls": [{"name": ..., "arguments": {...}}]}.')
    else:
        lines.append(f'Answer with one JSON object that calls {spec.choice}: {{"tool_calls": [{{"name": '
                     f'"{spec.choice}", "arguments": {{...}}}}]}}.')
    return "\n".join(lines)


def render_messages(messages: list[dict], spec: ToolSpec) -> list[dict]:
    """OpenAI messages, tool calls and results included, as the user/assistant turns the Mixtral prompt takes."""
    out: list[dict] = []
    if spec.active:
        system = [m for m in messages if m.get("role") == "system"]
        text = _system_text(spec)
        if system:
            text = f"{_content(system[0])}\n\n{text}"
        out.append({"role": "system", "content": text})
        messages = [m for i, m in enumerate(messages) if not (system and m is system[0])]
    pending: list[str] = []   # tool results waiting for the next user turn
    called: dict[str, str] = {}  # call id -> function name
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "tool":
            if not out or (out[-1].get("role") != "assistant" and not pending):
                raise ToolError(f"messages[{i}]: a 'tool' role message must follow an assistant message with "
                                "tool_calls")
            call_id = m.get("tool_call_id")
            name = called.get(call_id, m.get("name", "a tool"))
            pending.append(f"Result of {name} (call {call_id}): {_content(m)}")
            continue
        if pending:
            text = "\n".join(pending)
            pending = []
            if role == "user":
                out.append({"role": "user", "content": f"{text}\n\n{_content(m)}"})
                continue
            out.append({"role": "user", "content": text})
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                f = c.get("function", {}) if isinstance(c, dict) else {}
                try:
                    args = json.loads(f.get("arguments") or "{}")
                except (TypeError, json.JSONDecodeError):
                    raise ToolError(f"messages[{i}].tool_calls: arguments must be a JSON string") from None
                called[c.get("id")] = f.get("name")
                calls.append({"name": f.get("name"), "arguments": args})
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
            continue
        out.append(m)
    if pending:
        out.append({"role": "user", "content": "\n".join(pending)})
    return out


def _content(m: dict) -> str:
    c = m.get("content")
    if isinstance(c, list):  # OpenAI's content parts: the text ones
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return "" if c is None else str(c)


def parse_answer(text: str, finish_reason: str) -> tuple[str | None, list[dict] | None, str]:
    """(content, tool_calls, finish_reason) of a constrained answer, in OpenAI's shapes. An answer cut short by
    max_tokens is returned as the text it is."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text, None, finish_reason
    if isinstance(obj, dict) and "tool_calls" in obj:
        calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                  "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                 for c in obj["tool_calls"]]
        return None, calls, "tool_calls"
    if isinstance(obj, dict) and isinstance(obj.get("response"), str):
        return obj["response"], None, finish_reason
    return text, None, finish_reason
