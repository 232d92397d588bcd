"""Structured output and tool calling through the TorchServe OpenAI routes, with the `openai`
client as vLLM users call it: `response_format`, `extra_body` `structured_outputs`, `tools` with
`tool_choice` required / named / auto, streaming and not; bad requests are 400s naming the
problem and the server keeps serving. One TorchServe 0.12 on free 127.0.0.1 ports, stopped."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedbackend.adapters.torchserve.launcher import TorchServe, build_archive, load_model_config
from pagedbackend.openai_api import parse_chat
from http_client import wait_for_metrics

openai = pytest.importorskip("openai")

# A Hermes-style template that shows the model its functions (what Qwen's and Hermes' do).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|system|>You may call:{% for t in tools %} {{ t.function.name }}"
    "({{ t.function.parameters | tojson }}){% endfor %}\n{% endif %}"
    "{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}\n{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}")

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("model_store_so")
    cfg = load_model_config()
    cfg["handler"] = {**(cfg.get("handler") or {}), "chat_template": TOOLS_TEMPLATE, "tool_call_parser": "hermes",
                      # compact JSON by default: a random model would otherwise spend its tokens on spaces
                      "structured_outputs_config": {"backend": "auto", "disable_any_whitespace": True}}
    cfg_file = store / "so-config.yaml"
    cfg_file.write_text(json.dumps(cfg))  # JSON is YAML
    build_archive(model_dir("llama"), "tiny", store, cfg_file)
    with TorchServe(store, {"tiny": "tiny.mar"}, tmp_path_factory.mktemp("ts-so"), token_auth=False) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.inference_url}/predictions/tiny/1.0/v1", api_key="unused", max_retries=0)


def _stream_chat(client, **kwargs):
    """A streamed chat answer reassembled: content, tool calls by index, finish reason."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="tiny", stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": "", "deltas": 0})
            if d.id:
                assert call["id"] is None, "a call's id comes once, in its first delta"
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
            call["deltas"] += 1
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_response_format_json_schema_and_json_object_outputs_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=1.0,
                                              seed=seed, response_format=fmt)
        assert done.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(done.choices[0].message.content), PERSON)
    greedy = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0,
                                            response_format=fmt).choices[0].message.content
    streamed, calls, finish = _stream_chat(client, messages=MESSAGES, max_tokens=60, temperature=0, response_format=fmt)
    assert streamed == greedy and not calls and finish == "stop"
    obj = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_extra_body_structured_outputs_on_chat_and_completions(client):
    regex = r"[a-z]{3}-[0-9]{2}"
    done = client.completions.create(model="tiny", prompt="code:", max_tokens=20, temperature=1.0, seed=3,
                                     extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, done.choices[0].text)
    pieces = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="code:", max_tokens=20, temperature=1.0, seed=3, stream=True,
        extra_body={"structured_outputs": {"regex": regex}}))
    assert pieces == done.choices[0].text
    choices = ["north", "south", "east", "west"]
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, n=3, temperature=1.0,
                                          extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.message.content in choices for c in chat.choices)


def test_tool_choice_required_returns_calls_of_the_given_functions_streamed_as_argument_deltas(client):
    for seed in range(3):
        done = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              max_tokens=300, temperature=1.0, seed=seed)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        streamed_content, streamed, finish = _stream_chat(client, messages=MESSAGES, tools=TOOLS,
                                                          tool_choice="required", max_tokens=300, temperature=1.0,
                                                          seed=seed)
        assert finish == "tool_calls" and not streamed_content
        assert [(c["name"], c["arguments"]) for c in streamed] == \
            [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    single = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=1)
    assert len(single.choices[0].message.tool_calls) == 1


def test_a_named_tool_choice_calls_that_function_with_valid_arguments(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                          max_tokens=40, temperature=0)
    (call,) = done.choices[0].message.tool_calls
    assert call.function.name == "get_time" and done.choices[0].finish_reason == "stop"  # forced: OpenAI's "stop"
    jsonschema.validate(json.loads(call.function.arguments), TIME)
    _, streamed, finish = _stream_chat(client, messages=MESSAGES, tools=TOOLS, tool_choice=named, max_tokens=40,
                                       temperature=0)
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_time", call.function.arguments)]
    assert streamed[0]["deltas"] > 1 and finish == "stop"  # the arguments came in pieces


def test_tool_choice_auto_parses_hermes_calls_from_the_text_and_streams_them(client):
    # The random model is steered into writing a Hermes call (a grammar in extra_body); "auto"
    # must find it in the text, as it would in a real model's answer.
    text = r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}</tool_call>'
    kwargs = dict(messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=200, temperature=0,
                  extra_body={"structured_outputs": {"regex": text}})
    done = client.chat.completions.create(model="tiny", **kwargs)
    choice = done.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    content, streamed, finish = _stream_chat(client, **kwargs)
    assert content.strip() == "Sure." and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", call.function.arguments)]
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=8, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].message.tool_calls == []


def test_the_chat_template_receives_the_tools(server, model_dir):
    from pagedbackend.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir("llama")))
    with_tools = parse_chat({"messages": MESSAGES, "tools": TOOLS}, tok, TOOLS_TEMPLATE)
    without = parse_chat({"messages": MESSAGES}, tok, TOOLS_TEMPLATE)
    assert "You may call: get_weather(" in with_tools.prompt_texts[0] and "get_time(" in with_tools.prompt_texts[0]
    assert "You may call" not in without.prompt_texts[0]
    history = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    turn = parse_chat({"messages": history, "tools": TOOLS}, tok, TOOLS_TEMPLATE).prompt_texts[0]
    assert '<tool_call>get_weather {"city": "Paris", "days": 2}</tool_call>' in turn and "<|tool|>sunny" in turn


@pytest.mark.parametrize("kwargs,status_param,message", [
    (dict(extra_body={"guided_json": PERSON}), "guided_json", "guided_json was removed.*structured_outputs"),
    (dict(extra_body={"guided_choice": ["a"]}), "guided_choice", "guided_choice was removed"),
    (dict(extra_body={"guided_decoding_backend": "xgrammar"}), "guided_decoding_backend", "structured_outputs_config"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "unknown field 'frobnicate'"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}),
     "structured_outputs.json", "invalid JSON schema"),
    (dict(extra_body={"structured_outputs": {"regex": "a(b"}}), "structured_outputs.regex", "invalid regex"),
    (dict(extra_body={"structured_outputs": {"grammar": "root ::= x"}}), "structured_outputs.grammar",
     "invalid grammar"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch"}}), "tool_choice",
     "'launch', which is not in tools"),
    (dict(tool_choice="required"), "tool_choice", "tool_choice needs tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": ["get_time"]}}), "tool_choice",
     "which is not in tools"),
    (dict(extra_body={"structured_outputs": {"json": {"type": "integer", "maximum": 10 ** 4100}}}),
     "structured_outputs.json", "invalid JSON schema|not a JSON schema"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
     "cannot be used together"),
    (dict(response_format={"type": "xml"}), "response_format.type", "text, json_object or json_schema"),
])
def test_bad_structured_output_requests_are_400s_naming_the_problem_and_serving_goes_on(client, kwargs, status_param,
                                                                                         message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, **kwargs)
    assert err.value.status_code == 400
    assert re.search(message, str(err.value)), str(err.value)
    assert status_param in str(err.value)
    ok = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                        extra_body={"structured_outputs": {"choice": ["fine"]}})
    assert ok.choices[0].message.content == "fine"


def test_structured_output_metrics_reach_torchserve(server, client):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                   extra_body={"structured_outputs": {"choice": ["metered"]}})
    stats = wait_for_metrics(server.metrics_url, lambda s: s.get("StructuredOutputRequests", 0) >= 1)
    assert stats["GrammarCompiles"] >= 1 and stats["GrammarCompileSeconds_count"] >= 1
    assert "GrammarCacheHits" in stats


def test_streamed_logprobs_of_withheld_tool_call_text_still_arrive(client):
    text = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "UTC"\}\}</tool_call>'
    entries, usage = 0, None
    for chunk in client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0, stream=True, logprobs=True,
            stream_options={"include_usage": True}, extra_body={"structured_outputs": {"regex": text}}):
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].logprobs is not None:
            entries += len(chunk.choices[0].logprobs.content)
    assert usage is not None and entries == usage.completion_tokens


def test_auto_tool_choice_keeps_tool_call_tags_a_tokenizer_holds_as_special_tokens(model_dir):
    from pagedbackend.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir("llama")))
    assert parse_chat({"messages": MESSAGES, "tools": TOOLS}, tok, TOOLS_TEMPLATE).params.skip_special_tokens
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    req = parse_chat({"messages": MESSAGES, "tools": TOOLS}, tok, TOOLS_TEMPLATE)
    assert req.params.skip_special_tokens is False
    forced = parse_chat({"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"}, tok, TOOLS_TEMPLATE)
    assert forced.params.skip_special_tokens  # a forced call is JSON: no tags to keep


def test_tool_choice_none_checks_the_tools_but_neither_shows_nor_parses_them(model_dir):
    from pagedbackend.errors import InvalidRequest
    from pagedbackend.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir("llama")))
    req = parse_chat({"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"}, tok, TOOLS_TEMPLATE)
    assert req.tools is None and req.params.structured_outputs is None
    assert "You may call" not in req.prompt_texts[0]
    with pytest.raises(InvalidRequest, match=r"tools\[0\] must be"):
        parse_chat({"messages": MESSAGES, "tools": [{"type": "retrieval"}], "tool_choice": "none"}, tok, TOOLS_TEMPLATE)
