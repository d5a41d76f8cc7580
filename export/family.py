"""The export side of a LLaVA-style family (vision tower -> projector -> tokens in the prompt -> decoder).

`LlavaStyleExport` does everything LLaVA-1.5 needs; a family subclasses it and overrides what
differs (LLaVA-NeXT: the image processor, the per-image token count, the `image_newline` tensor).
The exporter (export/exporter.py) only calls these methods.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vlmdeploy.runtime.manifest import DEFAULT_PIPELINE, MediaKind, ModelFacts
from vlmdeploy.runtime.spec import GraphSpec, ModelDims, llava_graph_specs

from . import components as c
from .hf_files import ProcessorFiles


class LlavaStyleExport:
    family = ""  # the runtime family (manifest.model.family)
    architectures: tuple[str, ...] = ()

    def model_class(self):
        raise NotImplementedError

    # ---- what the manifest records ---------------------------------------------------------

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        """The runtime family's preprocessing parameters (manifest "preprocess")."""
        raise NotImplementedError

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        """family_params and the typical token count of one image: {"typical": n, **params}."""
        raise NotImplementedError

    def tensors(self, model, dtype: str) -> dict[str, np.ndarray]:
        """Extra arrays the runtime needs (stored as .npy, checksummed)."""
        return {}

    def rows_per_image(self, preprocess: dict) -> int:
        """Vision-graph rows (num_images) one image needs at most."""
        return 1

    def model_facts(self, model, files: ProcessorFiles, tokenizer, dtype: str) -> ModelFacts:
        cfg, text = model.config, model.config.get_text_config()
        preprocess = self.preprocess(files, model)
        dims = self._dims(model, files, dtype)
        tokens = self.image_tokens(files, model, preprocess, dims.vision_tokens)
        eos = c.eos_ids(model, files.generation_config)
        pad = files.generation_config.get("pad_token_id", text.pad_token_id)
        context = int(text.max_position_embeddings)
        return ModelFacts(
            family=self.family,
            dims=dims,
            media={"image": MediaKind(files.processor.get("image_token", "<image>"), int(cfg.image_token_id),
                                      tokens.pop("typical"))},
            eos_token_ids=eos,
            pad_token_id=int(pad if pad is not None else (eos[0] if eos else 0)),
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            context_length=context,
            kv_layers=self.kv_layers(text),
            family_params={**tokens, **self.feature_params(cfg)},
            positions="cumsum",
            pipeline=dict(DEFAULT_PIPELINE),
            tensors={name: f"{name}.npy" for name in self.tensors(model, dtype)},
            # every named dim of the graphs; None: the model sets no bound (build flags and budgets do)
            limits={"seq": context, "total": context, "capacity": context, "past": context - 1,
                    "batch": None, "num_images": None, "rows_per_image": self.rows_per_image(preprocess)},
        )

    def kv_layers(self, text) -> tuple:
        """The context cache's layers (manifest kv_layers: one per decoder KV input pair)."""
        return c.kv_layers(text)

    def feature_params(self, cfg) -> dict:
        """Which vision hidden states feed the projector (family_params; LLaVA's config fields)."""
        return {"vision_feature_layer": cfg.vision_feature_layer,
                "vision_feature_select_strategy": cfg.vision_feature_select_strategy}

    def _dims(self, model, files: ProcessorFiles, dtype: str) -> ModelDims:
        text = model.config.get_text_config()
        image_size = self.vision_input_size(files, model)
        with torch.no_grad():
            probe = self.reference_features(model, torch.zeros(1, 3, *image_size, dtype=model.dtype))
        return ModelDims(
            image_size=image_size, vision_tokens=probe.shape[1], vision_hidden=probe.shape[2],
            hidden=text.hidden_size, vocab=text.vocab_size, num_layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=c.head_dim(text), dtype=dtype,
        )

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        """(H, W) of one vision-graph row."""
        raise NotImplementedError

    # ---- graphs ----------------------------------------------------------------------------

    def graph_specs(self, facts: ModelFacts, model, log) -> dict[str, GraphSpec]:
        """All graphs; decoder_gqa only where its builder reproduces the text model exactly."""
        specs = llava_graph_specs(facts.dims, attention_scores=self.scored(model))
        reason = c.decoder_gqa_spec_or_reason(specs, model.config.get_text_config(), facts.dims.dtype)
        if reason:
            log(f"{reason}; exporting the portable decoder only")
        return specs

    def scored(self, model) -> bool:
        """Whether the vision graph returns attention_scores (visual-token compression's topk/merge):
        families whose graph_modules build c.VisionGraph on a CLIP/SigLIP tower say yes."""
        return False

    def graph_modules(self, model) -> dict[str, nn.Module]:
        cfg = model.config
        return {
            "vision": c.VisionGraph(model.model.vision_tower, cfg.vision_feature_layer,
                                    cfg.vision_feature_select_strategy, scores=self.scored(model)).eval(),
            "projector": c.ProjectorGraph(model.model.multi_modal_projector).eval(),
            "embed": c.EmbedGraph(model.get_input_embeddings()).eval(),
            "decoder": self.decoder_module(model),
        }

    def decoder_module(self, model) -> nn.Module:
        return c.DecoderGraph(*self.text_parts(model)).eval()

    def text_parts(self, model):
        """(base text model, lm_head, text config): what decoder_gqa is built from."""
        return model.model.language_model, model.lm_head, model.config.get_text_config()

    def export_context(self, module: nn.Module, graph: str):
        """A vision graph that can cut its tower after the last feature layer (c.VisionGraph) is traced cut."""
        import contextlib

        return module.truncated() if graph == "vision" and hasattr(module, "truncated") else contextlib.nullcontext()

    def reference_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """What HF feeds the projector, from the full (untruncated) tower: the vision graph's oracle."""
        cfg = model.config
        layers = c.feature_layers(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers)
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        return c.select_features(hidden, layers, cfg.vision_feature_select_strategy)

    def reference_scores(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """attention_scores' oracle: HF's own attention probabilities (eager attention, output_attentions)
        of the last feature layer, head-averaged; the [CLS] row, else the mean over queries."""
        cfg, tower = model.config, model.model.vision_tower
        layer = max(c.feature_layers(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers))
        before = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            probs = tower(pixel_values, output_attentions=True).attentions[layer - 1].float().mean(1)  # [N, S, S]
        finally:
            tower.set_attn_implementation(before)
        scores = probs[:, 0] if c.SCORED_TOWERS[tower.config.model_type] else probs.mean(1)
        return scores[:, 1:] if cfg.vision_feature_select_strategy == "default" else scores

    def validation_dims(self, name: str, spec: GraphSpec) -> list[dict]:
        """The dims graph `name` is validated at after export."""
        from vlmdeploy.runtime.dummy import validation_dims

        return validation_dims(spec)

    def sample_feeds(self, name: str, spec: GraphSpec, dims: dict, facts: ModelFacts, rng) -> dict:
        """Validation inputs for graph `name` at `dims` (random, by role: runtime/dummy.py)."""
        from vlmdeploy.runtime.dummy import sample_feeds

        return sample_feeds(spec, dims, facts, rng)

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

    valid_positions = staticmethod(c.valid_positions)
