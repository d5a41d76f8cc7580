"""A tiny, deterministic Llama-like tokenizer for test checkpoints (no hub needed).

`build_tiny_tokenizer(256)` returns a transformers fast tokenizer (`TokenizersBackend`) whose
`tokenizer.json` has the parts a LLaVA-1.5 runtime must cope with:

  id 0 `<unk>`, 1 `<s>`, 2 `</s>`          Llama's special tokens, same ids
  ids 3 .. 3+242                           byte-level alphabet: every byte value that can occur in
                                           UTF-8 (all but C0, C1, F5..FF), so any str round-trips
  then BPE merges                          trained in-process on `_CORPUS` (deterministic)
  id vocab_size-2 `<image>`, vocab_size-1 `<pad>`   added special tokens, as llava-hf puts them
                                           after the model vocab (32000 / 32001)
  post-processor `<s> $A`                  BOS comes from tokenizer.json, as in Llama checkpoints

The total vocabulary is exactly `vocab_size` (the tiny model's embedding size) unless the corpus
runs out of pairs to merge, in which case it is smaller (never larger). `vocab_size` must be at
least 248 (5 special tokens + 243 byte tokens).
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# The chat template llava-hf/llava-1.5-7b-hf ships (chat_template.json): images first, then text,
# "USER: " / "ASSISTANT: " prefixes, no prefix for system messages, `{% generation %}` around
# assistant text (a transformers-specific jinja tag our runtime must accept).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"

# Bytes that never occur in UTF-8; leaving them out makes room for merges in a 256-token vocab.
_NON_UTF8_BYTES = {0xC0, 0xC1, *range(0xF5, 0x100)}
_MIN_VOCAB = 5 + 256 - len(_NON_UTF8_BYTES)

_CORPUS = """\
USER: <image>
What is shown in this image? ASSISTANT: The image shows a cat sitting on a wooden table.
USER: Describe the picture in detail. ASSISTANT: There is a red car parked next to a tall tree.
The quick brown fox jumps over the lazy dog. The dog is sleeping in the sun.
A photograph of the street with people walking and the sky above them.
What color is the sky? The sky is blue and there are white clouds in it.
How many animals are there in the photo? There are two cats and one dog.
This is a test of the tokenizer that is used by the tiny model in the tests.
"""


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table, the one `ByteLevel` uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Qwen2-VL's added tokens (after the model vocab in the real checkpoints); no BOS is added.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")

# The chat template Qwen/Qwen2-VL-7B-Instruct ships: a default system message, images and videos
# in place as <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_backend(vocab_size: int, specials: tuple[str, ...] = (IMAGE, PAD), bos: bool = True) -> Tokenizer:
    byte_chars = _byte_to_unicode()
    alphabet = [byte_chars[b] for b in range(256) if b not in _NON_UTF8_BYTES]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),  # room for the added tokens after the model vocab
        min_frequency=2,
        show_progress=False,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if not bos:
        return tok
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


# llava-hf/llava-onevision-qwen2-*: a Qwen2 tokenizer with <image> and <video> added.
ONEVISION_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE, "<video>")

# The chat template llava-hf/llava-onevision-qwen2-0.5b-ov-hf ships: images, then videos, then text.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# InternVL (-hf checkpoints): a Qwen2 tokenizer with its image tokens as named extra special tokens.
INTERNVL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Idefics3 / SmolVLM: the tile tags and wrappers their processors write, after the model vocab.
IDEFICS3_SPECIALS = (IMAGE, PAD, "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                     *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)))
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 256, qwen: bool = False, specials: tuple[str, ...] | None = None
                         ) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer and wrap it as a transformers fast tokenizer (`TokenizersBackend`).
    `qwen`: Qwen-style added tokens (`specials`, default Qwen2-VL's) instead of <image>/<pad>, pad
    <|endoftext|>, EOS <|im_end|>, no BOS."""
    specials = specials or (QWEN_SPECIALS if qwen else (IMAGE, PAD))
    minimum = _MIN_VOCAB - 2 + len(specials)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (special + 243 byte tokens), got {vocab_size}")
    backend = _train_backend(vocab_size, specials, bos=not qwen)
    if qwen:
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", padding_side="left", clean_up_tokenization_spaces=False)
    assert backend.get_vocab_size() <= vocab_size, backend.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
