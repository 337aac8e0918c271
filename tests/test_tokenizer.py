"""tokenizer/: every id and every character checked against other people's implementations.

References: sentencepiece on the real Mixtral tokenizer.model.v1 that mistral-common ships, mistral-common's v1 chat
encoding, gguf-py for writing and reading GGUF files, and llama.cpp (llama-cpp-python) loading the GGUF files we
write. The stop-string oracle is a whole-text search written out in this file.
"""
from __future__ import annotations

import io
import itertools
import os
import random
import struct

import gguf
import mistral_common
import numpy as np
import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mixlocal.tokenizer import StopMatcher, Tokenizer, TokenizerError

MODEL_PATH = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")

_rng = random.Random(1234)
_POOL = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 \t\n\r.,;:!?'\"()[]<>/\\-_=+*&^%$#@~`|{}éèçñßøåæœ日本語中文한국어ΑΒΓабв🙂👍🏽🤖\u200b\u0301"
LONG_RANDOM = "".join(_rng.choice(_POOL) for _ in range(20000))

VARIED = [
    "", " ", "  ", "   ", "a", " a", "a ", "Hello, world!", "hello  world", "   leading spaces",
    "trailing spaces   ", "tabs\tand\t\ttabs", "\t", "line\nbreaks\n\n", "\n", "windows\r\nline\r\nends\r\n", "\r",
    "café naïve résumé Ærøskøbing", "Ελληνικά κείμενο", "Привет, мир", "日本語のテキストです。", "中文文本测试", "한국어 텍스트",
    "emoji 🙂😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈", "🙂", "<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]",
    "<s>[INST] hi [/INST]", "[INST] Who are you? [/INST]", "</s><s>", "<0x41>", "\u2581", "\u2581\u2581x",
    "\u200b zero width", "math ∑∫√ ≠ ≤", "mixed 123 4567 89.0", "code: def f(x):\n    return x**2\n",
    "\x00 nul and \x7f del", "ﬁ ligature ① circled", "Ａｂｃ fullwidth", "combining e\u0301 a\u0308",
    "\U0001F9D1\u200D\U0001F4BB", "\U00010000 \U0010FFFD private", "\ufeffbom", "a" * 3000, " " * 1000,
    "The quick brown fox jumps over the lazy dog. " * 400, LONG_RANDOM,
]


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return sentencepiece.SentencePieceProcessor(model_file=MODEL_PATH)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(MODEL_PATH)


@pytest.fixture(scope="module")
def mistral_v1():
    return MistralTokenizer.v1()


def metadata_from_sentencepiece(sp) -> dict:
    """GGUF tokenizer metadata taken straight from sentencepiece's API, as llama.cpp's converter derives it."""
    def kind(i):
        if sp.is_unknown(i):
            return int(gguf.TokenType.UNKNOWN)
        if sp.is_control(i):
            return int(gguf.TokenType.CONTROL)
        if sp.is_byte(i):
            return int(gguf.TokenType.BYTE)
        if sp.is_unused(i):
            return int(gguf.TokenType.UNUSED)
        return int(gguf.TokenType.NORMAL)

    n = sp.get_piece_size()
    return {
        "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "types": [kind(i) for i in range(n)],
        "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
    }


def write_gguf(path, *, metadata=None, tokenizer=None, with_tensor=False, chat_template=None, arch_keys=False):
    """A GGUF file written with gguf-py: vocab-only unless `with_tensor`."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if arch_keys:  # what llama.cpp needs to open a file at all, even vocab-only
        writer.add_context_length(4096)
        writer.add_embedding_length(64)
        writer.add_block_count(1)
        writer.add_feed_forward_length(128)
        writer.add_head_count(4)
        writer.add_head_count_kv(4)
        writer.add_layer_norm_rms_eps(1e-5)
    if tokenizer is not None:
        tokenizer.write_gguf_metadata(writer)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(metadata["tokens"])
        writer.add_token_scores(metadata["scores"])
        writer.add_token_types(metadata["types"])
        writer.add_bos_token_id(metadata["bos"])
        writer.add_eos_token_id(metadata["eos"])
        writer.add_unk_token_id(metadata["unk"])
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if with_tensor:
        writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def vocab_only_gguf(gguf_dir, reference):
    return write_gguf(gguf_dir / "vocab-only.gguf", metadata=metadata_from_sentencepiece(reference))


@pytest.fixture(scope="module")
def rebuilt(vocab_only_gguf):
    return Tokenizer.from_gguf(vocab_only_gguf)


# ---------------------------------------------------------------------------------------------------------------------
# encode / decode against sentencepiece
# ---------------------------------------------------------------------------------------------------------------------

def test_special_ids_and_size(tok, reference):
    assert tok.vocab_size == reference.get_piece_size() == 32000
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (
        reference.bos_id(), reference.eos_id(), reference.unk_id(), reference.pad_id())


@pytest.mark.parametrize("text", VARIED, ids=range(len(VARIED)))
def test_encode_matches_sentencepiece(tok, reference, text):
    expected = reference.encode(text)
    assert tok.encode(text, add_bos=False) == expected
    assert tok.encode(text) == [reference.bos_id()] + expected
    assert tok.decode(tok.encode(text)) == reference.decode(expected)


def test_literal_special_strings_are_plain_text(tok, reference):
    ids = tok.encode("<s>[INST] </s>", add_bos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert ids == reference.encode("<s>[INST] </s>")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_encode_decode_hypothesis_unicode(tok, reference, text):
    expected = reference.encode(text)
    assert tok.encode(text, add_bos=False) == expected
    assert tok.decode(expected) == reference.decode(expected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 31999) | st.integers(0, 260), max_size=40))
def test_decode_random_ids_matches_sentencepiece(tok, reference, ids):
    assert tok.decode(ids) == reference.decode(ids)


def test_decode_accepts_numpy_ids(tok, reference):
    ids = np.array(tok.encode("numpy ids"), dtype=np.int64)
    assert tok.decode(ids) == reference.decode(ids.tolist())


@pytest.mark.parametrize("bad", [[32000], [-1], [5, 10**9], [1.5], ["a"], 7, "abc"])
def test_decode_rejects_bad_ids(tok, bad):
    with pytest.raises(ValueError):
        tok.decode(bad)


def test_bad_text_is_rejected(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError):
        tok.encode(b"bytes")


def test_from_file_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(ValueError):
        Tokenizer.from_file(junk)


# ---------------------------------------------------------------------------------------------------------------------
# Mixtral Instruct v1 chat against mistral-common
# ---------------------------------------------------------------------------------------------------------------------

CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    "system": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    "system-multi-turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thank you"},
    ],
    "two-systems-anywhere": [
        {"role": "system", "content": "First rule."},
        {"role": "user", "content": "u1"},
        {"role": "system", "content": "Second rule."},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "system", "content": "Third rule."},
    ],
    "empty-system-skipped": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hello"},
    ],
    "system-only": [{"role": "system", "content": "Only a system prompt"}],
    "empty-user": [{"role": "user", "content": ""}],
    "special-strings-in-text": [
        {"role": "user", "content": "<s>[INST] </s> [/INST] <unk>"},
        {"role": "assistant", "content": "</s> is EOS and [INST] opens a turn"},
        {"role": "user", "content": "ok"},
    ],
    "unicode-and-whitespace": [
        {"role": "user", "content": "  café\t日本語 🙂\r\n  "},
        {"role": "assistant", "content": " 👍🏽 ok "},
        {"role": "user", "content": "\n\n"},
    ],
    "text-parts": [
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
    ],
    "prefix": [
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "Autumn moonlight", "prefix": True},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encode_chat_matches_mistral_common(tok, mistral_v1, name):
    messages = CONVERSATIONS[name]
    expected = mistral_v1.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    assert tok.encode_chat(messages) == expected
    assert tok.encode_chat(messages, chat_format="mixtral") == expected


def test_encode_chat_shape(tok):
    ids = tok.encode_chat(CONVERSATIONS["multi-turn"])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.eos_id) == 2  # one per completed answer
    assert tok.decode(ids).startswith("[INST] Hi there [/INST]")


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "prefix"),
    ([{"role": "user", "content": "a", "prefix": True}], "prefix"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "prefix": True},
      {"role": "user", "content": "c"}], "prefix"),
    ([{"role": "tool", "content": "42"}], "tool"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"},
      {"role": "user", "content": "c"}], "cannot follow"),
    ([{"role": "user", "content": None}], "no content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "image_url"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "c"}],
     "empty content"),
    ("just a string", "list"),
])
def test_encode_chat_rejects_bad_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"},
     {"role": "user", "content": "c"}],
])
def test_mistral_common_rejects_what_we_reject(tok, mistral_v1, messages):
    # the reference behaviour our ValueErrors mirror
    with pytest.raises(Exception, match="assistant"):
        mistral_v1.encode_chat_completion(ChatCompletionRequest(messages=messages))
    with pytest.raises(ValueError):
        tok.encode_chat(messages)


# ---------------------------------------------------------------------------------------------------------------------
# Jinja chat templates
# ---------------------------------------------------------------------------------------------------------------------

# A Mistral-style template whose rendering splits into the same text runs as mistral-common's v1 encoding.
MISTRAL_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def templated():
    return Tokenizer.from_file(MODEL_PATH, chat_template=MISTRAL_STYLE_TEMPLATE)


@pytest.mark.parametrize("name", ["one-turn", "multi-turn", "special-strings-in-text", "unicode-and-whitespace"])
def test_template_path_matches_mistral_common(templated, mistral_v1, name):
    messages = CONVERSATIONS[name]
    expected = mistral_v1.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    assert templated.encode_chat(messages, chat_format="template") == expected


def test_template_specials_map_to_ids_but_message_text_does_not(tok, reference):
    t = Tokenizer.from_file(MODEL_PATH, chat_template="{{ bos_token }}A{{ eos_token }}{% for m in messages %}"
                                                      "{{ m['content'] }}</s>{% endfor %}")
    ids = t.encode_chat([{"role": "user", "content": "x <s> y </s>"}], chat_format="template")
    expected = ([1] + reference.encode("A") + [2] + reference.encode("x <s> y </s>") + [2])
    assert ids == expected


def test_template_bos_never_doubled_nor_missing(reference):
    with_bos = Tokenizer.from_file(MODEL_PATH, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    without_bos = Tokenizer.from_file(MODEL_PATH, chat_template="{{ messages[0]['content'] }}")
    messages = [{"role": "user", "content": "hi"}]
    expected = [1] + reference.encode("hi")
    assert with_bos.encode_chat(messages, chat_format="template") == expected
    assert without_bos.encode_chat(messages, chat_format="template") == expected


def test_template_errors_are_value_errors():
    t = Tokenizer.from_file(MODEL_PATH, chat_template=MISTRAL_STYLE_TEMPLATE)
    with pytest.raises(ValueError, match="alternate"):
        t.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], chat_format="template")
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_file(MODEL_PATH).encode_chat([{"role": "user", "content": "a"}], chat_format="template")
    with pytest.raises(ValueError, match="chat_format"):
        t.encode_chat([{"role": "user", "content": "a"}], chat_format="llama2")
    with pytest.raises(ValueError, match="compile"):
        Tokenizer.from_file(MODEL_PATH, chat_template="{% for %}").encode_chat(
            [{"role": "user", "content": "a"}], chat_format="template")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",          # escape to arbitrary classes
    "{{ messages.__class__.__init__.__globals__ }}",            # reach module globals
    "{% set _ = messages.append({'role': 'user'}) %}x",         # mutate the caller's data
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",  # the classic SSTI payload
])
def test_template_sandbox_blocks_unsafe_templates(template):
    t = Tokenizer.from_file(MODEL_PATH, chat_template=template)
    with pytest.raises(ValueError):
        t.encode_chat([{"role": "user", "content": "a"}], chat_format="template")


def test_default_chat_format_choice():
    assert Tokenizer.from_file(MODEL_PATH).default_chat_format == "mixtral"
    assert Tokenizer.from_file(MODEL_PATH, chat_template=MISTRAL_STYLE_TEMPLATE).default_chat_format == "mixtral"
    assert Tokenizer.from_file(MODEL_PATH, chat_template=CHATML_TEMPLATE).default_chat_format == "template"


# ---------------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------------

def test_vocab_only_gguf_has_no_tensors(vocab_only_gguf):
    with open(vocab_only_gguf, "rb") as f:
        magic, _version, n_tensors = struct.unpack("<4sIQ", f.read(16))
    assert magic == b"GGUF" and n_tensors == 0


@pytest.mark.parametrize("text", VARIED, ids=range(len(VARIED)))
def test_gguf_rebuilt_encodes_like_original(rebuilt, reference, text):
    assert rebuilt.encode(text) == [reference.bos_id()] + reference.encode(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_gguf_rebuilt_hypothesis(rebuilt, reference, text):
    expected = reference.encode(text)
    assert rebuilt.encode(text, add_bos=False) == expected
    assert rebuilt.decode(expected) == reference.decode(expected)


def test_gguf_rebuilt_chat_and_ids(rebuilt, mistral_v1):
    assert (rebuilt.vocab_size, rebuilt.bos_id, rebuilt.eos_id, rebuilt.unk_id) == (32000, 1, 2, 0)
    for messages in CONVERSATIONS.values():
        expected = mistral_v1.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        assert rebuilt.encode_chat(messages) == expected


def test_gguf_metadata_matches_sentencepiece(tok, reference):
    expected = metadata_from_sentencepiece(reference)
    md = tok.gguf_metadata()
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.tokens"] == expected["tokens"]
    assert md["tokenizer.ggml.scores"] == expected["scores"]
    assert md["tokenizer.ggml.token_type"] == expected["types"]
    assert md["tokenizer.ggml.bos_token_id"] == expected["bos"]
    assert md["tokenizer.ggml.eos_token_id"] == expected["eos"]
    assert md["tokenizer.ggml.unknown_token_id"] == expected["unk"]
    assert "tokenizer.ggml.padding_token_id" not in md  # Mixtral has no padding token
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False


def test_gguf_with_tensors_and_template_round_trip(gguf_dir, tok, reference):
    source = Tokenizer.from_file(MODEL_PATH, chat_template=CHATML_TEMPLATE)
    path = write_gguf(gguf_dir / "with-tensor.gguf", tokenizer=source, with_tensor=True)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 1
    from_reader = Tokenizer.from_gguf_fields(reader)
    from_file = Tokenizer.from_gguf(path)
    from_dict = Tokenizer.from_gguf_fields(source.gguf_metadata())
    for t in (from_reader, from_file, from_dict):
        assert t.chat_template == CHATML_TEMPLATE
        assert t.default_chat_format == "template"
        assert t.encode(LONG_RANDOM) == [1] + reference.encode(LONG_RANDOM)
        assert t.gguf_metadata() == source.gguf_metadata()
    messages = [{"role": "user", "content": "hi"}]
    ids = from_file.encode_chat(messages)
    assert ids[0] == 1 and tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_loaded_by_llama_cpp_tokenizes_identically(gguf_dir, tok):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_gguf(gguf_dir / "llama-cpp-vocab.gguf", tokenizer=tok, arch_keys=True)
    model = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    for text in VARIED[:-3] + ["<s>[INST] x [/INST]"]:
        assert model.tokenize(text.encode("utf-8"), add_bos=True, special=False) == tok.encode(text), text
    # llama.cpp's template tokenization (specials parsed); it adds its own BOS, so the template text has none
    t = Tokenizer.from_file(MODEL_PATH, chat_template=MISTRAL_STYLE_TEMPLATE)
    messages = CONVERSATIONS["multi-turn"]
    rendered = "[INST] Hi there [/INST] Hello! How can I help?</s>[INST] Tell me a joke.\nA short one. [/INST] " \
               "Why did the chicken cross the road?</s>[INST] Why? [/INST]"
    assert t.encode_chat(messages, chat_format="template") == model.tokenize(
        rendered.encode("utf-8"), add_bos=True, special=True)


@pytest.mark.parametrize("change, match", [
    ({"tokenizer.ggml.model": "gpt2"}, "gpt2"),
    ({"tokenizer.ggml.bos_token_id": 32000}, "outside"),
    ({"tokenizer.ggml.scores": [0.0] * 5}, "entries"),
    ({"tokenizer.ggml.token_type": [9] * 32000}, "token type"),
])
def test_bad_gguf_metadata_is_rejected(tok, change, match):
    fields = {**tok.gguf_metadata(), **change}
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_gguf_fields(fields)


def test_gguf_without_tokenizer_is_rejected(gguf_dir):
    path = gguf_dir / "no-tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ValueError, match="no such"):
        Tokenizer.from_gguf(gguf_dir / "missing.gguf")


# ---------------------------------------------------------------------------------------------------------------------
# a second model: every piece type and sentencepiece's default normalizer
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small BPE model trained here by sentencepiece with custom normalization rules, removal of extra
    whitespace, byte fallback, user-defined and extra control symbols; one piece is then marked UNUSED."""
    from mixlocal.tokenizer.model_proto import (
        Piece,
        PieceType,
        build_model_proto,
        parse_model_proto,
    )

    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve", "日本", "語", "hello", "world", "tokens", "merge"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    # a few rules rather than NFKC, whose compiled form (240 kB) gguf-py reads back one byte at a time
    rules = tmp_path_factory.mktemp("toy") / "rules.tsv"
    rules.write_text("FB01\t66 69\nFF21\t41\n2460\t31\n")  # ﬁ -> fi, Ａ -> A, ① -> 1
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, vocab_size=400, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<tool>", "@@"], control_symbols=["<ctl>"], character_coverage=1.0, minloglevel=2,
        normalization_rule_tsv=str(rules))
    spec = parse_model_proto(out.getvalue())
    last = spec.pieces[-1]
    spec.pieces[-1] = Piece(last.text, last.score, PieceType.UNUSED)
    proto = build_model_proto(spec)
    reference = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert reference.is_unused(len(spec.pieces) - 1)
    return Tokenizer(proto), reference


TOY_TEXTS = ["  hello   world  ", "<tool>x@@y <ctl> ﬁ Ａ①", "🙂 unk é", "the  quick\tbrown\n\nfox", "b", ""]


def test_toy_model_matches_sentencepiece(toy, gguf_dir):
    tok, reference = toy
    assert tok._spec.precompiled_charsmap and tok._spec.remove_extra_whitespaces
    assert reference.encode("ﬁ①") == reference.encode("fi1")  # the rules are in force
    # through a real GGUF file: the NFKC charsmap travels as a uint8 array
    path = write_gguf(gguf_dir / "toy.gguf", tokenizer=tok)
    rebuilt = Tokenizer.from_gguf(path)
    for text in TOY_TEXTS:
        assert tok.encode(text) == rebuilt.encode(text) == [reference.bos_id()] + reference.encode(text)
    rng = random.Random(3)
    for _ in range(500):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(12))]
        d = tok.detokenizer()
        assert "".join(d.feed(i) for i in ids) + d.flush() == reference.decode(ids) == rebuilt.decode(ids)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.text(alphabet=" \tabcé日🙂<>@ctlo", max_size=60))
def test_toy_model_hypothesis(toy, text):
    tok, reference = toy
    ids = reference.encode(text)
    assert tok.encode(text, add_bos=False) == ids
    d = tok.detokenizer()
    assert "".join(d.feed(i) for i in ids) + d.flush() == reference.decode(ids)


# ---------------------------------------------------------------------------------------------------------------------
# streaming detokenizer
# ---------------------------------------------------------------------------------------------------------------------

def stream(tokenizer, ids):
    """Feed ids one at a time: the pieces, and what flush() returns at the end."""
    d = tokenizer.detokenizer()
    pieces = [d.feed(i) for i in ids]
    return pieces, d.flush()


def test_emoji_from_byte_tokens_is_never_a_replacement_character(tok, reference):
    ids = tok.encode("ok 🤖 done", add_bos=False)
    assert sum(1 for i in ids if reference.is_byte(i)) == 4  # the robot arrives as four byte tokens
    pieces, tail = stream(tok, ids)
    assert "\ufffd" not in "".join(pieces) + tail
    assert "".join(pieces) + tail == reference.decode(ids) == "ok 🤖 done"
    assert "🤖" in pieces  # emitted whole, on its last byte


def test_leading_space_rule(tok, reference):
    # sentencepiece drops the dummy-prefix space of the first word only, even after control tokens
    for ids in ([1, 22557, 1526], [22557], [1, 1, 28705, 22557], [2, 1526], [28705, 28705]):
        pieces, tail = stream(tok, ids)
        assert "".join(pieces) + tail == reference.decode(ids), ids


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 31999) | st.integers(0, 270) | st.sampled_from([0, 1, 2, 28705, 13]), max_size=30))
def test_detokenizer_random_ids(tok, reference, ids):
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == reference.decode(ids)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120), st.randoms(use_true_random=False))
def test_detokenizer_random_splits_of_real_text(tok, reference, text, rnd):
    ids = tok.encode(text)
    # restart the decoder at random points: each stretch must decode exactly like sentencepiece decodes it
    cuts = sorted(rnd.sample(range(len(ids) + 1), k=min(3, len(ids) + 1)))
    bounds = [0] + cuts + [len(ids)]
    d = tok.detokenizer()
    for a, b in itertools.pairwise(bounds):
        got = "".join(d.feed(i) for i in ids[a:b]) + d.flush()
        assert got == reference.decode(ids[a:b])
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == reference.decode(ids) == text


def test_detokenizer_pieces_are_final(tok, reference):
    # what has been emitted after k ids is a prefix of decode(all ids), for any continuation
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(32000)]) for _ in range(rng.randrange(1, 15))]
        d = tok.detokenizer()
        emitted = ""
        for i in ids:
            emitted += d.feed(i)
            assert reference.decode(ids).startswith(emitted)
        assert emitted + d.flush() == reference.decode(ids)


def test_detokenizer_rejects_bad_ids(tok):
    d = tok.detokenizer()
    with pytest.raises(ValueError):
        d.feed(32000)
    with pytest.raises(ValueError):
        d.feed(-3)


# ---------------------------------------------------------------------------------------------------------------------
# stop strings
# ---------------------------------------------------------------------------------------------------------------------

def first_stop(text, stops):
    """Oracle: the text before the stop string completed first (longest among those ending together)."""
    best = None
    for s in stops:
        k = text.find(s)
        if k >= 0:
            key = (k + len(s), k)
            best = key if best is None or key < best else best
    return (text, False) if best is None else (text[:best[1]], True)


def run_matcher(stops, chunks):
    m = StopMatcher(stops)
    out, stopped = "", False
    for c in chunks:
        emit, stopped = m.feed(c)
        assert not any(s in out + emit for s in stops)  # stop text is never emitted
        out += emit
        if stopped:
            break
    return (out, True) if stopped else (out + m.flush(), False)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="abc ", max_size=40), st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), min_size=1,
                                                        max_size=3), st.randoms(use_true_random=False))
def test_stop_matcher_against_oracle(text, stops, rnd):
    cuts = sorted(rnd.sample(range(len(text) + 1), k=rnd.randint(0, len(text) + 1)))
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert run_matcher(stops, chunks) == first_stop(text, stops)


def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher(["User:"])
    assert m.feed("Hello Us") == ("Hello ", False)
    assert m.feed("e") == ("", False)
    assert m.feed("d to") == ("Used to", False)
    assert m.feed(" it. User") == (" it. ", False)
    assert m.feed(": next") == ("", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_stop_strings_straddling_tokens(tok):
    text = "Sure! Here is the answer.\nUser: what now?"
    ids = tok.encode(text, add_bos=False)
    detok, matcher = tok.detokenizer(), StopMatcher(["\nUser:", "###"])
    out, stopped = "", False
    for i in ids:
        emit, stopped = matcher.feed(detok.feed(i))
        out += emit
        if stopped:
            break
    assert stopped and out == "Sure! Here is the answer."
    # the stop string spans several tokens
    stop_ids = tok.encode("\nUser:", add_bos=False)
    assert len(stop_ids) > 2


def test_stop_matcher_validation():
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])
    with pytest.raises(ValueError):
        StopMatcher([3])
    m = StopMatcher(None)
    assert m.feed("anything") == ("anything", False) and m.flush() == ""
    assert StopMatcher("x").feed("abxcd") == ("ab", True)


def test_tokenizer_error_is_value_error():
    assert issubclass(TokenizerError, ValueError)
