"""Text side of the runtime: tokenize, render chat templates, expand image placeholders, detokenize.

Reproduces what transformers 5.x does for LLaVA-1.5 (`LlavaProcessor` + a fast tokenizer) with
`tokenizers` and `jinja2` only; never imports torch or transformers.

    prompt = render_chat_template(template, messages, **tp.special_tokens)        # = apply_chat_template
    prompt = expand_image_placeholders(prompt, "<image>", tokens_per_image, n)   # = LlavaProcessor.__call__
    ids = tp.encode_chat_prompt(prompt)                                          # = ...(tokenize=True)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

# transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`); chat templates see them as variables.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers' `clean_up_tokenization`, applied in this order.
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip
_REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece/Llama byte-fallback tokens


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


class TextProcessor:
    """A `tokenizers.Tokenizer` set up the way transformers' fast tokenizer (`TokenizersBackend`) is.

    `from_files(tokenizer_json, tokenizer_config)` applies what transformers does when it loads a
    tokenizer from these files: special tokens named in the config added if missing,
    `split_special_tokens`, padding/truncation from tokenizer.json turned off (a single prompt is
    encoded with neither), and decode-time `clean_up_tokenization_spaces` (which transformers
    skips for BPE models unless forced). BOS/EOS come from tokenizer.json's post-processor only:
    with a tokenizer.json present, transformers ignores add_bos_token / add_eos_token in the config.

    Model-specific tokenizer classes (e.g. `LlamaTokenizer`) rebuild more than this on load, so
    the exporter should write tokenizer.json from the loaded tokenizer
    (`export.hf_files.save_runtime_tokenizer_json`); the adjustments here are idempotent on it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        special_tokens: Mapping[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self.tokenizer = tokenizer
        self.special_tokens: dict[str, str] = dict(special_tokens or {})  # {"bos_token": "<s>", ...}
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @classmethod
    def from_files(
        cls, tokenizer_json_path: str | Path, tokenizer_config: Mapping[str, Any] | str | Path | None = None
    ) -> TextProcessor:
        """Load tokenizer.json; `tokenizer_config` is the tokenizer_config.json dict or its path."""
        tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
        config = _load_config(tokenizer_config)
        special_tokens = _special_tokens_from_config(config)
        _apply_load_time_settings(tokenizer, config, special_tokens)
        force_cleanup = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        is_bpe = type(tokenizer.model).__name__ == "BPE"
        cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and (force_cleanup or not is_bpe)
        return cls(tokenizer, special_tokens, clean_up_tokenization_spaces=cleanup)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """= transformers `tokenizer(text, add_special_tokens=...)["input_ids"]`."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat_prompt(self, prompt: str) -> list[int]:
        """Token ids of a rendered (and placeholder-expanded) chat prompt, as the processor's
        `apply_chat_template(..., tokenize=True)` makes them: special tokens (BOS) are added unless the
        prompt already starts with the BOS token (a template that writes `{{ bos_token }}` itself)."""
        return self.encode(prompt, add_special_tokens=chat_prompt_adds_special_tokens(prompt, self.bos_token))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """= transformers `tokenizer.decode(ids, skip_special_tokens=...)`."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def token_to_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def render_chat(self, template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """`render_chat_template` with this tokenizer's special tokens as template variables."""
        return render_chat_template(template, messages, add_generation_prompt, **{**self.special_tokens, **extra})

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self.tokenizer.token_to_id(eos)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of `<0xNN>` tokens when the decoder has ByteFallback (Llama), else empty."""
        if "ByteFallback" not in repr(self.tokenizer.decoder):
            return frozenset()
        return frozenset(i for t, i in self.tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))


def chat_prompt_adds_special_tokens(prompt: str, bos_token: str | None) -> bool:
    """Whether transformers' processor adds special tokens when `apply_chat_template(tokenize=True)`
    tokenizes `prompt`: yes, unless the rendered prompt already starts with the BOS token."""
    return not (bos_token is not None and prompt.startswith(bos_token))


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (used by decode when clean_up_tokenization_spaces)."""
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def _load_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    return json.loads(Path(config).read_text(encoding="utf-8"))


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or 4.x's {"__type": "AddedToken", "content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens as transformers collects them (its `special_tokens_map`): the standard
    names, a dict `extra_special_tokens`, and any other `*_token` key holding a token."""
    tokens = {}
    for key, value in config.items():
        content = _token_content(value)
        if content is not None and key.endswith("_token"):  # NAMED_SPECIAL_TOKENS and model-specific ones
            tokens[key] = content
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        tokens.update({k: c for k, v in extra.items() if (c := _token_content(v)) is not None})
    return tokens


def _extra_special_token_list(config: Mapping[str, Any]) -> list[str]:
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    if isinstance(extra, list):
        return [c for v in extra if (c := _token_content(v)) is not None]
    return []


def _apply_load_time_settings(tokenizer: Tokenizer, config: Mapping[str, Any], special: Mapping[str, str]) -> None:
    # transformers calls the backend with neither padding nor truncation for one prompt.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    # Special tokens named in the config but not yet added tokens become added special tokens.
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = [t for t in (*special.values(), *_extra_special_token_list(config)) if t not in added]
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))


# ----------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it (for
    assistant masks); rendering just emits the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type (as transformers does)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that rejects underscore-prefixed attributes (as transformers does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """The template compiled in an environment equal to transformers' `_compile_jinja_template`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def render_chat_template(
    template: str, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
) -> str:
    """= transformers' processor `apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`.

    Pass the tokenizer's special tokens (`TextProcessor.special_tokens`: bos_token, eos_token, ...) in
    `extra`, as transformers does; `tools` and `documents` may be given there too. Messages are
    normalised as transformers does: keys whose value is None are dropped, OpenAI
    `{"type": "image_url", "image_url": {...}}` blocks become `{"type": "image", "url": ...}`,
    non-JSON values (images, arrays) become placeholders like "<Image>", and reasoning fields are
    aliased. String content is passed through unchanged (llava's template then renders no text for
    it: wrap it as `[{"type": "text", "text": ...}]` to get OpenAI semantics).
    """
    chat = _plain_template_data(_normalize_messages(messages))
    chat = _alias_reasoning_fields(chat)
    context = {"tools": None, "documents": None, **_plain_template_data(extra)}
    return compile_chat_template(template).render(messages=chat, add_generation_prompt=add_generation_prompt, **context)


def _normalize_messages(messages: Any) -> list[dict]:
    """transformers' `_normalize_chat_messages` + the processor's image_url conversion."""
    normalized = []
    for message in _objects_to_dicts(getattr(messages, "messages", messages)):
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_image_url_to_image(block) for block in message["content"]]
        normalized.append(message)
    return normalized


def _image_url_to_image(block: Any) -> Any:
    if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
        info = block["image_url"]
        return {"type": "image", "url": info.get("url", "") if isinstance(info, dict) else info}
    return block


def _objects_to_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models) to dicts; media left as they are."""
    if isinstance(value, Mapping):
        return {k: _objects_to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_objects_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_objects_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_to_dicts(value.model_dump())
    return value


def _plain_template_data(value: Any) -> Any:
    """transformers' `_plain_template_data`: only plain JSON types reach the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning_fields(chat: list) -> list:
    """transformers fills `reasoning_content` (and `thinking`) from any of the reasoning field names."""
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


# ----------------------------------------------------------------------------------------------
# Image placeholders
# ----------------------------------------------------------------------------------------------


def llava_tokens_per_image(
    height: int, width: int, patch_size: int, num_additional_image_tokens: int, vision_feature_select_strategy: str
) -> int:
    """`LlavaProcessor.replace_image_token`'s count for a (height, width) pixel_values image."""
    count = (height // patch_size) * (width // patch_size) + num_additional_image_tokens
    return count - 1 if vision_feature_select_strategy == "default" else count


def expand_image_placeholders(prompt: str, image_token: str, tokens_per_image: int, num_images: int) -> str:
    """Replace each `image_token` in `prompt` with `tokens_per_image` copies, as `LlavaProcessor.__call__`
    does. Placeholders are counted like transformers counts them (`str.count`, non-overlapping)."""
    return expand_placeholders(prompt, image_token, [tokens_per_image] * num_images)


def expand_placeholders(prompt: str, placeholder: str, counts: list[int], kind: str = "image") -> str:
    """Replace the i-th `placeholder` with `counts[i]` copies of itself (item i's token count), as HF's
    processors do (LlavaNextProcessor: one count per image, in order)."""
    found = prompt.count(placeholder)
    if found != len(counts):
        raise ValueError(
            f"prompt has {found} {placeholder} placeholder{'' if found == 1 else 's'} but {len(counts)} "
            f"{kind}{' was' if len(counts) == 1 else 's were'} given; give one {kind} per placeholder"
        )
    if any(c < 1 for c in counts):
        raise ValueError(f"each {kind} needs >= 1 token, got counts {counts}")
    parts = prompt.split(placeholder)
    return parts[0] + "".join(placeholder * c + part for c, part in zip(counts, parts[1:]))


# ----------------------------------------------------------------------------------------------
# Streaming detokenization
# ----------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns generated ids into text as they arrive; all `push` results + `flush()` == `decode(ids)`.

    Each push decodes a window, not the whole sequence (O(1) per token, not O(n)): the last
    `CONTEXT` frozen tokens plus the new ones, minus the text of those context tokens decoded alone.
    The window starts on a token boundary of a complete character, so decoders that act on the
    start of a sequence (Llama's leading-space strip) treat both decodes alike and the difference
    is the new tokens' text as a full decode gives it. Tokens are frozen once their text is final.
    The part of the text that can no longer change is returned. Held back:
    - trailing U+FFFD: an incomplete UTF-8 character (byte-level decoders);
    - a run of `<0xNN>` tokens at the end (ByteFallback decoders): ByteFallback decodes a run as a
      whole and turns ALL of it into U+FFFD when it is not valid UTF-8, even characters that were
      complete before the last byte arrived;
    - when decode cleans up tokenization spaces, the text from a space in the last 3 characters
      (a later token could still complete " 's", " n't", ...).
    """

    CONTEXT = 6  # frozen tokens decoded again with each window

    def __init__(self, text_processor: TextProcessor, skip_special_tokens: bool = True):
        self._tp = text_processor
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = ""
        self._frozen = 0  # ids[:frozen] have final text...
        self._frozen_text = ""  # ...this (their full decode)
        self._start = 0  # the window: ids[start:], start <= frozen - CONTEXT
        self._context_text = ""  # decode(ids[start:frozen]) alone

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        if self._in_byte_run():
            return ""
        raw = self._raw()
        out = self._emit(raw[: self._stable_length(raw)])
        if not raw.endswith(_REPLACEMENT_CHAR):
            self._freeze(raw)
        return out

    def flush(self) -> str:
        return self._emit(self._raw())

    def _decode(self, ids: list[int]) -> str:
        return self._tp.tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _raw(self) -> str:
        """decode(ids), from the frozen text and a window over the unfrozen tokens."""
        window = self._decode(self._ids[self._start:])
        if not window.startswith(self._context_text):  # a decoder that is not local here: decode it all
            return self._decode(self._ids)
        return self._frozen_text + window[len(self._context_text):]

    def _freeze(self, raw: str) -> None:
        """Every id so far has its final text (`raw`): the next window starts CONTEXT tokens back, or
        further while those decode to nothing (skipped special tokens: a decoder that strips the
        sequence's first space would otherwise strip the new text's)."""
        self._frozen, self._frozen_text = len(self._ids), raw
        self._start, self._context_text = self._frozen, ""
        while self._start > 0 and (self._frozen - self._start < self.CONTEXT or not self._context_text):
            self._start = max(0, self._start - self.CONTEXT)
            self._context_text = self._decode(self._ids[self._start:self._frozen])

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._emitted

    def _in_byte_run(self) -> bool:
        byte_ids = self._tp.byte_fallback_ids
        if not byte_ids:
            return False
        skipped = self._tp.special_ids if self._skip else frozenset()
        last = next((i for i in reversed(self._ids) if i not in skipped), None)
        return last in byte_ids

    def _stable_length(self, raw: str) -> int:
        end = len(raw.rstrip(_REPLACEMENT_CHAR))
        if self._tp.clean_up_tokenization_spaces:
            # Every cleanup pattern starts with a space and is <= 4 chars: text ending in 3 non-space
            # chars cleans up the same whatever follows.
            while " " in raw[max(0, end - 3) : end]:
                end = raw.index(" ", max(0, end - 3), end)
        return end

    def _emit(self, stable_raw: str) -> str:
        stable = clean_up_tokenization(stable_raw) if self._tp.clean_up_tokenization_spaces else stable_raw
        if not stable.startswith(self._emitted):
            raise RuntimeError("decoded text changed before the last emitted position; the decoder is not streamable")
        new, self._emitted = stable[len(self._emitted) :], stable
        return new
