"""Tool-call parsing of model output (hermes, llama3_json, forced calls), whole and streamed.

The streaming tests feed each output in several chunkings and check the OpenAI contract: a
call's deltas join to exactly the arguments `parse()` returns, the first delta of each call
carries its id and name, and the content streamed is the content `parse()` returns.
"""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from pagedbackend.structured_output.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    NamedToolCallStream,
    RequiredToolCallStream,
    StreamDelta,
    ToolCallStream,
    new_tool_call_id,
    parse_named,
    parse_required,
    parser_for_model_type,
)

HERMES = HermesToolParser()
LLAMA = Llama3JsonToolParser()


def chunkings(text: str) -> list[list[str]]:
    """The text whole, a character at a time, in pairs, and in three seeded random splits."""
    out = [[text], list(text), [text[i:i + 2] for i in range(0, len(text), 2)]]
    for seed in range(3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        out.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    return out


def run_stream(stream: ToolCallStream, chunks: list[str]) -> tuple[str, list[dict], list[StreamDelta]]:
    """Feed the chunks and finish; return the content, the calls as reassembled from their
    deltas (checking the delta shapes on the way), and the deltas."""
    deltas = [stream.feed(chunk) for chunk in chunks] + [stream.finish()]
    calls: list[dict] = []
    for delta in deltas:
        for call_delta in delta.tool_calls:
            if call_delta.index == len(calls):
                assert call_delta.id is not None and call_delta.name is not None
                calls.append({"id": call_delta.id, "name": call_delta.name, "arguments": call_delta.arguments})
            else:
                assert call_delta.index == len(calls) - 1, "deltas go to the latest call"
                assert call_delta.id is None and call_delta.name is None
                calls[-1]["arguments"] += call_delta.arguments
    assert [c["id"] for c in calls] == [c.id for c in stream.tool_calls]
    assert [c["arguments"] for c in calls] == [c.arguments for c in stream.tool_calls]
    return "".join(d.content for d in deltas), calls, deltas


def assert_stream_matches_parse(parser, text: str) -> None:
    content, calls = parser.parse(text)
    for chunks in chunkings(text):
        stream_content, stream_calls, _ = run_stream(parser.streamer(), chunks)
        assert [(c["name"], c["arguments"]) for c in stream_calls] == [(c.name, c.arguments) for c in calls], chunks
        assert stream_content.strip() == (content or ""), chunks


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


# --- hermes, whole output ---------------------------------------------------------------------

HERMES_WELL_FORMED = {
    "single call": call("get_weather", '{"city": "Paris"}'),
    "two calls": call("a", '{"x": 1}') + "\n" + call("b", '{"y": [1, 2]}'),
    "content before and after": "Let me check.\n" + call("f", "{}") + "\nDone.",
    "content between calls": call("a", "{}") + " and then " + call("b", "{}"),
    "whitespace and newlines": '<tool_call>  \n\n {\n  "name" : "f" ,\n  "arguments" :\n {\n "a" : 1 \n }\n}\n\n  </tool_call>',
    "no whitespace": '<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>',
    "unicode and escapes": call("f", r'{"s": "héllo 🌍 \"quoted\" {braces} [x] \\ \u00e9 \n", "t": "</tool_call>"}'),
    "nested arguments": call("f", '{"a": {"b": {"c": [1, {"d": null}], "e": true}}, "n": -1.5e-3}'),
    "arguments before name": '<tool_call>{"arguments": {"q": "x"}, "name": "search"}</tool_call>',
    "extra keys": '<tool_call>{"id": 7, "name": "f", "meta": {"k": [1]}, "arguments": {"a": 1}}</tool_call>',
    "unterminated final block": "Sure. " + '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n',
    "angle brackets that are no tag": "a < b and <tool> and <tool_cal x " + call("f", "{}") + " <tool_",
    "no calls": "Just a plain answer, no tools.",
}


def test_hermes_single_call():
    content, calls = HERMES.parse(HERMES_WELL_FORMED["single call"])
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)


def test_hermes_two_calls_get_distinct_ids():
    content, calls = HERMES.parse(HERMES_WELL_FORMED["two calls"])
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": 1}'), ("b", '{"y": [1, 2]}')]
    assert calls[0].id != calls[1].id


def test_hermes_content_around_calls_is_content():
    assert HERMES.parse(HERMES_WELL_FORMED["content before and after"])[0] == "Let me check.\n\nDone."
    assert HERMES.parse(HERMES_WELL_FORMED["content between calls"])[0] == "and then"


def test_hermes_whitespace_and_newlines_around_the_json():
    content, calls = HERMES.parse(HERMES_WELL_FORMED["whitespace and newlines"])
    assert content is None
    assert calls[0].name == "f" and calls[0].arguments == '{\n "a" : 1 \n }'


def test_hermes_arguments_are_the_raw_json_text():
    text = HERMES_WELL_FORMED["unicode and escapes"]
    [parsed] = HERMES.parse(text)[1]
    assert parsed.arguments == r'{"s": "héllo 🌍 \"quoted\" {braces} [x] \\ \u00e9 \n", "t": "</tool_call>"}'
    assert json.loads(parsed.arguments) == {"s": 'héllo 🌍 "quoted" {braces} [x] \\ é \n', "t": "</tool_call>"}


def test_hermes_nested_arguments():
    [parsed] = HERMES.parse(HERMES_WELL_FORMED["nested arguments"])[1]
    assert json.loads(parsed.arguments) == {"a": {"b": {"c": [1, {"d": None}], "e": True}}, "n": -1.5e-3}


def test_hermes_arguments_may_precede_name_and_extra_keys_are_ignored():
    assert [(c.name, c.arguments) for c in HERMES.parse(HERMES_WELL_FORMED["arguments before name"])[1]] == [
        ("search", '{"q": "x"}')]
    assert [(c.name, c.arguments) for c in HERMES.parse(HERMES_WELL_FORMED["extra keys"])[1]] == [("f", '{"a": 1}')]


def test_hermes_unterminated_final_block_that_is_valid_is_a_call():
    content, calls = HERMES.parse(HERMES_WELL_FORMED["unterminated final block"])
    assert content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]


def test_hermes_text_without_calls_is_content():
    assert HERMES.parse("Just a plain answer.") == ("Just a plain answer.", [])
    assert HERMES.parse("   ") == (None, [])


HERMES_MALFORMED = {
    "not json": "<tool_call>get_weather(city='Paris')</tool_call>",
    "missing name": '<tool_call>{"arguments": {"a": 1}}</tool_call>',
    "name not a string": '<tool_call>{"name": 5, "arguments": {}}</tool_call>',
    "arguments a string": '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
    "missing arguments": '<tool_call>{"name": "f"}</tool_call>',
    "unclosed brace": '<tool_call>{"name": "f", "arguments" </tool_call>',
    "empty block": "<tool_call></tool_call>",
    "unterminated and incomplete": 'Wait: <tool_call>{"name": "f", "argu',
    "duplicate name": '<tool_call>{"name": "f", "name": "g", "arguments": {}}</tool_call>',
    "raw newline in a string": '<tool_call>{"name": "f\n", "arguments": {}}</tool_call>',
    "unterminated without a close tag": '<tool_call>{"name": "f", "arguments": 1',
}


@pytest.mark.parametrize("case", sorted(HERMES_MALFORMED))
def test_hermes_malformed_call_stays_text(case):
    text = HERMES_MALFORMED[case]
    assert HERMES.parse(text) == (text.strip(), [])


def test_hermes_malformed_block_stays_text_and_other_blocks_still_parse():
    bad = '<tool_call>{"name": "f", "arguments": "x"}</tool_call>'
    content, calls = HERMES.parse("A " + bad + " B " + call("g", '{"k": 2}'))
    assert content == "A " + bad + " B"
    assert [(c.name, c.arguments) for c in calls] == [("g", '{"k": 2}')]


def test_hermes_valid_json_followed_by_junk_in_the_block_stays_text():
    text = '<tool_call>{"name": "f", "arguments": {}} oops</tool_call> tail'
    assert HERMES.parse(text) == (text, [])


def test_hermes_long_output_parses_in_linear_time():
    arguments = json.dumps({"items": [{"k": i, "v": "x" * 50 + '\\"{}'} for i in range(400)]})
    text = "intro " + call("bulk", arguments) * 3
    assert len(text) > 90_000
    start = time.perf_counter()
    content, calls = HERMES.parse(text)
    assert [c.arguments for c in calls] == [arguments] * 3 and content == "intro"
    assert time.perf_counter() - start < 2.0


# --- llama3_json, whole output ----------------------------------------------------------------

LLAMA_WELL_FORMED = {
    "one call": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "python tag": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "leading whitespace": '\n  {"name": "f", "parameters": {}}',
    "two calls": '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "z;"}}',
    "trailing semicolon": '{"name": "a", "parameters": {}};',
    "arguments synonym": '{"name": "f", "arguments": {"a": [1, 2]}}',
    "python tag and spaces": '<|python_tag|> {"name": "f", "parameters": {"s": "\\u00e9"}} ;\n{"name": "g", "parameters": {}}',
    "plain text": "The weather in Paris is sunny.",
    "text mentioning the tag": "Use <|python_ something",
}


def test_llama3_json_one_call():
    content, calls = LLAMA.parse(LLAMA_WELL_FORMED["one call"])
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]


def test_llama3_json_python_tag_prefix():
    content, calls = LLAMA.parse(LLAMA_WELL_FORMED["python tag"])
    assert content is None and [c.name for c in calls] == ["get_weather"]


def test_llama3_json_two_calls_separated_by_semicolon():
    content, calls = LLAMA.parse(LLAMA_WELL_FORMED["two calls"])
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": 1}'), ("b", '{"y": "z;"}')]


def test_llama3_json_arguments_is_a_synonym_of_parameters():
    [parsed] = LLAMA.parse(LLAMA_WELL_FORMED["arguments synonym"])[1]
    assert (parsed.name, parsed.arguments) == ("f", '{"a": [1, 2]}')


def test_llama3_json_plain_text_stays_text():
    assert LLAMA.parse("The weather in Paris is sunny.") == ("The weather in Paris is sunny.", [])


LLAMA_MALFORMED = {
    "not json": "{name: f}",
    "unclosed": '{"name": "f", "parameters": {"a": 1}',
    "trailing text": '{"name": "f", "parameters": {}} and more',
    "missing name": '{"parameters": {}}',
    "parameters not an object": '{"name": "f", "parameters": [1]}',
    "both parameters and arguments": '{"name": "f", "parameters": {}, "arguments": {}}',
    "bad second call": '{"name": "f", "parameters": {}}; {"name": 1}',
    "comma separated": '{"name": "f", "parameters": {}}, {"name": "g", "parameters": {}}',
    "python tag then code": '<|python_tag|>brave_search.call(query="x")',
    "bad number": '{"name": "f", "parameters": {"a": 01}}',
    "bad literal": '{"name": "f", "parameters": {"a": tru}}',
}


@pytest.mark.parametrize("case", sorted(LLAMA_MALFORMED))
def test_llama3_json_malformed_output_is_all_text(case):
    text = LLAMA_MALFORMED[case]
    assert LLAMA.parse(text) == (text, [])


# --- forced calls ----------------------------------------------------------------------------

REQUIRED_WELL_FORMED = [
    '[{"name": "a", "parameters": {"x": 1}}]',
    ' [ {"name": "a", "parameters": {"x": "]"}} ,\n {"name": "b", "arguments": {}} ] ',
    "[]",
]


def test_required_array_parses_into_calls():
    calls = parse_required(REQUIRED_WELL_FORMED[1])
    assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": "]"}'), ("b", "{}")]
    assert parse_required("[]") == []


@pytest.mark.parametrize("text", ['{"name": "a", "parameters": {}}', '[{"name": "a", "parameters": {}}',
                                  '[{"name": "a", "parameters": {}},]', '[{"name": "a"}]', "not json"])
def test_required_malformed_array_gives_no_calls(text):
    assert parse_required(text) == []


@pytest.mark.parametrize("text", REQUIRED_WELL_FORMED)
def test_required_stream_matches_parse_required(text):
    expected = [(c.name, c.arguments) for c in parse_required(text)]
    for chunks in chunkings(text):
        content, calls, _ = run_stream(RequiredToolCallStream(), chunks)
        assert [(c["name"], c["arguments"]) for c in calls] == expected
        assert content == ""


def test_required_stream_releases_a_malformed_array_as_content():
    text = '[{"name": "a", "parameters": "x"}]'
    for chunks in chunkings(text):
        content, calls, _ = run_stream(RequiredToolCallStream(), chunks)
        assert calls == [] and content == text


def test_named_output_is_the_arguments_object():
    [parsed] = parse_named('  {"city": "Paris", "days": [1, 2]}\n', "get_weather")
    assert (parsed.name, parsed.arguments) == ("get_weather", '{"city": "Paris", "days": [1, 2]}')
    assert parse_named("[1, 2]", "f") == [] and parse_named("{oops", "f") == []


@pytest.mark.parametrize("text", ['{"city": "Paris", "days": [1, 2]}', '\n {"a": "b c"}  \n\n', "{}"])
def test_named_stream_sends_the_header_first_then_argument_pieces(text):
    [expected] = parse_named(text, "get_weather")
    for chunks in chunkings(text):
        content, calls, deltas = run_stream(NamedToolCallStream("get_weather"), chunks)
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", expected.arguments)]
        assert deltas[0].tool_calls[0].id is not None and content == ""


# --- streaming --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(HERMES_WELL_FORMED))
def test_hermes_stream_matches_parse(case):
    assert_stream_matches_parse(HERMES, HERMES_WELL_FORMED[case])


@pytest.mark.parametrize("case", sorted(LLAMA_WELL_FORMED))
def test_llama3_json_stream_matches_parse(case):
    assert_stream_matches_parse(LLAMA, LLAMA_WELL_FORMED[case])


def long_call_arguments() -> str:
    return json.dumps({"text": "word " * 200, "list": list(range(50)), "nested": {"k": "v" * 30}})


@pytest.mark.parametrize("parser, text", [
    (HERMES, call("write", long_call_arguments())),
    (LLAMA, '{"name": "write", "parameters": ' + long_call_arguments() + "}"),
], ids=["hermes", "llama3_json"])
def test_stream_sends_arguments_incrementally(parser, text):
    stream = parser.streamer()
    pieces = [d.arguments for chunk in text for d in stream.feed(chunk).tool_calls]
    assert len(pieces) > 100
    assert "".join(pieces) == long_call_arguments()
    # The header goes out with the arguments' first character, long before the call ends.
    assert pieces[0] == "{"


def test_stream_withholds_only_what_may_become_a_tag():
    stream = HERMES.streamer()
    assert stream.feed("Hello <tool").content == "Hello "
    assert stream.feed("box> there").content == "<toolbox> there"
    assert stream.feed(" <tool_c").content == " "
    assert stream.finish().content == "<tool_c"


def test_llama3_json_stream_streams_plain_text_at_once():
    stream = LLAMA.streamer()
    assert stream.feed("  ").content == ""
    assert stream.feed("Hello").content == "  Hello"
    assert stream.feed(" {not a call}").content == " {not a call}"


def test_stream_merges_header_and_arguments_of_one_chunk_into_one_delta():
    delta = HERMES.streamer().feed(call("f", '{"a": 1}'))
    assert len(delta.tool_calls) == 1
    assert (delta.tool_calls[0].name, delta.tool_calls[0].arguments) == ("f", '{"a": 1}')


def test_stream_withholds_header_until_name_when_arguments_come_first():
    stream = HERMES.streamer()
    assert stream.feed('<tool_call>{"arguments": {"q": "x"}, ').tool_calls == []
    [delta] = stream.feed('"name": "search"}').tool_calls
    assert (delta.index, delta.name, delta.arguments) == (0, "search", '{"q": "x"}')


def test_stream_of_long_output_char_by_char_is_fast():
    arguments = json.dumps({"rows": [{"i": i, "s": "abc" * 10} for i in range(150)]})
    text = "ok " + call("bulk", arguments) * 2
    start = time.perf_counter()
    _, calls, _ = run_stream(HERMES.streamer(), list(text))
    assert [c["arguments"] for c in calls] == [arguments] * 2
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("case", sorted(set(HERMES_MALFORMED) - {"unterminated without a close tag"}))
def test_hermes_stream_releases_malformed_blocks_as_content(case):
    text = HERMES_MALFORMED[case]
    for chunks in chunkings(text):
        content, calls, _ = run_stream(HERMES.streamer(), chunks)
        assert calls == [] and content == text, chunks


# Malformed before a call's name and arguments start, so before any header could go out.
LLAMA_BREAKING_BEFORE_HEADER = ["not json", "missing name", "parameters not an object", "python tag then code"]


@pytest.mark.parametrize("case", LLAMA_BREAKING_BEFORE_HEADER)
def test_llama3_json_stream_releases_malformed_output_as_content(case):
    text = LLAMA_MALFORMED[case]
    for chunks in chunkings(text):
        content, calls, _ = run_stream(LLAMA.streamer(), chunks)
        assert calls == [] and content == text, chunks


@pytest.mark.parametrize("case", sorted(set(LLAMA_MALFORMED) - set(LLAMA_BREAKING_BEFORE_HEADER)))
def test_llama3_json_stream_breaking_after_a_header_keeps_the_call_and_loses_no_text(case):
    text = LLAMA_MALFORMED[case]
    content, calls, _ = run_stream(LLAMA.streamer(), list(text))
    assert [c["name"] for c in calls] == ["f"]
    assert calls[0]["arguments"] in text and text.endswith(content)


def test_hermes_stream_keeps_a_call_that_breaks_after_its_header_and_releases_the_rest():
    # Sent pieces cannot be taken back: the call stays with what was sent; the rest is content.
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call> after'
    content, calls, _ = run_stream(HERMES.streamer(), list(text))
    assert [(c["name"], c["arguments"]) for c in calls] == [("f", '{"a": 1}')]
    assert content == "</tool_call> after"
    assert HERMES.parse(text) == (text, [])  # whole, the same text is all content


def test_stream_breaking_mid_chunk_after_the_header_keeps_the_arguments_read_before_the_break():
    stream = HERMES.streamer()
    [header] = stream.feed('<tool_call>{"name": "f", "arguments": {').tool_calls
    delta = stream.feed('"a": 1, "b": x}}</tool_call> end')
    assert header.arguments + delta.tool_calls[0].arguments == '{"a": 1, "b": '
    assert delta.content == "x}}</tool_call> end" and stream.feed(" more").content == " more"
    assert [c.arguments for c in stream.tool_calls] == ['{"a": 1, "b": ']


def test_llama3_json_stream_keeps_sent_calls_when_a_later_one_is_malformed():
    text = LLAMA_MALFORMED["bad second call"]
    content, calls, _ = run_stream(LLAMA.streamer(), list(text))
    assert [(c["name"], c["arguments"]) for c in calls] == [("f", "{}")]
    assert content == '; {"name": 1}'


def test_stream_ids_are_new_for_every_call_and_every_stream():
    text = HERMES_WELL_FORMED["two calls"]
    first, second = HERMES.streamer(), HERMES.streamer()
    run_stream(first, [text])
    run_stream(second, [text])
    ids = [c.id for c in first.tool_calls + second.tool_calls]
    assert len(set(ids)) == 4
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids + [new_tool_call_id()])


# --- registry ---------------------------------------------------------------------------------

def test_registry_uses_vllm_parser_names():
    assert TOOL_PARSERS == {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


@pytest.mark.parametrize("model_type, parser", [
    ("llama", "llama3_json"), ("qwen2", "hermes"), ("qwen3", "hermes"), ("mistral", "hermes"), ("gpt2", "hermes"),
])
def test_parser_for_model_type(model_type, parser):
    assert parser_for_model_type(model_type) == parser
    assert parser in TOOL_PARSERS
