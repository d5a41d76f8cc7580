"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`):
image splitting into tiles + a global image, pixel-shuffle connector.

    tiles [N,3,t,t] + patch positions [N,P] (computed on the host from the pixel masks,
    runtime/idefics3.py: HF's bucketize over float32 steps, which is not always the identity)
        -> vision (SigLIP-like ViT) -> [N,P,Cv] -> projector (connector: pixel shuffle + Linear) -> [N,P/s^2,C]
    prompt: each <image> -> <fake_token_around_image><row_r_col_c><image>*n ... <global-img><image>*n ...
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from vlmdeploy.runtime import idefics3
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec

from . import components as c
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles


class Idefics3VisionGraph(nn.Module):
    """(pixel_values [N,3,t,t], position_ids [N,P]) -> image_features [N,P,Cv]: HF's vision transformer
    with the positions given (every tile is whole: no patch mask); with `scores`, also
    attention_scores [N,P]: the mean attention each patch receives in the last layer (no [CLS]; the
    runtime maps them to the shuffled tokens, runtime/compress.py `block_scores`)."""

    def __init__(self, vision_model: nn.Module, scores: bool = False):
        super().__init__()
        self.vision, self.scores = vision_model, scores

    def forward(self, pixel_values, position_ids):
        emb = self.vision.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding(position_ids)  # [N, P, Cv]
        for block in self.vision.encoder.layers:  # the encoder's own loop, keeping the last layer's input
            last_input, x = x, block(x, None)
        features = self.vision.post_layernorm(x)
        if not self.scores:
            return features
        return features, c.block_attention_scores(self.vision, block, last_input).to(features.dtype)


class ConnectorGraph(nn.Module):
    """image_features [N,P,Cv] -> image_embeds [N,P/s^2,C] (pixel shuffle + modality projection)."""

    def __init__(self, connector: nn.Module):
        super().__init__()
        self.connector = connector

    def forward(self, image_features):
        return self.connector(image_features)


class Idefics3Export(LlavaStyleExport):
    family = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")

    def scored(self, model) -> bool:
        return c.has_attention_scores(model.model.vision_model)

    def model_class(self):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def _params(self, files: ProcessorFiles, model) -> idefics3.Idefics3Params:
        tokens = {**files.tokenizer_config, **files.processor}
        return idefics3.Idefics3Params.from_hf(files.image_processor, files.processor, model.config.to_dict(),
                                               special_tokens=tokens)

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        return self._params(files, model).to_dict()

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        tile = self._params(files, model).tile
        return tile, tile

    def feature_params(self, cfg) -> dict:
        """The connector reads the vision model's last hidden state; the runtime needs the patch size
        for the positions it computes."""
        return {"patch_size": cfg.vision_config.patch_size}

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        p = idefics3.Idefics3Params.from_dict(preprocess)
        per_tile = vision_tokens // model.config.scale_factor**2
        if p.image_seq_len != per_tile:
            raise c.ExportError(f"the processor writes {p.image_seq_len} <image> tokens per tile but the connector "
                                f"gives {per_tile} ({vision_tokens} patches / scale_factor^2)")
        return {"typical": p.image_token_count((p.tile, p.tile)), "tokens_per_tile": per_tile}

    def rows_per_image(self, preprocess: dict) -> int:
        p = idefics3.Idefics3Params.from_dict(preprocess)
        side = -(-p.longest_edge // p.tile)
        return side * side + 1

    def graph_specs(self, facts, model, log) -> dict[str, GraphSpec]:
        specs = super().graph_specs(facts, model, log)
        d, per_tile = facts.dims, facts.family_params["tokens_per_tile"]
        v = specs["vision"]
        specs["vision"] = GraphSpec("vision", (*v.inputs, TensorSpec("position_ids", "int64", ("num_images", d.vision_tokens))),
                                    v.outputs)
        specs["projector"] = GraphSpec("projector", specs["projector"].inputs,
                                       (TensorSpec("image_embeds", d.dtype, ("num_images", per_tile, d.hidden)),))
        return specs

    def graph_modules(self, model) -> dict[str, nn.Module]:
        return {
            "vision": Idefics3VisionGraph(model.model.vision_model, scores=self.scored(model)).eval(),
            "projector": ConnectorGraph(model.model.connector).eval(),
            "embed": c.EmbedGraph(model.get_input_embeddings()).eval(),
            "decoder": self.decoder_module(model),
        }

    def text_parts(self, model):
        return model.model.text_model, model.lm_head, model.config.get_text_config()

    def sample_feeds(self, name: str, spec: GraphSpec, dims: dict, facts, rng) -> dict:
        """The vision graph's positions: a whole tile's, as the runtime feeds them."""
        feeds = super().sample_feeds(name, spec, dims, facts, rng)
        if name == "vision":
            feeds["position_ids"] = _tile_positions(facts, dims["num_images"])
        return feeds

    def reference_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """HF's own vision path (its patch mask and position ids), as get_image_features runs it."""
        return _hf_vision(model, pixel_values).last_hidden_state

    def reference_scores(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """attention_scores' oracle: HF's last-layer attention (eager), head-averaged, mean over queries."""
        tower = model.model.vision_model
        before = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            return _hf_vision(model, pixel_values, attentions=True).attentions[-1].float().mean(1).mean(1)
        finally:
            tower.set_attn_implementation(before)

    def reference(self, model, graph: str, module: nn.Module, spec: GraphSpec):
        from .onnx_export import torch_reference

        if graph != "vision":
            return torch_reference(module, spec)

        def run(feeds):
            pixels = torch.from_numpy(feeds["pixel_values"])
            with torch.no_grad():
                out = [self.reference_features(model, pixels).numpy()]
                if len(spec.outputs) > 1:
                    out.append(self.reference_scores(model, pixels).numpy())
            return out

        return run


def _hf_vision(model, pixel_values: torch.Tensor, attentions: bool = False):
    """HF's vision transformer on whole tiles; `attentions`: with output_attentions."""
    mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.bool)
    size = model.config.vision_config.patch_size
    patches = mask.unfold(1, size, size).unfold(2, size, size).sum(dim=(-1, -2)) > 0
    return model.model.vision_model(pixel_values=pixel_values, patch_attention_mask=patches,
                                    output_attentions=attentions)


def _tile_positions(facts, n: int) -> np.ndarray:
    """[n, P] position ids of n whole tiles (runtime/idefics3.py patch_positions)."""
    h, w = facts.dims.image_size
    patch = facts.family_params["patch_size"]
    _, ids = idefics3.patch_positions(np.ones((n, h, w), np.int64), patch, h // patch)
    return ids


FAMILY = Idefics3Export()
