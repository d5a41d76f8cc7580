"""Seeded random-weight LLaVA checkpoints built from a TinyConfig: a real HF directory (safetensors,
config, tokenizer, processor, chat template) that every path of the tool treats as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .recipes import TinyConfig
from .tiny_tokenizer import LLAVA_CHAT_TEMPLATE, build_tiny_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_llava_config(cfg: TinyConfig, image_token_id: int, pad_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate or 2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.context_length, bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id,
        initializer_range=0.1,  # peaked logits: greedy ties between near-equal tokens would make parity flaky
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
    )


def tiny_processor(cfg: TinyConfig, tokenizer):
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor

    size = {"shortest_edge": cfg.image_size}
    crop = {"height": cfg.image_size, "width": cfg.image_size}
    common = dict(size=size, crop_size=crop, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    image_processor = LlavaImageProcessor(do_pad=True, **common) if cfg.do_pad else CLIPImageProcessor(**common)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_tiny_model(cfg: TinyConfig):
    """(model, processor) with seeded random weights."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {cfg.vocab_size}")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = tiny_llava_config(cfg, image_token_id, tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tiny_processor(cfg, tokenizer)


def build_tiny_checkpoint(cfg: TinyConfig, out: Path):
    model, processor = build_tiny_model(cfg)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor
