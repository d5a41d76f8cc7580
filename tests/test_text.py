"""The runtime's text side must produce exactly the ids and text transformers' LlavaProcessor does."""

import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlavaProcessor  # noqa: E402

from vlmdeploy.export.hf_files import read_processor_files  # noqa: E402
from vlmdeploy.export.tiny_tokenizer import LLAVA_CHAT_TEMPLATE, build_tiny_tokenizer  # noqa: E402
from vlmdeploy.runtime.text import (  # noqa: E402
    IncrementalDetokenizer,
    TextProcessor,
    chat_prompt_adds_special_tokens,
    expand_image_placeholders,
    llava_tokens_per_image,
    render_chat_template,
)

VOCAB = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaVA processor saved by transformers 5.x, and the processor loaded back from it."""
    out = tmp_path_factory.mktemp("tiny_llava")
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=build_tiny_tokenizer(VOCAB),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out, AutoProcessor.from_pretrained(out)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return checkpoint[1]


@pytest.fixture(scope="module")
def files(checkpoint):
    return read_processor_files(checkpoint[0])


@pytest.fixture(scope="module")
def tp(files):
    return TextProcessor.from_files(files.tokenizer_json, files.tokenizer_config)


@pytest.fixture(scope="module")
def tokens_per_image(files):
    crop = files.image_processor["crop_size"]
    p = files.processor
    return llava_tokens_per_image(
        crop["height"], crop["width"], p["patch_size"], p["num_additional_image_tokens"],
        p["vision_feature_select_strategy"],
    )  # fmt: skip


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


TEXTS = [
    "",
    "What is shown in this image?",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "unicode: é ü ß 中文 日本語 😀👍🏽 — “quotes”",
    "special tokens in text: <s> hi </s> <pad> <unk> <image>",
    "<image>",
]


def test_tiny_tokenizer_layout(tp):
    assert tp.vocab_size == VOCAB
    assert [tp.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tp.token_to_id("<image>") == VOCAB - 2 and tp.token_to_id("<pad>") == VOCAB - 1
    assert tp.encode("hi")[0] == 1  # BOS from the tokenizer.json post-processor
    with pytest.raises(KeyError, match="not-a-token"):
        tp.token_to_id("not-a-token")


def test_tiny_tokenizer_is_deterministic():
    a = build_tiny_tokenizer(VOCAB).backend_tokenizer.to_str()
    code = (
        "from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer as b\n"
        "print(b(256).backend_tokenizer.to_str())"
    )
    b = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert a == b


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf(tp, hf, text, add_special_tokens):
    expected = hf.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert tp.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "USER: What is shown? ASSISTANT:",
        "USER: <image>\nWhat is shown? ASSISTANT:",
        "USER: <image>\n<image>\nCompare these. ASSISTANT:",
        "<image>中文 😀\n\nand newlines\n<image>",
        "USER: <image><image> é ASSISTANT:",
    ],
)
def test_prompt_ids_match_processor(tp, hf, tokens_per_image, prompt):
    n = prompt.count("<image>")
    images = [_image(30 + 7 * i, 50 - 5 * i, seed=i) for i in range(n)] or None
    expected = hf(text=prompt, images=images)["input_ids"][0]
    ids = tp.encode(expand_image_placeholders(prompt, "<image>", tokens_per_image, n))
    assert ids == list(expected)
    assert ids.count(tp.token_to_id("<image>")) == n * tokens_per_image


def test_tokens_per_image_formula():
    assert llava_tokens_per_image(336, 336, 14, 1, "default") == 576  # llava-1.5-7b
    assert llava_tokens_per_image(336, 336, 14, 1, "full") == 577
    assert llava_tokens_per_image(28, 28, 14, 1, "default") == 4


@pytest.mark.parametrize(
    "num_images, message",
    [
        (1, "prompt has 2 <image> placeholders but 1 image was given; give one image per placeholder"),
        (3, "prompt has 2 <image> placeholders but 3 images were given; give one image per placeholder"),
    ],
)
def test_placeholder_count_mismatch(num_images, message):
    with pytest.raises(ValueError) as err:
        expand_image_placeholders("USER: <image>\n<image>\nhi", "<image>", 4, num_images)
    assert str(err.value) == message


def test_placeholder_without_image_is_an_error():
    with pytest.raises(ValueError, match="prompt has 1 <image> placeholder but 0 images were given"):
        expand_image_placeholders("USER: <image>\nhi", "<image>", 4, 0)


def _conversations():
    img = _image(40, 50)
    user_image = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
    return {
        "vllm_style": [user_image],
        "image_object": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]}
        ],
        "multi_turn": [
            user_image,
            {"role": "assistant", "content": [{"type": "text", "text": "A cat on a table."}]},
            {"role": "user", "content": [{"type": "text", "text": "And its color?\nBe brief. 中文 😀"}]},
        ],
        "system": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
        ],
        "string_content": [{"role": "user", "content": "hello there"}],
        "none_keys_and_image_url": [
            {
                "role": "user",
                "name": None,
                "content": [
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    {"type": "text", "text": "Hi"},
                ],
            }
        ],
    }


@pytest.mark.parametrize("name", list(_conversations()))
def test_chat_template_matches_processor(tp, hf, files, tokens_per_image, name):
    messages = _conversations()[name]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = render_chat_template(files.chat_template, messages, add_generation_prompt=True, **tp.special_tokens)
    assert prompt == expected
    assert tp.render_chat(files.chat_template, messages) == expected
    assert render_chat_template(files.chat_template, messages, add_generation_prompt=False, **tp.special_tokens) == (
        hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    )

    n = prompt.count("<image>")
    ids = tp.encode_chat_prompt(expand_image_placeholders(prompt, "<image>", tokens_per_image, n))
    if n == 0 or name == "image_object":
        expected_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0]
    else:  # the messages carry no image data, so give transformers' processor the images directly
        expected_ids = hf(text=expected, images=[_image(40, 50)] * n)["input_ids"][0]
    assert ids == list(expected_ids)
    assert ids.count(tp.token_to_id("<s>")) == 1


def test_chat_prompt_starting_with_bos_gets_no_second_bos(tp, hf):
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    prompt = render_chat_template(template, messages, **tp.special_tokens)
    assert prompt == hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert not chat_prompt_adds_special_tokens(prompt, "<s>")
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=True)[0]
    assert tp.encode_chat_prompt(prompt) == list(expected)
    assert tp.encode_chat_prompt(prompt).count(tp.token_to_id("<s>")) == 1


def test_template_environment_matches_transformers(tp, hf):
    template = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'skip' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
  {{ m | tojson }}
    {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{{ ns.n }} {{ dict(a=1) | tojson }} {{ bos_token }}|{{ eos_token }}|{{ custom_var }}
{% if messages[0]['thinking'] is defined %} thinking={{ messages[0]['thinking'] }}{% endif %}
"""
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _image(8, 8)}, {"type": "text", "text": "é <b>&"}]},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok", "reasoning": "because", "tool_calls": None},
    ]
    kwargs = dict(add_generation_prompt=True, custom_var=np.int64(7))
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    assert render_chat_template(template, messages, **tp.special_tokens, **kwargs) == expected
    assert '"<Image>"' in expected and "é <b>&" in expected  # placeholder for media, no HTML escaping


def test_raise_exception_in_template():
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}", [])


def _decode_cases(tp):
    rng = random.Random(0)
    cases = [tp.encode(t) for t in TEXTS]
    cases += [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    # byte tokens of multi-byte characters, cut at every position
    cases += [tp.encode("中文😀é")[:k] for k in range(1, 12)]
    return cases


def test_decode_matches_hf(tp, hf):
    for ids in _decode_cases(tp):
        for skip in (True, False):
            assert tp.decode(ids, skip_special_tokens=skip) == hf.tokenizer.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_concatenation_equals_decode(tp):
    for ids in _decode_cases(tp):
        for skip in (True, False):
            detok = IncrementalDetokenizer(tp, skip_special_tokens=skip)
            pieces = [detok.push(i) for i in ids]
            assert "".join(pieces) + detok.flush() == tp.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_holds_back_partial_characters(tp):
    text = "猫が 😀 sits on the mat. Ünïcödé!"
    detok = tp.detokenizer()
    pieces = [detok.push(i) for i in tp.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text and detok.flush() == ""
    assert len([p for p in pieces if p == ""]) > 0  # some byte tokens were held back


def test_decode_cleanup_spaces_matches_hf_when_forced(checkpoint):
    """transformers skips clean_up_tokenization_spaces for BPE unless forced; both ways must match."""
    path, _ = checkpoint
    for force in (False, True):
        flags = {
            "clean_up_tokenization_spaces": True,
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": force,
        }
        hf_tok = AutoTokenizer.from_pretrained(path, **flags)
        tp = TextProcessor.from_files(path / "tokenizer.json", {**read_processor_files(path).tokenizer_config, **flags})
        assert tp.clean_up_tokenization_spaces == force
        pool = [i for s in (" ", "'", "s", "n", "t", ".", ",", "?", "a", "ve", "中") for i in tp.encode(s, False)]
        rng = random.Random(1)
        for _ in range(300):
            ids = [rng.choice(pool) for _ in range(rng.randrange(1, 16))]
            expected = hf_tok.decode(ids, skip_special_tokens=True)
            assert tp.decode(ids) == expected
            detok = tp.detokenizer()
            assert "".join(detok.push(i) for i in ids) + detok.flush() == expected
        assert tp.decode(tp.encode("it 's a test , isn 't it ?")) == hf_tok.decode(
            hf_tok("it 's a test , isn 't it ?")["input_ids"], skip_special_tokens=True
        )


def test_runtime_text_does_not_import_torch_or_transformers():
    code = (
        "import sys, vlmdeploy.runtime.text\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_padding_and_truncation_in_tokenizer_json_are_ignored_like_transformers(tmp_path):
    tok = build_tiny_tokenizer(VOCAB)
    tok.backend_tokenizer.enable_padding(length=40, pad_id=VOCAB - 1, pad_token="<pad>")
    tok.backend_tokenizer.enable_truncation(max_length=8)
    tok.save_pretrained(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    tp = TextProcessor.from_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    text = "What is shown in this image? A sentence longer than eight tokens."
    assert tp.encode(text) == hf_tok(text)["input_ids"]
    assert len(tp.encode(text)) > 8 and tp.encode("hi") == hf_tok("hi")["input_ids"]


def _llama_like_tokenizer_json(tmp_path):
    """A SentencePiece-style tokenizer as Llama's tokenizer.json has it: BPE with byte fallback,
    `▁` for spaces, a decoder that strips the first leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *alphabet], show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "hello world, what is this?", "café naïve"] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_incremental_detokenizer_windows_equal_decode_on_long_random_sequences(tp, tmp_path):
    """Windowed decoding (a few frozen tokens as context) equals a full decode, pushed token by token,
    for the byte-level tiny tokenizer and a Llama-style byte-fallback one; long sequences cross many windows."""
    llama = TextProcessor.from_files(_llama_like_tokenizer_json(tmp_path), {"clean_up_tokenization_spaces": False})
    assert llama.byte_fallback_ids
    rng = random.Random(7)
    for proc in (tp, llama):
        vocab = sorted(proc.tokenizer.get_vocab().values())
        for length in (1, 5, 40, 300):
            for _ in range(5):
                ids = [rng.choice(vocab) for _ in range(length)]
                detok = IncrementalDetokenizer(proc)
                assert "".join(detok.push(i) for i in ids) + detok.flush() == proc.decode(ids), (proc, ids)
