"""Read the processor-side files of a Hugging Face LLaVA checkpoint, in either layout.

transformers 5.x `save_pretrained`:
    processor_config.json   processor fields + the image processor nested under "image_processor"
    chat_template.jinja
transformers 4.x (the published llava-hf checkpoints):
    preprocessor_config.json   the image processor
    processor_config.json      processor fields (patch_size, vision_feature_select_strategy, ...)
    chat_template.json         {"chat_template": "..."}, or "chat_template" in tokenizer_config.json
Both: tokenizer.json, tokenizer_config.json, optionally generation_config.json.

Stdlib only: this is read before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_DIR = "chat_templates"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"

# Bookkeeping keys that differ between layouts but say nothing about preprocessing.
_BOOKKEEPING_KEYS = ("processor_class", "auto_map")


@dataclass(frozen=True)
class ProcessorFiles:
    """Everything a runtime needs from the processor side of a checkpoint.

    image_processor:   the HF image processor dict (size, crop_size, image_mean/std, resample, do_* flags,
                       image_processor_type)
    processor:         processor fields (patch_size, num_additional_image_tokens,
                       vision_feature_select_strategy, image_token, ...); {} for old 4.x checkpoints
                       that have no processor_config.json
    chat_template:     the default chat template, or None
    tokenizer_json:    path of tokenizer.json
    tokenizer_config:  tokenizer_config.json ({} if absent), without its "chat_template"
    generation_config: generation_config.json ({} if absent)
    """

    image_processor: dict[str, Any]
    processor: dict[str, Any]
    chat_template: str | None
    tokenizer_json: Path
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]


def read_processor_files(checkpoint_dir: str | Path) -> ProcessorFiles:
    """Read a checkpoint's processor files, whichever transformers generation saved them."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    tokenizer_json = root / TOKENIZER_JSON
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"{root} has no {TOKENIZER_JSON}; the runtime needs the fast-tokenizer file "
            f"(save the tokenizer with transformers' save_pretrained to write it)"
        )
    processor_config = _read_json(root / PROCESSOR_CONFIG) or {}
    tokenizer_config = _read_json(root / TOKENIZER_CONFIG) or {}
    image_processor, processor = _split_processor_config(root, processor_config)
    return ProcessorFiles(
        image_processor=image_processor,
        processor=processor,
        chat_template=_find_chat_template(root, processor_config, tokenizer_config),
        tokenizer_json=tokenizer_json,
        tokenizer_config={k: v for k, v in tokenizer_config.items() if k != "chat_template"},
        generation_config=_read_json(root / GENERATION_CONFIG) or {},
    )


def save_runtime_tokenizer_json(hf_tokenizer: Any, path: str | Path) -> Path:
    """Write the backend of a LOADED transformers tokenizer as the runtime's tokenizer.json.

    Copying the checkpoint's tokenizer.json is not enough: transformers 5.x rebuilds the pipeline on
    load for model-specific classes. llava-hf checkpoints say `"tokenizer_class": "LlamaTokenizer"`,
    and 5.x's `LlamaTokenizer` keeps only vocab, merges and post-processor from tokenizer.json and
    builds its own normalizer (none), Metaspace pre-tokenizer and decoder; a legacy tokenizer.json
    (normalizer Prepend("▁")) then encodes text after `<image>` differently. Serializing the loaded
    backend bakes that in, so the runtime encodes exactly what `AutoTokenizer.from_pretrained` does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.backend_tokenizer.save(str(path))
    return path


def _split_processor_config(root: Path, processor_config: dict) -> tuple[dict, dict]:
    """(image processor dict, processor fields) from the 5.x nested or the 4.x split layout."""
    processor = {
        k: v
        for k, v in processor_config.items()
        if k not in ("image_processor", "chat_template", *_BOOKKEEPING_KEYS)
    }
    nested = processor_config.get("image_processor")
    if isinstance(nested, dict):
        return _strip_bookkeeping(nested), processor
    preprocessor = _read_json(root / PREPROCESSOR_CONFIG)
    if preprocessor is None:
        raise FileNotFoundError(
            f"{root} has no image processor config: looked for an \"image_processor\" entry in "
            f"{PROCESSOR_CONFIG} (transformers 5.x) and for {PREPROCESSOR_CONFIG} (transformers 4.x)"
        )
    return _strip_bookkeeping(preprocessor), processor


def _find_chat_template(root: Path, processor_config: dict, tokenizer_config: dict) -> str | None:
    """The processor's default chat template, looked up in the order transformers' processor uses.

    processor_config.json "chat_template" > chat_template.json (legacy) > chat_template.jinja >
    chat_templates/default.jinja; tokenizer_config.json last (4.x checkpoints that kept it there;
    transformers' processor would not see it, its tokenizer would, and both render it the same way).
    """
    candidates = (
        lambda: processor_config.get("chat_template"),
        lambda: (_read_json(root / CHAT_TEMPLATE_JSON) or {}).get("chat_template"),
        lambda: _read_text(root / CHAT_TEMPLATE_JINJA),
        lambda: _read_text(root / CHAT_TEMPLATE_DIR / "default.jinja"),
        lambda: tokenizer_config.get("chat_template"),
    )
    for candidate in candidates:
        template = _default_template(candidate())
        if template is not None:
            return template
    return None


def _default_template(value: Any) -> str | None:
    """A template string, or the "default" one of a list of {"name", "template"} / a name->template dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {item["name"]: item["template"] for item in value}
    if isinstance(value, dict):
        return value.get("default")
    raise ValueError(f"chat_template must be a string, a list or a dict, got {type(value).__name__}")


def _strip_bookkeeping(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _BOOKKEEPING_KEYS}


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
