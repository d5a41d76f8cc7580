"""BLIP-2 (`Blip2ForConditionalGeneration`, OPT decoder): a Q-Former squeezes an image into a fixed
set of learned queries.

    pixel_values [N,3,H,W] -> vision (ViT, last hidden state) -> [N,1+P,Cv]
        -> projector (Q-Former: 32 learned queries cross-attend to the patches; language projection) -> [N,Q,C]
    input_ids [B,S] -> embed -> [B,S,C]; the Q query tokens go BEFORE the prompt's BOS, as HF's
    Blip2Processor puts them (runtime/families/blip2.py)

The OPT decoder is the portable one (its learned positions, +2 offset, are inside the traced
graph); decoder_gqa declines OPT with its one-line reason.
"""

from __future__ import annotations


import torch
from torch import nn

from vlmdeploy.runtime.images import ImagePreprocessor
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec

from . import components as c
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles


class Blip2VisionGraph(nn.Module):
    """pixel_values [N,3,H,W] -> image_features [N,1+P,Cv] (the vision model's last hidden state)."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class QFormerGraph(nn.Module):
    """image_features [N,1+P,Cv] -> image_embeds [N,Q,C]: the learned queries through the Q-Former,
    cross-attending to every patch, then the language projection."""

    def __init__(self, query_tokens: nn.Parameter, qformer: nn.Module, projection: nn.Module):
        super().__init__()
        self.query_tokens, self.qformer, self.projection = query_tokens, qformer, projection

    def forward(self, image_features):
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)  # [N, Q, Cq]
        mask = torch.ones(image_features.shape[:-1], dtype=torch.long)  # [N, 1+P]
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_features, encoder_attention_mask=mask)
        return self.projection(out.last_hidden_state.to(image_features.dtype))


class Blip2Export(LlavaStyleExport):
    family = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)

    def model_class(self):
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    def _preprocessor(self, files: ProcessorFiles) -> ImagePreprocessor:
        return ImagePreprocessor.from_hf_config(files.image_processor)

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        return self._preprocessor(files).to_dict()

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        return tuple(self._preprocessor(files).output_size)

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        queries = int(model.config.num_query_tokens)
        given = files.processor.get("num_query_tokens")
        if given is not None and int(given) != queries:
            raise c.ExportError(f"the processor prepends {given} image tokens but the model has {queries} queries")
        return {"typical": queries, "tokens_per_image": queries}

    def feature_params(self, cfg) -> dict:
        return {}  # the Q-Former reads the vision model's last hidden state

    def graph_specs(self, facts, model, log) -> dict[str, GraphSpec]:
        """LLaVA's graphs, except that the projector (the Q-Former) gives Q tokens, not one per patch."""
        specs = super().graph_specs(facts, model, log)
        p, q, d = specs["projector"], facts.family_params["tokens_per_image"], facts.dims
        specs["projector"] = GraphSpec("projector", p.inputs,
                                       (TensorSpec("image_embeds", d.dtype, ("num_images", q, d.hidden)),))
        return specs

    def graph_modules(self, model) -> dict[str, nn.Module]:
        return {
            "vision": Blip2VisionGraph(model.vision_model).eval(),
            "projector": QFormerGraph(model.query_tokens, model.qformer, model.language_projection).eval(),
            "embed": c.EmbedGraph(model.get_input_embeddings()).eval(),
            "decoder": self.decoder_module(model),
        }

    def text_parts(self, model):
        lm = model.language_model
        return lm.model, lm.lm_head, model.config.get_text_config()

    def decoder_module(self, model) -> nn.Module:
        lm = model.language_model
        return c.DecoderGraph(lm.model, lm.lm_head, model.config.get_text_config()).eval()

    def reference_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.vision_model(pixel_values=pixel_values).last_hidden_state

    def reference(self, model, graph: str, module: nn.Module, spec: GraphSpec):
        from .onnx_export import torch_reference

        return torch_reference(module, spec)


FAMILY = Blip2Export()
