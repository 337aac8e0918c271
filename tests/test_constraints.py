"""Structured output (engine/constraints.py): outputs that follow a JSON schema, a regex or a Lark grammar token by
token on the Mixtral vocabulary, byte-fallback pieces included; OpenAI's logit_bias; bad grammars are ValueErrors."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import sentencepiece
from mixlocal.engine.constraints import ConstraintError
from mixlocal.tokenizer import Tokenizer

from mixlocal import engine


@pytest.fixture(scope="module")
def llm():
    return engine.load(n_ctx=512, kv_type="f32")


@pytest.fixture(scope="module")
def mixtral_tok():
    from importlib.resources import files
    path = files("mistral_common") / "data" / "tokenizer.model.v1"
    return Tokenizer.from_file(str(path)), sentencepiece.SentencePieceProcessor(model_file=str(path))


def test_token_bytes_are_what_sentencepiece_decodes(mixtral_tok):
    """Joined, the bytes of any run of ids are sentencepiece's text for it (less the space sentencepiece drops at
    the start); control pieces are marked 0xFF."""
    tok, sp = mixtral_tok
    tb = tok.token_bytes()
    assert len(tb) == sp.get_piece_size() == 32000
    assert tb[tok.eos_id].startswith(b"\xff") and tb[tok.bos_id].startswith(b"\xff")
    rng = np.random.default_rng(0)
    normal = [i for i in range(3, 32000)]
    for _ in range(300):
        ids = [int(i) for i in rng.choice(normal, rng.integers(1, 12))]
        joined = b"".join(tb[i] for i in ids)
        want = sp.decode(ids).encode("utf-8")
        got = joined[1:] if joined.startswith(b" ") else joined  # the dummy-prefix space decode drops
        if b"\xef\xbf\xbd" in want:  # a cut UTF-8 sequence: sentencepiece writes U+FFFD for its bytes
            continue
        assert got == want, (ids, got, want)


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "n"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses_and_follows_the_schema(llm, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    r = llm.generate("Is the sky green? Answer:", max_tokens=40, temperature=1.0, seed=seed, response_format=fmt)
    assert r.finish_reason == "stop", r.text
    out = json.loads(r.text)
    assert set(out) == {"answer", "n"} and out["answer"] in ("yes", "no") and 0 <= out["n"] <= 9
    assert r.text == json.dumps(out)  # compact separators, nothing around it
    assert r.timings["grammar_mask_ms_per_token"] > 0


def test_json_object_and_chat_completion(llm):
    res = llm.create_chat_completion([{"role": "user", "content": "A JSON object, please."}], max_tokens=200,
                                     temperature=0, response_format={"type": "json_object"}, logit_bias={})
    text = res["choices"][0]["message"]["content"]
    if res["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the tiny model may ramble in a string until max_tokens: still a JSON object's prefix
        assert text.startswith("{")


@pytest.mark.parametrize("grammar,pattern", [
    ({"regex": "(yes|no), because [a-z ]{1,30}\\."}, r"(yes|no), because [a-z ]{1,30}\."),
    ({"regex": "é{2}🙂"}, "é{2}🙂"),  # only byte-fallback pieces or rare merges spell these
    ("start: num (\"+\" num)*\nnum: /[0-9]{1,3}/", r"[0-9]{1,3}(\+[0-9]{1,3})*"),
])
def test_regex_and_lark_grammars(llm, grammar, pattern):
    finished = []
    for seed in range(4):
        r = llm.generate("Well,", max_tokens=40, temperature=0.9, seed=seed, grammar=grammar)
        if r.finish_reason == "stop":
            assert re.fullmatch(pattern, r.text), (grammar, r.text)
            finished.append(r.text)
    assert finished, "no output completed within 40 tokens"


def test_bad_constraints_are_value_errors(llm):
    for fmt in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
                {"type": "json_schema"}, "json"):
        with pytest.raises(ValueError):
            llm.generate("x", max_tokens=2, response_format=fmt)
    with pytest.raises(ConstraintError, match="grammar"):
        llm.generate("x", max_tokens=2, grammar={"regex": "(unclosed"})
    with pytest.raises(ConstraintError):
        llm.generate("x", max_tokens=2, grammar="start: undefined_rule")
    with pytest.raises(ConstraintError, match="not both"):
        llm.generate("x", max_tokens=2, grammar={"regex": "a"}, response_format={"type": "json_object"})


def test_logit_bias(llm):
    base = llm.generate("Once upon a time", max_tokens=4, temperature=0)
    first = base.tokens[0]
    pushed = llm.generate("Once upon a time", max_tokens=4, temperature=0, logit_bias={"42": 100})
    assert pushed.tokens[0] == 42
    banned = llm.generate("Once upon a time", max_tokens=4, temperature=0, logit_bias={first: -100})
    assert banned.tokens[0] != first
    for bad in ({"x": 1}, {99999: 1}, {5: 101}, {5: "a"}):
        with pytest.raises(ValueError, match="logit_bias"):
            llm.generate("x", max_tokens=1, logit_bias=bad)


def test_a_character_outside_the_vocabulary_comes_from_byte_pieces(llm):
    tok = llm.tokenizer
    assert tok.encode("龘", add_bos=False)[-3:] == [tok.piece_to_id(f"<0x{b:02X}>") for b in "龘".encode()]
    r = llm.generate("Well,", max_tokens=8, temperature=0, grammar={"regex": "龘{2}"})
    assert r.text == "龘龘" and r.finish_reason == "stop"
    assert all(tok.id_to_piece(t).startswith("<0x") for t in r.tokens)


def test_generate_command_takes_a_schema_a_grammar_and_stop(tmp_path):
    from test_cli import one_error_line, run_cli
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    r = run_cli("generate", "-p", "Verdict:", "-n", "30", "--temp", "0", "--json-schema", schema)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[len("Verdict:"):])
    assert out["answer"] in ("yes", "no")
    regex = tmp_path / "g.regex"
    regex.write_text("(yes|no)!\n")
    r = run_cli("generate", "-p", "Answer:", "-n", "10", "--grammar", regex)
    assert r.returncode == 0 and r.stdout.strip() in ("Answer:yes!", "Answer:no!"), r.stdout
    bad = tmp_path / "b.regex"
    bad.write_text("(a")
    assert "cannot compile the grammar" in one_error_line(run_cli("generate", "-p", "x", "--grammar", bad), 2)
    free = run_cli("generate", "-p", "Once upon a time", "-n", "30", "--temp", "0")
    cut = run_cli("generate", "-p", "Once upon a time", "-n", "30", "--temp", "0", "--stop", "the")
    assert "the" in free.stdout[len("Once upon a time"):]
    assert cut.stdout.rstrip("\n") == free.stdout[:free.stdout.index("the", len("Once upon a time"))]


def test_a_grammar_that_allows_nothing_or_is_too_large_is_a_value_error(llm):
    with pytest.raises(ConstraintError, match="allows no output"):
        llm.generate("x", max_tokens=3, grammar={"regex": "[^\\s\\S]"})
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 40}
                                             for i in range(5000)}}
    with pytest.raises(ConstraintError, match="too large"):
        llm.generate("x", max_tokens=3, response_format={"type": "json_schema", "json_schema": {"schema": huge}})
