"""InternVL (`InternVLForConditionalGeneration`, e.g. InternVL3 on Qwen2): dynamic 448 tiles, pixel
shuffle + MLP.

    tiles [N,3,448,448] -> vision (InternViT; the feature layer's hidden states, CLS dropped) -> [N,T,Cv]
        -> projector (pixel shuffle: 2x2 neighbours into channels, then LayerNorm + MLP) -> [N,T/4,C]
    prompt: each <image> -> <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img> (runtime/internvl.py)
"""

from __future__ import annotations


import torch
from torch import nn

from vlmdeploy.runtime import internvl
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec

from . import components as c
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles


class InternVisionGraph(nn.Module):
    """pixel_values [N,3,H,W] -> image_features [N,T,Cv]: as InternVLModel.get_image_features before the shuffle;
    with `scores`, also attention_scores [N,T]: the feature layer's [CLS] attention row per patch (the
    runtime maps them to the shuffled tokens, runtime/compress.py `block_scores`)."""

    def __init__(self, tower: nn.Module, layer: int, strategy: str, scores: bool = False):
        super().__init__()
        self.tower, self.layer, self.strategy, self.scores = tower, layer, strategy, scores

    def forward(self, pixel_values):
        out = self.tower(pixel_values=pixel_values, output_hidden_states=self.layer != -1 or self.scores)
        features = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        features = features[:, 1:] if self.strategy == "default" else features
        if not self.scores:
            return features
        layer = c.feature_layers(self.layer, self.tower.config.num_hidden_layers)[0]  # hidden_states index
        scores = c.block_attention_scores(self.tower, self.tower.encoder.layer[layer - 1], out.hidden_states[layer - 1])
        return features, (scores[:, 1:] if self.strategy == "default" else scores).to(features.dtype)


class PixelShuffleProjector(nn.Module):
    """image_features [N,T,Cv] -> image_embeds [N,T*r^2,C]: HF's pixel_shuffle (r = downsample_ratio) + projector."""

    def __init__(self, model: nn.Module, ratio: float):
        super().__init__()
        self.model, self.ratio = model, ratio

    def forward(self, image_features):
        n, t, cv = image_features.shape
        side = int(round(t**0.5))
        x = self.model.pixel_shuffle(image_features.reshape(n, side, side, cv), scale_factor=self.ratio)
        return self.model.multi_modal_projector(x.reshape(n, -1, x.shape[-1]))


class InternVLExport(LlavaStyleExport):
    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)

    def scored(self, model) -> bool:
        return c.has_attention_scores(model.model.vision_tower)

    def model_class(self):
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def _params(self, files: ProcessorFiles, model) -> internvl.InternVLParams:
        return internvl.InternVLParams.from_hf(files.image_processor, files.processor, model.config.to_dict(),
                                               special_tokens=_named_tokens(files.tokenizer_config))

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        return self._params(files, model).to_dict()

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        return tuple(self._params(files, model).tile)

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        per_tile = int(vision_tokens * model.config.downsample_ratio**2)
        p = internvl.InternVLParams.from_dict(preprocess)
        if p.image_seq_length != per_tile:
            raise c.ExportError(f"the processor puts {p.image_seq_length} tokens per tile but the projector gives "
                                f"{per_tile} ({vision_tokens} patches x downsample_ratio^2)")
        return {"typical": p.image_tokens(tuple(p.tile)), "tokens_per_tile": per_tile}

    def model_facts(self, model, files: ProcessorFiles, tokenizer, dtype: str):
        """The placeholder is the context token itself (HF's InternVLProcessor.image_token)."""
        import dataclasses

        facts = super().model_facts(model, files, tokenizer, dtype)
        placeholder = self._params(files, model).context_image_token
        image = dataclasses.replace(facts.media["image"], placeholder=placeholder)
        return dataclasses.replace(facts, media={**facts.media, "image": image})

    def rows_per_image(self, preprocess: dict) -> int:
        p = internvl.InternVLParams.from_dict(preprocess)
        return p.max_patches + (1 if p.max_patches > 1 else 0)  # + the thumbnail

    def graph_specs(self, facts, model, log) -> dict[str, GraphSpec]:
        specs = super().graph_specs(facts, model, log)
        p, d = specs["projector"], facts.dims
        per_tile = facts.family_params["tokens_per_tile"]
        specs["projector"] = GraphSpec("projector", p.inputs,
                                       (TensorSpec("image_embeds", d.dtype, ("num_images", per_tile, d.hidden)),))
        return specs

    def graph_modules(self, model) -> dict[str, nn.Module]:
        cfg = model.config
        return {
            "vision": InternVisionGraph(model.model.vision_tower, cfg.vision_feature_layer,
                                        cfg.vision_feature_select_strategy, scores=self.scored(model)).eval(),
            "projector": PixelShuffleProjector(model.model, cfg.downsample_ratio).eval(),
            "embed": c.EmbedGraph(model.get_input_embeddings()).eval(),
            "decoder": self.decoder_module(model),
        }

    def reference_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = model.config
        return InternVisionGraph(model.model.vision_tower, cfg.vision_feature_layer,
                                 cfg.vision_feature_select_strategy)(pixel_values)


def _named_tokens(tokenizer_config: dict) -> dict:
    """InternVL's image tokens by name, from tokenizer_config.json (top level, or its extra_special_tokens dict)."""
    extra = tokenizer_config.get("extra_special_tokens")
    return {**tokenizer_config, **(extra if isinstance(extra, dict) else {})}


FAMILY = InternVLExport()
