"""Idefics2 (`Idefics2ForConditionalGeneration`): a perceiver resampler squeezes each image's patches
into a fixed number of latents.

    images padded to one square (the processor's longest edge) + pixel masks
      -> host: patch mask (a patch is on when all its pixels are) and patch positions (runtime/idefics2.py)
      -> vision (SigLIP-like ViT, padded patches masked out) -> [N,P,Cv]
      -> projector (modality MLP + perceiver resampler: L latents cross-attend to the on patches) -> [N,L,C]
    prompt: each <image> -> <fake_token_around_image> + <image> x L per crop (runtime/idefics2.py)
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from vlmdeploy.runtime import idefics2
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec

from . import components as c
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles


def _key_mask(patch_mask, dtype):
    """patch_mask [N,K] (1 on) -> additive attention mask [N,1,1,K]: 0 where on, the dtype's min where off."""
    on = patch_mask[:, None, None, :] > 0
    return torch.where(on, 0.0, torch.finfo(dtype).min).to(dtype)


class Idefics2VisionGraph(nn.Module):
    """(pixel_values [N,3,S,S], patch_mask [N,P], position_ids [N,P]) -> image_features [N,P,Cv]."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision = vision_model

    def forward(self, pixel_values, patch_mask, position_ids):
        emb = self.vision.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding(position_ids)
        x = self.vision.encoder(inputs_embeds=x, attention_mask=_key_mask(patch_mask, x.dtype)).last_hidden_state
        return self.vision.post_layernorm(x)


class ResamplerGraph(nn.Module):
    """(image_features [N,P,Cv], patch_mask [N,P]) -> image_embeds [N,L,C]: modality MLP, then the
    perceiver's L latents attending to [on patches; latents], as Idefics2PerceiverResampler."""

    def __init__(self, connector: nn.Module):
        super().__init__()
        self.connector = connector

    def forward(self, image_features, patch_mask):
        context = self.connector.modality_projection(image_features)  # [N, P, C]
        resampler = self.connector.perceiver_resampler
        latents = resampler.latents.unsqueeze(0).expand(context.shape[0], -1, -1)  # [N, L, C]
        keys = torch.cat([patch_mask, torch.ones(latents.shape[:2], dtype=patch_mask.dtype)], dim=-1)  # [N, P+L]
        mask = _key_mask(keys, latents.dtype)
        for layer in resampler.layers:
            latents = layer(latents, context, attention_mask=mask)
        return resampler.norm(latents)


class Idefics2Export(LlavaStyleExport):
    family = "idefics2"
    architectures = ("Idefics2ForConditionalGeneration",)

    def model_class(self):
        from transformers import Idefics2ForConditionalGeneration

        return Idefics2ForConditionalGeneration

    def _params(self, files: ProcessorFiles, model) -> idefics2.Idefics2Params:
        return idefics2.Idefics2Params.from_hf(files.image_processor, files.processor, model.config.to_dict())

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        return self._params(files, model).to_dict()

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        side = self._params(files, model).longest_edge  # every image is padded to this square
        return side, side

    def feature_params(self, cfg) -> dict:
        return {"patch_size": cfg.vision_config.patch_size,
                "patches_per_side": cfg.vision_config.image_size // cfg.vision_config.patch_size}

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        p = idefics2.Idefics2Params.from_dict(preprocess)
        latents = model.config.perceiver_config.resampler_n_latents
        if p.image_seq_len != latents:
            raise c.ExportError(f"the processor writes {p.image_seq_len} <image> tokens per crop but the resampler "
                                f"has {latents} latents")
        return {"typical": latents * (5 if p.do_image_splitting else 1), "tokens_per_tile": latents}

    def rows_per_image(self, preprocess: dict) -> int:
        return 5 if idefics2.Idefics2Params.from_dict(preprocess).do_image_splitting else 1

    def graph_specs(self, facts, model, log) -> dict[str, GraphSpec]:
        specs = super().graph_specs(facts, model, log)
        d, latents = facts.dims, facts.family_params["tokens_per_tile"]
        mask = TensorSpec("patch_mask", "int64", ("num_images", d.vision_tokens))
        v = specs["vision"]
        specs["vision"] = GraphSpec("vision", (*v.inputs, mask, TensorSpec("position_ids", "int64", ("num_images", d.vision_tokens))),
                                    v.outputs)
        specs["projector"] = GraphSpec("projector", (*specs["projector"].inputs, mask),
                                       (TensorSpec("image_embeds", d.dtype, ("num_images", latents, d.hidden)),))
        return specs

    def graph_modules(self, model) -> dict[str, nn.Module]:
        return {
            "vision": Idefics2VisionGraph(model.model.vision_model).eval(),
            "projector": ResamplerGraph(model.model.connector).eval(),
            "embed": c.EmbedGraph(model.get_input_embeddings()).eval(),
            "decoder": self.decoder_module(model),
        }

    def text_parts(self, model):
        return model.model.text_model, model.lm_head, model.config.get_text_config()

    def sample_feeds(self, name: str, spec: GraphSpec, dims: dict, facts, rng) -> dict:
        """Images padded to different extents: each row's patch mask and positions as the host computes them."""
        feeds = super().sample_feeds(name, spec, dims, facts, rng)
        if name in ("vision", "projector"):
            masks = _padded_masks(dims["num_images"], facts.dims.image_size[0], facts.family_params["patch_size"])
            patch_mask, positions = idefics2.patch_inputs(masks, facts.family_params["patch_size"],
                                                          facts.family_params["patches_per_side"])
            feeds["patch_mask"] = patch_mask.astype(np.int64)
            if name == "vision":
                feeds["position_ids"] = positions
        return feeds

    def reference_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def reference(self, model, graph: str, module: nn.Module, spec: GraphSpec):
        """HF's own vision model (its mask and positions from the patch mask) and connector."""
        from .onnx_export import torch_reference

        if graph == "vision":
            def run(feeds):
                n = feeds["pixel_values"].shape[0]
                h = w = feeds["pixel_values"].shape[-1] // model.config.vision_config.patch_size
                mask = torch.from_numpy(feeds["patch_mask"]).bool().reshape(n, h, w)
                with torch.no_grad():
                    return [model.model.vision_model(pixel_values=torch.from_numpy(feeds["pixel_values"]),
                                                     patch_attention_mask=mask).last_hidden_state.numpy()]
            return run
        if graph == "projector":
            def run(feeds):
                with torch.no_grad():
                    return [model.model.connector(torch.from_numpy(feeds["image_features"]),
                                                  attention_mask=torch.from_numpy(feeds["patch_mask"])).numpy()]
            return run
        return torch_reference(module, spec)

    def valid_positions(self, graph: str, feeds: dict, outputs: list) -> list:
        """The vision graph's rows at padded patches are never read (the resampler masks them): zero them."""
        if graph == "vision":
            return [np.where(feeds["patch_mask"][:, :, None] > 0, outputs[0], 0)]
        return c.valid_positions(graph, feeds, outputs)


def _padded_masks(n: int, side: int, patch: int) -> np.ndarray:
    """[n, side, side] pixel masks: image i covers the top-left (side - patch*i) x (side - patch*(i//2)) pixels."""
    masks = np.zeros((n, side, side), np.int64)
    for i in range(n):
        h, w = max(patch, side - patch * i), max(patch, side - patch * (i // 2))
        masks[i, :h, :w] = 1
    return masks


FAMILY = Idefics2Export()
