"""The parts every LLaVA-style family exports: vision tower (CLIP, SigLIP, DINOv2), projector,
token embedding, the portable decoder for any HF text model, and the facts the manifest records.

    pixel_values [N,3,H,W] -> VisionGraph -> [N,T,Cv] -> ProjectorGraph -> [N,T,C]
    input_ids [B,S] -> EmbedGraph -> [B,S,C]
    (inputs_embeds, attention_mask, position_ids, past k/v...) -> DecoderGraph -> logits, present k/v...

A family module (export/llava.py, export/llava_next.py) composes these; adapters for the towers and
text models are data here (which attribute holds the layer list), not branches in the families.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from vlmdeploy.runtime.manifest import KVLayer
from vlmdeploy.runtime.spec import GraphSpec


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why."""


# vision tower model_type -> the encoder attribute that holds its layer list
TOWER_LAYER_LISTS = {"clip_vision_model": "layers", "siglip_vision_model": "layers", "dinov2": "layer"}


def tower_layers(tower: nn.Module) -> tuple[nn.Module, str]:
    """(the encoder, the name of its layer list) for a supported vision tower."""
    kind = tower.config.model_type
    if kind not in TOWER_LAYER_LISTS:
        raise ExportError(f"vision tower {kind!r} is not supported; supported: {sorted(TOWER_LAYER_LISTS)}")
    return tower.encoder, TOWER_LAYER_LISTS[kind]


def feature_layers(vision_feature_layer, num_layers: int) -> list[int]:
    """HF hidden_states indices (0 = embeddings, L = last layer) as non-negative ints."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    return [layer % (num_layers + 1) for layer in layers]


@contextlib.contextmanager
def truncated_encoder(tower: nn.Module, keep: int):
    """Run only the first `keep` encoder layers: layers after the feature layer are never exported."""
    encoder, attr = tower_layers(tower)
    layers = getattr(encoder, attr)
    setattr(encoder, attr, nn.ModuleList(list(layers)[:keep]))
    try:
        yield tower
    finally:
        setattr(encoder, attr, layers)


def select_features(hidden_states, layers: list[int], strategy: str) -> torch.Tensor:
    """HF LLaVA's rule: the feature layer(s)' hidden states, CLS (first token) dropped for "default"."""
    picked = [hidden_states[i] for i in layers]  # each [N, 1+P, Cv]
    if strategy == "default":
        picked = [h[:, 1:] for h in picked]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


# towers whose attention can be scored (attention_scores below); value: whether the tower has a [CLS]
# token (the scores are its attention row; else the mean attention each token receives)
SCORED_TOWERS = {"clip_vision_model": True, "siglip_vision_model": False, "internvl_vision": True,
                 "idefics3_vision": False, "smolvlm_vision": False}
# where a layer keeps its pre-attention norm and its attention (q_proj, k_proj, num_heads, head_dim, scale)
ATTENTION_PARTS = {"internvl_vision": ("layernorm_before", "attention")}  # others: layer_norm1, self_attn


def has_attention_scores(tower: nn.Module) -> bool:
    return tower.config.model_type in SCORED_TOWERS


def attention_scores(tower: nn.Module, hidden_states, layer: int, strategy: str) -> torch.Tensor:
    """[N, T]: how much the last feature layer attends to each feature token (FasterVLM/VisPruner),
    head-averaged: the [CLS] row where the tower has one, else the mean over queries (attention
    received). `layer`: the hidden_states index of that layer's output (its input is layer - 1).
    Equals HF's output_attentions[layer - 1] reduced the same way (softmax in fp32 as HF's eager)."""
    encoder, attr = tower_layers(tower)
    block = getattr(encoder, attr)[layer - 1]
    scores = block_attention_scores(tower, block, hidden_states[layer - 1])  # [N, S]
    return (scores[:, 1:] if strategy == "default" else scores).to(hidden_states[0].dtype)


def block_attention_scores(tower: nn.Module, block: nn.Module, layer_input) -> torch.Tensor:
    """[N, S]: one encoder layer's head-averaged attention, reduced as `attention_scores` says.

        h = norm(layer_input) -> q, k [N, H, S, D] (InternViT: q/k norm first) -> softmax(q k^T * scale)
          -> mean over heads [N, S, S] -> the [CLS] row, or the mean over queries"""
    norm, attention = ATTENTION_PARTS.get(tower.config.model_type, ("layer_norm1", "self_attn"))
    attn, h = getattr(block, attention), getattr(block, norm)(layer_input)  # [N, S, Cv]
    n, s, _ = h.shape
    q = getattr(attn, "q_norm", nn.Identity())(attn.q_proj(h)).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = getattr(attn, "k_norm", nn.Identity())(attn.k_proj(h)).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1).mean(1)  # [N, S, S]
    return probs[:, 0] if SCORED_TOWERS[tower.config.model_type] else probs.mean(1)


class VisionGraph(nn.Module):
    """pixel_values [N,3,H,W] -> image_features [N,T,Cv]: hidden state(s) of the feature layer(s);
    with `scores`, also attention_scores [N,T] of the last feature layer (visual-token compression)."""

    def __init__(self, tower: nn.Module, vision_feature_layer, strategy: str, scores: bool = False):
        super().__init__()
        self.tower, self.strategy, self.scores = tower, strategy, scores
        self.layers = feature_layers(vision_feature_layer, tower.config.num_hidden_layers)

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        features = select_features(hidden, self.layers, self.strategy)
        if not self.scores:
            return features
        return features, attention_scores(self.tower, hidden, max(self.layers), self.strategy)

    def truncated(self):
        """Context: the tower runs only up to the last feature layer (for export)."""
        return truncated_encoder(self.tower, max(self.layers))


class ProjectorGraph(nn.Module):
    """image_features [N,T,Cv] -> image_embeds [N,T,C]."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, image_features):
        return self.projector(image_features)


class EmbedGraph(nn.Module):
    """input_ids [B,S] -> inputs_embeds [B,S,C] (raw embeddings: scales such as Gemma's are the decoder's)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids):
        return self.embedding(input_ids)


class DecoderGraph(nn.Module):
    """(inputs_embeds [B,S,C], attention_mask [B,P+S], position_ids [B,S], past k/v [B,Hkv,P,D]...)
    -> logits [B,S,V], present k/v [B,Hkv,P+S,D]... One graph for prefill (P = 0) and decode, for
    any HF text model that takes a DynamicCache. The cache keeps every position (sliding windows are
    applied by HF's attention mask, as in `generate`), so present is always past + seq."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, text_config):
        super().__init__()
        self.language_model, self.lm_head, self.text_config = language_model, lm_head, text_config
        self.num_layers = text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        from .patches import traceable_rope

        cache = DynamicCache()  # full layers: DynamicCache(config=...) would trim windowed layers
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        # while torch.export traces: stateless, traceable length-dependent RoPE (export/patches.py);
        # eager calls (the validation reference) run HF's own code
        rope = traceable_rope(self.language_model) if torch.compiler.is_exporting() else contextlib.nullcontext()
        with rope:
            out = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True,
            )
        logits = self.lm_head(out.last_hidden_state)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


def head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_layers(text) -> tuple[KVLayer, ...]:
    """Per-layer cache layout; `window` where the layer attends to a sliding window (Mistral: every
    layer; configs with `layer_types`: the "sliding_attention" ones)."""
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    types = getattr(text, "layer_types", None)
    return tuple(KVLayer(kv_heads, head_dim(text), window if types is None or types[i] == "sliding_attention" else None)
                 for i in range(text.num_hidden_layers))


def eos_ids(model, generation_config: dict) -> tuple[int, ...]:
    eos = generation_config.get("eos_token_id", model.config.get_text_config().eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return tuple(int(e) for e in eos)


def valid_positions(graph: str, feeds: dict, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Zero what padding makes meaningless: the decoder's logits and K/V at left-pad positions
    (a pad query attends to nothing; those values never reach a real token)."""
    if graph != "decoder":
        return outputs
    mask = feeds["attention_mask"].astype(bool)  # [B, P+S]
    seq = feeds["inputs_embeds"].shape[1]
    logits = np.where(mask[:, -seq:, None], outputs[0], 0)  # [B, S, V]
    kv = [np.where(mask[:, None, :, None], t, 0) for t in outputs[1:]]  # [B, H, P+S, D]
    return [logits, *kv]


def decoder_gqa_spec_or_reason(specs: dict[str, GraphSpec], text_config, dtype: str) -> str | None:
    """Drop decoder_gqa from `specs` when its builder cannot reproduce this text model; return why."""
    from .decoder_gqa import unsupported_reason

    reason = unsupported_reason(text_config, dtype)
    if reason is not None:
        specs.pop("decoder_gqa", None)
    return reason
