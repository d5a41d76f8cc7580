"""Seeded random-weight VLM checkpoints built from a TinyConfig: a real HF directory (safetensors,
config, tokenizer, processor, chat template) that every path of the tool treats as a checkpoint.

One builder per axis: the family (LLaVA-1.5, LLaVA-NeXT), the text backbone (Llama, Mistral,
Qwen2, Gemma, Phi-3) and the vision tower (CLIP, SigLIP, DINOv2), each with its HF image processor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .recipes import TinyConfig
from .tiny_tokenizer import (IDEFICS3_CHAT_TEMPLATE, IDEFICS3_SPECIALS, INTERNVL_CHAT_TEMPLATE, INTERNVL_NAMED, INTERNVL_SPECIALS, LLAVA_CHAT_TEMPLATE,
                             ONEVISION_CHAT_TEMPLATE, ONEVISION_SPECIALS, QWEN2_VL_CHAT_TEMPLATE, build_tiny_tokenizer)

MLLAMA_SPECIALS = ("<pad>", "<|image|>")  # the pad token; mllama's image token (the tokenizer's last id)
MLLAMA_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace("<image>\n", "<|image|>")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# tokens a tower puts before its patches (what LlavaProcessor's num_additional_image_tokens counts)
EXTRA_TOKENS = {"clip": 1, "siglip": 0, "dinov2": 1}


def text_config(cfg: TinyConfig, pad_token_id: int):
    import transformers

    common = dict(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.context_length, bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id,
        initializer_range=0.1,  # peaked logits: greedy ties between near-equal tokens would make parity flaky
    )
    extra = {
        "llama": {}, "qwen2": {"use_sliding_window": False},
        "mistral": {"sliding_window": cfg.sliding_window, "head_dim": cfg.text_hidden // cfg.text_heads},
        "gemma": {"head_dim": cfg.text_hidden // cfg.text_heads, "hidden_activation": "gelu_pytorch_tanh"},
        "phi3": _phi3_rope(cfg),
    }[cfg.text_model]
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig",
           "phi3": "Phi3Config"}[cfg.text_model]
    return getattr(transformers, cls)(**common, **extra)


def _phi3_rope(cfg: TinyConfig) -> dict:
    """Plain RoPE, or LongRoPE (short factors up to `longrope_original` positions, long beyond: HF
    switches per call on the batch's largest position)."""
    if cfg.longrope_original is None:
        return {"original_max_position_embeddings": cfg.context_length}
    half = cfg.text_hidden // cfg.text_heads // 2
    factors = {"short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.3 * i for i in range(half)]}
    return {"original_max_position_embeddings": cfg.longrope_original, "rope_scaling": {"type": "longrope", **factors}}


def vision_config(cfg: TinyConfig):
    import transformers

    common = dict(hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size)
    mlp = cfg.vision_intermediate or 2 * cfg.vision_hidden
    if cfg.vision_model == "clip":
        return transformers.CLIPVisionConfig(intermediate_size=mlp, projection_dim=cfg.vision_hidden, **common)
    if cfg.vision_model == "siglip":
        return transformers.SiglipVisionConfig(intermediate_size=mlp, **common)
    return transformers.Dinov2Config(mlp_ratio=mlp // cfg.vision_hidden, **common)


def image_processor(cfg: TinyConfig):
    import transformers

    s = cfg.image_size
    crop = {"height": s, "width": s}
    if cfg.family == "llava_next":
        return transformers.LlavaNextImageProcessor(
            size={"shortest_edge": s}, crop_size=crop, image_grid_pinpoints=[list(p) for p in _pinpoints(cfg)],
            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    if cfg.vision_model == "siglip":
        return transformers.SiglipImageProcessor(size=crop)
    if cfg.vision_model == "dinov2":
        return transformers.BitImageProcessor(size={"shortest_edge": s}, crop_size=crop, image_mean=IMAGENET_MEAN,
                                              image_std=IMAGENET_STD)
    common = dict(size={"shortest_edge": s}, crop_size=crop, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return transformers.LlavaImageProcessor(do_pad=True, **common) if cfg.do_pad else transformers.CLIPImageProcessor(**common)


def _pinpoints(cfg: TinyConfig) -> tuple[tuple[int, int], ...]:
    s = cfg.image_size
    return cfg.grid_pinpoints or ((s, 2 * s), (2 * s, s), (2 * s, 2 * s))


def vlm_config(cfg: TinyConfig, image_token_id: int, pad_token_id: int):
    import transformers

    common = dict(
        vision_config=vision_config(cfg), text_config=text_config(cfg, pad_token_id), image_token_id=image_token_id,
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
    )
    if cfg.family == "llava_next":
        return transformers.LlavaNextConfig(image_grid_pinpoints=[list(p) for p in _pinpoints(cfg)], **common)
    return transformers.LlavaConfig(**common)


def tiny_processor(cfg: TinyConfig, tokenizer):
    import transformers

    cls = transformers.LlavaNextProcessor if cfg.family == "llava_next" else transformers.LlavaProcessor
    return cls(
        image_processor=image_processor(cfg), tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=EXTRA_TOKENS[cfg.vision_model], chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Rotary pairs per axis (temporal, height, width) in Qwen2-VL's proportions (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def qwen_vl_config(cfg: TinyConfig, tokenizer):
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head_dim = cfg.text_hidden // cfg.text_heads
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                num_key_value_heads=cfg.text_kv_heads, max_position_embeddings=cfg.context_length,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)})
    common = dict(depth=cfg.vision_layers, num_heads=cfg.vision_heads, patch_size=cfg.patch_size,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    if cfg.family == "qwen2_5_vl":
        vision = dict(common, hidden_size=cfg.vision_hidden, out_hidden_size=cfg.text_hidden,
                      intermediate_size=cfg.vision_intermediate or 2 * cfg.vision_hidden, window_size=cfg.window_size,
                      fullatt_block_indexes=[cfg.vision_layers - 1], tokens_per_second=2)
        return transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    vision = dict(common, embed_dim=cfg.vision_hidden, hidden_size=cfg.text_hidden, mlp_ratio=2)
    return transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)


def qwen_vl_processor(cfg: TinyConfig, tokenizer):
    """Qwen2VLProcessor without its video processor (that needs torchvision: shared/FACTS.md)."""
    import transformers

    image = transformers.Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                               patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2)
    cls = transformers.Qwen2_5_VLProcessor if cfg.family == "qwen2_5_vl" else transformers.Qwen2VLProcessor
    cls.check_argument_for_proper_class = lambda *a, **k: None
    processor = cls(image_processor=image, tokenizer=tokenizer, video_processor=None,
                    chat_template=QWEN2_VL_CHAT_TEMPLATE)
    processor.get_attributes = lambda: ["image_processor", "tokenizer"]
    return processor


def build_tiny_qwen_vl(cfg: TinyConfig):
    import transformers

    tokenizer = build_tiny_tokenizer(cfg.vocab_size, qwen=True)
    config = qwen_vl_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    cls = "Qwen2_5_VLForConditionalGeneration" if cfg.family == "qwen2_5_vl" else "Qwen2VLForConditionalGeneration"
    model = getattr(transformers, cls)(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, qwen_vl_processor(cfg, tokenizer)


def build_tiny_onevision(cfg: TinyConfig):
    """LLaVA-OneVision: SigLIP tower, Qwen2 text, anyres_max tiles, <image> and <video> tokens."""
    import transformers

    tokenizer = build_tiny_tokenizer(cfg.vocab_size, qwen=True, specials=ONEVISION_SPECIALS)
    pinpoints = [list(p) for p in _pinpoints(cfg)]
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision_config(cfg), text_config=text_config(cfg, tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio=f"anyres_max_{cfg.onevision_max_tiles}",
    )
    config.text_config.eos_token_id, config.text_config.bos_token_id = tokenizer.eos_token_id, None
    torch.manual_seed(cfg.seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    s = cfg.image_size
    image = transformers.LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    cls = transformers.LlavaOnevisionProcessor
    cls.check_argument_for_proper_class = lambda *a, **k: None  # no video processor: it needs torchvision
    processor = cls(image_processor=image, tokenizer=tokenizer, video_processor=None,
                    num_image_tokens=(s // cfg.patch_size) ** 2, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                    vision_aspect_ratio=f"anyres_max_{cfg.onevision_max_tiles}", chat_template=ONEVISION_CHAT_TEMPLATE)
    processor.get_attributes = lambda: ["image_processor", "tokenizer"]
    return model, processor


def build_tiny_blip2(cfg: TinyConfig):
    """BLIP-2: BLIP ViT, a 2-layer Q-Former with `num_query_tokens` queries, OPT."""
    import transformers

    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    text = transformers.OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, word_embed_proj_dim=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, ffn_dim=cfg.text_intermediate,
        max_position_embeddings=cfg.context_length, pad_token_id=tokenizer.pad_token_id, bos_token_id=1,
        eos_token_id=2, init_std=0.1)
    vision = transformers.Blip2VisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                                            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                            image_size=cfg.image_size, patch_size=cfg.patch_size)
    qformer = transformers.Blip2QFormerConfig(hidden_size=cfg.vision_hidden, num_hidden_layers=2,
                                              num_attention_heads=cfg.vision_heads,
                                              intermediate_size=2 * cfg.vision_hidden, encoder_hidden_size=cfg.vision_hidden)
    config = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                      text_config=text.to_dict(), num_query_tokens=cfg.num_query_tokens,
                                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(cfg.seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF's init leaves the queries at zero and the vision output ~1e-6: the image would not matter
        for name, param in model.named_parameters():
            if not name.startswith("language_model."):
                param.normal_(0, 0.2)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    s = cfg.image_size
    image = transformers.BlipImageProcessor(size={"height": s, "width": s})
    processor = transformers.Blip2Processor(image_processor=image, tokenizer=tokenizer,
                                            num_query_tokens=cfg.num_query_tokens)
    return model, processor


def build_tiny_internvl(cfg: TinyConfig):
    """InternVL: an InternViT (CLS + patches), pixel shuffle 0.5, Qwen2; GotOcr2 tiles of image_size."""
    import transformers

    base = build_tiny_tokenizer(cfg.vocab_size, qwen=True, specials=INTERNVL_SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left", clean_up_tokenization_spaces=False, extra_special_tokens=INTERNVL_NAMED)
    seq = (cfg.image_size // cfg.patch_size) ** 2 // 4
    vision = dict(hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  intermediate_size=2 * cfg.vision_hidden, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  initializer_range=0.1)
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text_config(cfg, tokenizer.pad_token_id).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    config.text_config.eos_token_id, config.text_config.bos_token_id = tokenizer.eos_token_id, None
    torch.manual_seed(cfg.seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # a milder projector: at init scale every image drives the tiny LM to one repeated token
        for param in model.model.multi_modal_projector.parameters():
            param.mul_(0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    s = cfg.image_size
    image = transformers.GotOcr2ImageProcessor(size={"height": s, "width": s}, max_patches=cfg.internvl_max_tiles)
    cls = transformers.InternVLProcessor
    cls.check_argument_for_proper_class = lambda *a, **k: None  # no video processor: it needs torchvision
    processor = cls(image_processor=image, tokenizer=tokenizer, video_processor=None, image_seq_length=seq,
                    chat_template=INTERNVL_CHAT_TEMPLATE)
    processor.get_attributes = lambda: ["image_processor", "tokenizer"]
    return model, processor


def build_tiny_idefics3(cfg: TinyConfig):
    """Idefics3 or SmolVLM (family "smolvlm"): a SigLIP-like ViT of image_size tiles, pixel shuffle 2, Llama;
    images split into up to 3x3 tiles (longest edge 3 x image_size) + a global tile."""
    import transformers

    tokenizer = build_tiny_tokenizer(cfg.vocab_size, specials=IDEFICS3_SPECIALS)
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  initializer_range=0.1)
    smol = cfg.family == "smolvlm"
    config = getattr(transformers, "SmolVLMConfig" if smol else "Idefics3Config")(
        vision_config=vision, text_config=text_config(cfg, tokenizer.pad_token_id).to_dict(), scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IDEFICS3_SPECIALS[0]))
    torch.manual_seed(cfg.seed)
    model = getattr(transformers, "SmolVLMForConditionalGeneration" if smol else "Idefics3ForConditionalGeneration")(config).eval()
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, tokenizer.pad_token_id
    ip = {"size": {"longest_edge": 3 * cfg.image_size}, "max_image_size": {"longest_edge": cfg.image_size}}
    seq = (cfg.image_size // cfg.patch_size) ** 2 // 4
    if smol:
        cls = transformers.SmolVLMProcessor
        cls.check_argument_for_proper_class = lambda *a, **k: None  # no video processor: it needs torchvision
        processor = cls(transformers.SmolVLMImageProcessor(**ip), tokenizer, None, image_seq_len=seq,
                        chat_template=IDEFICS3_CHAT_TEMPLATE)
        processor.get_attributes = lambda: ["image_processor", "tokenizer"]
    else:
        processor = transformers.Idefics3Processor(transformers.Idefics3ImageProcessor(**ip), tokenizer,
                                                   image_seq_len=seq, chat_template=IDEFICS3_CHAT_TEMPLATE)
    return model, processor


def build_tiny_idefics2(cfg: TinyConfig):
    """Idefics2: a SigLIP-like ViT, an MLP + perceiver resampler with `num_query_tokens` latents, Mistral;
    images resized to 1..2 x image_size on their longest edge and padded (pixel masks)."""
    import transformers

    tokenizer = build_tiny_tokenizer(cfg.vocab_size, specials=(*IDEFICS3_SPECIALS[:3], "<end_of_utterance>"))
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  initializer_range=0.1)
    perceiver = dict(hidden_act="silu", hidden_size=cfg.text_hidden, rms_norm_eps=1e-6, resampler_n_latents=cfg.num_query_tokens,
                     resampler_depth=2, resampler_n_heads=cfg.text_heads, resampler_head_dim=cfg.text_hidden // cfg.text_heads,
                     num_key_value_heads=cfg.text_kv_heads, initializer_range=0.1)
    text = text_config(dataclasses.replace(cfg, text_model="mistral"), tokenizer.pad_token_id).to_dict()
    config = transformers.Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                                         image_token_id=tokenizer.convert_tokens_to_ids(IDEFICS3_SPECIALS[0]))
    torch.manual_seed(cfg.seed)
    model = transformers.Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF's init leaves the latents at zero-ish: every image would read alike
        model.model.connector.perceiver_resampler.latents.normal_(0, 1)
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, tokenizer.pad_token_id
    image = transformers.Idefics2ImageProcessor(size={"shortest_edge": cfg.patch_size * 2, "longest_edge": 2 * cfg.image_size},
                                                do_image_splitting=cfg.do_image_splitting)
    processor = transformers.Idefics2Processor(image, tokenizer, image_seq_len=cfg.num_query_tokens,
                                               chat_template=IDEFICS3_CHAT_TEMPLATE)
    return model, processor


def build_tiny_mllama(cfg: TinyConfig):
    """mllama: a tiled ViT (local + gated global layers, intermediate layers concatenated), a Llama whose
    layers 1 and 3 (of 4) cross-attend to the vision states; every gate drawn non-zero (HF inits them to 0,
    which would hide the vision path). As in Llama-3.2-Vision, <|image|> is id vocab_size: embedded (the
    embedding has vocab_size + 8 rows) but outside the logits."""
    import transformers

    tokenizer = build_tiny_tokenizer(cfg.vocab_size, specials=MLLAMA_SPECIALS)
    image_token_id = tokenizer.convert_tokens_to_ids(MLLAMA_SPECIALS[1])
    if image_token_id != len(tokenizer) - 1:
        raise ValueError(f"<|image|> must be the tokenizer's last token (id {len(tokenizer) - 1}), got id {image_token_id}")
    intermediate = [0, cfg.vision_layers - 1]
    vision = transformers.MllamaVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_global_layers=2, attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        max_num_tiles=4, intermediate_layers_indices=intermediate,
        vision_output_dim=cfg.vision_hidden * (1 + len(intermediate)), initializer_range=0.1)
    text = transformers.MllamaTextConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate, num_hidden_layers=4,
        cross_attention_layers=[1, 3], num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
        vocab_size=image_token_id, max_position_embeddings=cfg.context_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=2, pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)
    torch.manual_seed(cfg.seed)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate" in name:
                param.uniform_(0.3, 1.2)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, tokenizer.pad_token_id
    image = transformers.MllamaImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size},
                                                 max_image_tiles=4)
    return model, transformers.MllamaProcessor(image, tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE)


def build_tiny_model(cfg: TinyConfig):
    """(model, processor) with seeded random weights."""
    import transformers

    if cfg.family in ("qwen2_vl", "qwen2_5_vl"):
        return build_tiny_qwen_vl(cfg)
    if cfg.family == "llava_onevision":
        return build_tiny_onevision(cfg)
    if cfg.family == "blip2":
        return build_tiny_blip2(cfg)
    if cfg.family == "internvl":
        return build_tiny_internvl(cfg)
    if cfg.family in ("idefics3", "smolvlm"):
        return build_tiny_idefics3(cfg)
    if cfg.family == "idefics2":
        return build_tiny_idefics2(cfg)
    if cfg.family == "mllama":
        return build_tiny_mllama(cfg)

    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {cfg.vocab_size}")
    config = vlm_config(cfg, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    cls = "LlavaNextForConditionalGeneration" if cfg.family == "llava_next" else "LlavaForConditionalGeneration"
    model = getattr(transformers, cls)(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tiny_processor(cfg, tokenizer)


def build_tiny_checkpoint(cfg: TinyConfig, out: Path):
    model, processor = build_tiny_model(cfg)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor
