"""Structured output in the engine: with random weights only the grammar's mask can make an
output valid, so every constrained output of a mixed batch is checked by an independent judge
(`jsonschema`, `re.fullmatch`, membership, a lark parser); greedy constrained decoding equals
transformers' `generate()` under the same grammar (xgrammar's logits processor) token for
token, with chunked prefill, prefix-cache hits and forced preemption in the same run; and
unconstrained neighbours are exactly what they are alone."""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import lark
import pytest
import torch

from helpers import hf_greedy, hf_log_softmax, hf_model, random_prompts
from pagedbackend import SamplingParams
from pagedbackend.errors import InvalidRequest
from pagedbackend.structured_output import StructuredOutputsParams
from pagedbackend.structured_output.params import REMOVED_FIELDS


def _s(**p):
    return {"type": "string", **p}


def _i(**p):
    return {"type": "integer", **p}


def _obj(props, required=None, **extra):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


# Bounded, so a random model ends them within max_tokens. (xgrammar ignores maxLength next to a
# pattern or a format: patterns carry their own bounds here.)
SCHEMAS = {
    "flat_object": _obj({"name": _s(maxLength=8), "age": _i(minimum=0, maximum=120)}),
    "nested_object": _obj({"user": _obj({"id": _i(minimum=1, maximum=999), "email": _s(maxLength=10)}),
                           "active": {"type": "boolean"}}),
    "array_min_max_items": _obj({"scores": {"type": "array", "items": _i(minimum=0, maximum=9), "minItems": 2,
                                            "maxItems": 4}}),
    "enums": _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}}),
    "number_bounds": _obj({"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                           "y": {"type": "number", "minimum": 0, "maximum": 10}}),
    "string_patterns": _obj({"code": _s(pattern="^[A-Z]{2}-[0-9]{3}$"), "tag": _s(pattern="^[a-z]{1,6}$")}),
    "format_uuid": _obj({"id": _s(format="uuid")}),
    "any_of": _obj({"value": {"anyOf": [_s(maxLength=5), _i(minimum=0, maximum=50), {"type": "null"}]}}),
    "optional_properties": _obj({"a": _i(minimum=0, maximum=9), "b": _s(maxLength=4), "c": {"type": "boolean"}},
                                required=["a"]),
    "bool_null_const": _obj({"ok": {"type": "boolean"}, "none": {"type": "null"}, "version": {"const": "v1"}}),
    "array_of_objects": _obj({"items": {"type": "array", "minItems": 1, "maxItems": 3,
                                        "items": _obj({"sku": _s(maxLength=5), "qty": _i(minimum=1, maximum=9)})}}),
    "tuple_prefix_items": _obj({"point": {"type": "array", "prefixItems": [_i(minimum=0, maximum=99),
                                                                           _i(minimum=0, maximum=99)],
                                          "items": False}}),
    "nested_arrays": _obj({"grid": {"type": "array", "minItems": 1, "maxItems": 2,
                                    "items": {"type": "array", "items": _i(minimum=0, maximum=9), "minItems": 1,
                                              "maxItems": 3}}}),
    "defs_and_refs": {"$defs": {"pt": _obj({"x": _i(minimum=0, maximum=9), "y": _i(minimum=0, maximum=9)})},
                      **_obj({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}})},
    "string_min_max_length": _obj({"word": _s(minLength=3, maxLength=6)}),
    "exclusive_bounds": _obj({"n": _i(exclusiveMinimum=0, exclusiveMaximum=5)}),
    "enum_of_mixed_types": _obj({"v": {"enum": [1, "two", None, True, 3.5]}}),
    "nullable_type_list": _obj({"note": {"type": ["string", "null"], "maxLength": 5}}),
    "one_of": _obj({"shape": {"oneOf": [_obj({"kind": {"const": "circle"}, "r": _i(minimum=1, maximum=9)}),
                                        _obj({"kind": {"const": "square"}, "side": _i(minimum=1, maximum=9)})]}}),
    "top_level_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 5},
    "deep_nesting": _obj({"a": _obj({"b": _obj({"c": _obj({"d": _i(minimum=0, maximum=3)})})})}),
    "unicode_enum": _obj({"city": {"enum": ["Zürich", "São Paulo", "東京"]}}),
}
REGEXES = [r"[a-c]{3}-\d{2}", r"(yes|no)!", r"\d{1,3}(\.\d{1,2})?", r"[A-Z][a-z]{2,5} [A-Z][a-z]{2,5}",
           r"0x[0-9a-f]{4}"]
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= num | "(" expr ")"
num ::= [1-9] [0-9]{0,2}
"""
# The same language for lark (the reference parser).
ARITHMETIC_LARK = lark.Lark(r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUM | "(" expr ")"
NUM: /[1-9][0-9]{0,2}/
""", parser="lalr")

FORMATS = jsonschema.FormatChecker()


def _json(schema, compact=True):
    return StructuredOutputsParams(json=schema, disable_any_whitespace=compact)


def _texts(outs):
    return [c.text for o in outs for c in o.outputs]


def _check_json(text: str, schema: dict) -> None:
    value = json.loads(text)  # strict: raw control characters in strings are not JSON
    jsonschema.validate(value, schema, format_checker=FORMATS)


# ------------------------------------------------------------------- every output valid
def test_every_output_of_a_mixed_batch_validates_against_its_json_schema(model_dir, make_engine):
    assert len(SCHEMAS) >= 20
    llm = make_engine(model_dir("llama"), "llm", max_model_len=512)
    prompts, params, judges = [], [], []
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        for temperature in (0.0, 1.0):
            prompts.append(f"record {i}: {name}")
            params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=300,
                                         structured_outputs=_json(schema)))
            judges.append((name, schema))
        prompts.append(f"free text {i}")  # unconstrained neighbours in the same steps
        params.append(plain)
        judges.append(None)
    outs = llm.generate(prompts, params, use_tqdm=False)
    alone = llm.generate([p for p, j in zip(prompts, judges) if j is None], plain, use_tqdm=False)
    free = iter(_texts(alone))
    for out, judge in zip(outs, judges):
        c = out.outputs[0]
        if judge is None:
            assert c.text == next(free)  # the mask changed nothing for its neighbours
            continue
        name, schema = judge
        assert c.finish_reason == "stop", (name, c.text)
        _check_json(c.text, schema)


def test_json_with_any_whitespace_and_json_object_outputs_parse(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm", max_model_len=1024)
    schema = SCHEMAS["enums"]
    spaced = [SamplingParams(temperature=1.0, seed=s, max_tokens=900, structured_outputs=_json(schema, compact=False))
              for s in range(3)]
    # Any object: a random model's keys are unbounded strings, so greedy (which closes it) here.
    objects = [SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=StructuredOutputsParams(
        json_object=True, disable_any_whitespace=compact)) for compact in (True, False)]
    outs = llm.generate([f"p{i}" for i in range(5)], spaced + objects, use_tqdm=False)
    stopped = 0
    for out in outs[:3]:
        c = out.outputs[0]
        if c.finish_reason == "stop":  # any-whitespace JSON may spend every token on spaces
            jsonschema.validate(json.loads(c.text), schema)
            stopped += 1
    assert stopped
    for out in outs[3:]:
        assert out.outputs[0].finish_reason == "stop"
        assert isinstance(json.loads(out.outputs[0].text), dict)


def test_regex_outputs_fullmatch_choice_outputs_are_members_and_grammar_outputs_parse(model_dir, make_engine):
    llm = make_engine(model_dir("qwen2"), "llm", max_model_len=512)
    choices = ["positive", "negative", "neutral", "ça va"]
    params, kinds = [], []
    for seed in range(3):
        for r in REGEXES:
            params.append(SamplingParams(temperature=1.0, seed=seed, max_tokens=40,
                                         structured_outputs=StructuredOutputsParams(regex=r)))
            kinds.append(("regex", r))
        params.append(SamplingParams(temperature=1.0, seed=seed, n=3, max_tokens=10,
                                     structured_outputs=StructuredOutputsParams(choice=choices)))
        kinds.append(("choice", None))
        params.append(SamplingParams(temperature=0.9, seed=seed, max_tokens=80,
                                     structured_outputs=StructuredOutputsParams(grammar=ARITHMETIC)))
        kinds.append(("grammar", None))
    outs = llm.generate([f"input {i}" for i in range(len(params))], params, use_tqdm=False)
    for out, (kind, regex) in zip(outs, kinds):
        for c in out.outputs:
            assert c.finish_reason == "stop", (kind, c.text)
            if kind == "regex":
                assert re.fullmatch(regex, c.text), (regex, c.text)
            elif kind == "choice":
                assert c.text in choices
            else:
                ARITHMETIC_LARK.parse(c.text)  # raises on anything outside the language
    assert len({c.text for o, (k, _) in zip(outs, kinds) if k == "choice" for c in o.outputs}) > 1


def test_max_tokens_still_cuts_a_constrained_output_with_finish_reason_length(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    params = SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=_json(SCHEMAS["deep_nesting"]))
    c = llm.generate(["cut"], params, use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 4
    assert '{"a": {"b": {"c": {"d": 2}}}}'.startswith(c.text[:2])


def test_the_grammars_end_allows_only_eos(model_dir, make_engine):
    """A choice's output ends with the model's EOS as soon as the choice is complete (the
    stop token is what the grammar allows at its end), so it stops with reason "stop"."""
    engine = make_engine(model_dir("llama"))
    params = SamplingParams(temperature=0.0, max_tokens=30, skip_special_tokens=False,
                            structured_outputs=StructuredOutputsParams(choice=["done"]))
    engine.add_request("0", "end", params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    c = final.outputs[0]
    eos = engine.tokenizer.eos_token_id
    assert c.finish_reason == "stop" and c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
    assert engine.tokenizer.decode(c.token_ids[:-1]) == "done"


# --------------------------------------------------------------------- the oracle
def _hf_constrained(path, engine, prompt, params, max_new):
    import xgrammar as xgr

    grammar = engine.grammar_compiler.compile(params)  # the engine's grammar: same vocabulary, same EOS
    return _hf_greedy_with(path, prompt, max_new, xgr.contrib.hf.LogitsProcessor(grammar))


def _hf_greedy_with(path, prompt, max_new, processor):
    """transformers' greedy generate() with a logits processor (not cached: it is stateful)."""
    from transformers import LogitsProcessorList

    model = hf_model(path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=model.config.pad_token_id or 0,
                             logits_processor=LogitsProcessorList([processor]))
    return out[0, len(prompt):].tolist()


def _oracle_prompts(seed: int) -> list[list[int]]:
    base = random_prompts([3, 17, 40, 9, 30, 21], 1024, seed=seed)
    shared = random_prompts([32], 1024, seed=seed + 1)[0]
    return base[:3] + [shared + p for p in base[3:]]


ORACLE_CONSTRAINTS = [
    StructuredOutputsParams(json=SCHEMAS["array_of_objects"], disable_any_whitespace=True),
    None,
    StructuredOutputsParams(regex=r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"),
    StructuredOutputsParams(json=SCHEMAS["one_of"], disable_any_whitespace=True),
    StructuredOutputsParams(grammar=ARITHMETIC),
    None,
]


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_constrained_decoding_equals_transformers_under_the_same_grammar(name, preemption_mode, model_dir,
                                                                             make_engine):
    path = model_dir(name)
    # 12 blocks of 16 for 6 sequences of up to ~110 tokens: preemption is forced.
    llm = make_engine(path, "llm", num_kv_blocks=12, max_num_batched_tokens=32, max_num_seqs=6, max_model_len=192,
                      preemption_mode=preemption_mode)
    engine = llm.llm_engine
    prompts = _oracle_prompts(seed=5)
    max_new = 60
    params = [SamplingParams(temperature=0.0, max_tokens=max_new, structured_outputs=c) for c in ORACLE_CONSTRAINTS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt, c in zip(outs, prompts, ORACLE_CONSTRAINTS):
        expected = hf_greedy(path, prompt, max_new) if c is None else _hf_constrained(path, engine, prompt, c, max_new)
        assert out.outputs[0].token_ids == expected
    stats = engine.get_stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_chunked_prefill_steps"] > 0
    assert stats["prefix_cache_hits"] > 0


def test_speculation_with_proposals_checked_against_the_grammar_changes_no_greedy_token(model_dir, make_engine):
    path = model_dir("llama")
    prompts = _oracle_prompts(seed=9)
    params = [SamplingParams(temperature=0.0, max_tokens=50, structured_outputs=c) for c in ORACLE_CONSTRAINTS]
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    plain = make_engine(path, "llm", max_model_len=256)
    spec = make_engine(path, "llm", max_model_len=192, speculative_config=ngram, num_kv_blocks=12,
                       max_num_batched_tokens=48, max_num_seqs=6)
    expected = plain.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = spec.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    stats = spec.llm_engine.get_stats()
    assert stats["spec_decode_num_draft_tokens"] > 0 and stats["spec_decode_num_accepted_tokens"] > 0


def test_proposals_the_grammar_forbids_are_cut_and_the_matcher_is_rolled_back(model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    tok = engine.tokenizer
    engine.add_request("0", "x", SamplingParams(max_tokens=20, structured_outputs=StructuredOutputsParams(
        choice=["abcabc"])))
    seq = engine.scheduler.requests["0"][0]
    grammars = engine.core.structured_output
    ids = tok.encode("abcabc", add_special_tokens=False)
    wrong = tok.encode("zz", add_special_tokens=False)
    assert grammars.validate_drafts(seq.seq_id, ids[:1] + wrong + ids[1:]) == ids[:1]
    assert grammars.validate_drafts(seq.seq_id, ids) == ids  # the state did not move
    assert grammars.validate_drafts(seq.seq_id, wrong) == []
    engine.abort_request("0")


@pytest.mark.slow
def test_tensor_parallel_ranks_sample_under_the_same_masks(model_dir, make_engine):
    path = model_dir("llama")
    prompts = _oracle_prompts(seed=3)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=40, structured_outputs=c)
              for i, (t, c) in enumerate(zip([0.0, 0.0, 1.0, 0.8, 0.0, 1.0], ORACLE_CONSTRAINTS))]
    results = []
    for tp in (1, 2):
        llm = make_engine(path, "llm", tensor_parallel_size=tp, max_model_len=256)
        results.append([o.outputs[0].token_ids for o in
                        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)])
    assert results[0] == results[1]


# ------------------------------------------------------- requests' other features
def test_n_samples_and_seeds_each_follow_their_own_grammar_path(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm", max_model_len=512)
    c = _json(SCHEMAS["array_min_max_items"])
    batch = llm.generate(["a", "b"], [SamplingParams(temperature=1.0, n=4, max_tokens=60, structured_outputs=c),
                                      SamplingParams(temperature=1.0, seed=11, max_tokens=60, structured_outputs=c)],
                         use_tqdm=False)
    for text in _texts(batch):
        _check_json(text, SCHEMAS["array_min_max_items"])
    assert len(set(_texts(batch[:1]))) > 1
    alone = llm.generate(["b"], SamplingParams(temperature=1.0, seed=11, max_tokens=60, structured_outputs=c),
                         use_tqdm=False)
    assert _texts(alone) == _texts(batch[1:])


def test_logprobs_of_a_constrained_output_are_the_models_raw_logprobs(model_dir, make_engine):
    path = model_dir("llama")
    llm = make_engine(path, "llm")
    prompt = random_prompts([7], 1024, seed=2)[0]
    c = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        temperature=0.0, max_tokens=30, logprobs=2, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}")),
        use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    reference = hf_log_softmax(path, prompt + c.token_ids)
    for i, (token, pos) in enumerate(zip(c.token_ids, c.logprobs)):
        assert pos[token].logprob == pytest.approx(reference[len(prompt) - 1 + i, token].item(), abs=1e-4)


def test_a_stop_string_inside_a_constrained_output_ends_it_there(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    c = llm.generate(["s"], SamplingParams(temperature=0.0, max_tokens=30, stop=["-"], structured_outputs=(
        StructuredOutputsParams(regex=r"abc-[0-9]{2}"))), use_tqdm=False)[0].outputs[0]
    assert c.text == "abc" and c.finish_reason == "stop" and c.stop_reason == "-"


def test_aborted_and_finished_constrained_requests_leave_no_matcher_and_no_block(model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    c = _json(SCHEMAS["nested_arrays"])
    for i in range(4):
        engine.add_request(str(i), f"p{i}", SamplingParams(temperature=1.0, n=2, max_tokens=40, structured_outputs=c))
    for _ in range(3):
        engine.step()
    assert len(engine.core.structured_output) == 8
    engine.abort_request("1")
    assert len(engine.core.structured_output) == 6
    while engine.has_unfinished_requests():
        engine.step()
    assert len(engine.core.structured_output) == 0  # (make_engine also checks blocks and matchers)


def test_a_step_without_constrained_rows_carries_no_bitmask(model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    seen = []
    execute = engine.executor.execute
    engine.executor.execute = lambda out: (seen.append(out.grammar), execute(out))[1]
    engine.add_request("0", "free", SamplingParams(max_tokens=3))
    engine.add_request("1", "json", SamplingParams(max_tokens=3, structured_outputs=_json(SCHEMAS["enums"])))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("2", "free again", SamplingParams(max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()
    assert seen[:3] and all(g is not None and list(g.rows) and g.bitmask.shape[0] == 1 for g in seen[:3])
    assert seen[-1] is None


# ------------------------------------------------------------- compiling, caching
def test_a_repeated_schema_compiles_once_as_a_dict_or_as_its_json_text(model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    compiler = engine.grammar_compiler
    schema = SCHEMAS["flat_object"]
    first = compiler.compile(_json(schema))
    before = compiler.stats.num_compiles
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(schema), disable_any_whitespace=True)) is first
    assert compiler.stats.num_compiles == before and compiler.stats.num_cache_hits == 1
    assert compiler.compile(_json(schema, compact=False)) is not first  # whitespace is part of the key


def test_property_order_is_part_of_the_grammar(model_dir, make_engine):
    """The grammar writes properties in the schema's order ("reasoning" before "answer" is a
    prompting technique): two orders are two grammars, never one cached for both."""
    llm = make_engine(model_dir("llama"), "llm")
    props = {"answer": {"enum": ["a", "b"]}, "reasoning": {"enum": ["x", "y"]}}
    forward, backward = (_json({"type": "object", "properties": dict(order), "required": [k for k, _ in order],
                                "additionalProperties": False}) for order in (list(props.items()),
                                                                              list(props.items())[::-1]))
    outs = llm.generate(["q", "q"], [SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=c)
                                     for c in (forward, backward)], use_tqdm=False)
    assert outs[0].outputs[0].text.startswith('{"answer"') and outs[1].outputs[0].text.startswith('{"reasoning"')


def test_threads_asking_for_the_same_grammar_at_once_compile_it_once(model_dir, make_engine, monkeypatch):
    engine = make_engine(model_dir("llama"))
    compiler = engine.grammar_compiler
    real = compiler._compile
    calls = []

    def slow(params):
        calls.append(params.key)
        time.sleep(0.3)
        return real(params)

    monkeypatch.setattr(compiler, "_compile", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(compiler.compile(_json(SCHEMAS["enums"]))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and all(r is results[0] for r in results)


def test_a_request_whose_grammar_compiles_waits_alone_while_others_stream(model_dir, monkeypatch):
    from pagedbackend import AsyncLLMEngine, EngineArgs

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama")), seed=0), progress=False)
    try:
        compiler = engine.engine.grammar_compiler
        real = compiler._compile
        compiling = threading.Event()
        release = threading.Event()

        def slow(params):
            compiling.set()
            assert release.wait(30)
            return real(params)

        monkeypatch.setattr(compiler, "_compile", slow)
        done = []
        slow_thread = threading.Thread(target=lambda: done.append(list(engine.submit(
            "slow", SamplingParams(max_tokens=5, structured_outputs=_json(SCHEMAS["enums"]))))))
        slow_thread.start()
        assert compiling.wait(30)
        free = list(engine.submit("free", SamplingParams(max_tokens=8)))  # served while the grammar compiles
        assert free[-1].finished and not done
        release.set()
        slow_thread.join(30)
        assert done and done[0][-1].finished
        engine.engine.check_all_blocks_free()
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("constraint,field,message", [
    (dict(json={"type": "objekt"}), "structured_outputs.json", 'invalid JSON schema: Unsupported type "objekt"'),
    (dict(json='{"type": "object"'), "structured_outputs.json", "is not valid JSON"),
    (dict(regex="a(b"), "structured_outputs.regex", "invalid regex: .*parenthesis is not closed"),
    (dict(grammar='root ::= "a" | b'), "structured_outputs.grammar", 'invalid grammar: .*Rule "b" is not defined'),
    (dict(choice=[]), "structured_outputs.choice", "non-empty list"),
    (dict(json={"type": "object"}, regex="a"), "structured_outputs", "exactly one of"),
    (dict(), "structured_outputs", "exactly one of"),
])
def test_an_invalid_constraint_is_an_error_naming_it_and_the_engine_keeps_serving(constraint, field, message,
                                                                                 model_dir, make_engine):
    engine = make_engine(model_dir("llama"))
    with pytest.raises(InvalidRequest, match=message) as e:
        engine.add_request("bad", "x", SamplingParams(structured_outputs=StructuredOutputsParams.from_dict(constraint)))
    assert e.value.param == field
    engine.add_request("good", "x", SamplingParams(max_tokens=3, structured_outputs=StructuredOutputsParams(
        choice=["ok"])))
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[0].outputs[0].text == "ok"


def test_a_schema_that_cannot_be_written_as_json_is_refused_by_name():
    from pagedbackend.protocol import parse_json

    huge = parse_json('{"type": "integer", "maximum": ' + "9" * 5000 + "}")  # a HugeInteger, not an int
    with pytest.raises(InvalidRequest, match="not a JSON schema") as e:
        StructuredOutputsParams(json=huge)
    assert e.value.param == "structured_outputs.json"


def test_an_async_request_compiling_its_grammar_leaves_the_event_loop_free(model_dir, monkeypatch):
    import asyncio

    from pagedbackend import AsyncLLMEngine, EngineArgs

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(model_dir("llama")), seed=0), progress=False)
    try:
        compiler = engine.engine.grammar_compiler
        real = compiler._compile
        monkeypatch.setattr(compiler, "_compile", lambda params: (time.sleep(0.5), real(params))[1])

        async def main():
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            params = SamplingParams(max_tokens=3, structured_outputs=StructuredOutputsParams(choice=["ok"]))
            outs = [out async for out in engine.generate("x", params)]
            ticker.cancel()
            return outs[-1], ticks

        final, ticks = asyncio.run(main())
        assert final.outputs[0].text == "ok" and ticks >= 20  # the loop kept running while it compiled
        engine.engine.check_all_blocks_free()
    finally:
        engine.shutdown()


def test_unknown_and_removed_fields_are_refused_by_name():
    with pytest.raises(InvalidRequest, match="unknown structured_outputs field.*jsn") as e:
        StructuredOutputsParams.from_dict({"jsn": {}})
    assert e.value.param == "structured_outputs.jsn"
    with pytest.raises(InvalidRequest, match="structural tags are not supported"):
        StructuredOutputsParams.from_dict({"structural_tag": "{}"})
    for name in REMOVED_FIELDS:
        with pytest.raises(InvalidRequest, match=f"{name} was removed .*use structured_outputs") as e:
            SamplingParams.from_dict({name: "x"})
        assert e.value.param == name
    with pytest.raises(InvalidRequest, match="min_tokens cannot be combined with structured_outputs"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})
    # the dict form and Triton's JSON text are the same request
    assert SamplingParams.from_dict({"structured_outputs": '{"choice": ["a", "b"]}'}).structured_outputs == \
        StructuredOutputsParams(choice=["a", "b"])


def test_structured_outputs_config_takes_vllm_backends_and_refuses_others(model_dir):
    from pagedbackend import EngineArgs

    for value in (None, {"backend": "auto"}, '{"backend": "xgrammar"}'):
        config = EngineArgs(model=str(model_dir("llama")), structured_outputs_config=value).create_engine_config()
        assert config.structured_outputs_config.backend == "xgrammar"
    with pytest.raises(ValueError, match="structured_outputs_config.*backend must be one of auto, xgrammar"):
        EngineArgs(model=str(model_dir("llama")), structured_outputs_config={"backend": "outlines"}).create_engine_config()
    config = EngineArgs(model=str(model_dir("llama")),
                        structured_outputs_config={"disable_any_whitespace": True}).create_engine_config()
    assert config.structured_outputs_config.disable_any_whitespace
    with pytest.raises(ValueError, match="unknown key"):
        EngineArgs(model=str(model_dir("llama")), structured_outputs_config={"bakend": "auto"}).create_engine_config()


def test_metrics_count_constrained_requests_compiles_and_cache_hits(model_dir, make_engine):
    llm = make_engine(model_dir("llama"), "llm")
    c = StructuredOutputsParams(regex="[0-9]{2}")
    llm.generate(["a", "b", "c"], [SamplingParams(max_tokens=5, structured_outputs=c)] * 2 + [SamplingParams()],
                 use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats["structured_output_requests"] == 2
    assert stats["grammar_compiles"] == 1 and stats["grammar_cache_hits"] == 1
    assert stats["grammar_compile_seconds"]["count"] == 1 and stats["grammar_compile_seconds"]["sum"] > 0
