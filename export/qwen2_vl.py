"""Qwen2-VL and Qwen2.5-VL: images and videos at their own resolution, M-RoPE in the decoder.

    patches [U, M, C*T*P*P] (U merged units of M = merge² patches, every item of a call)
      + patch positions [U, M, 2] + attention segments [U] (+ window segments [U], Qwen2.5-VL)
      -> vision (patch embed, ViT with rotary positions, attention within each frame / window,
         2x2 patch merger) -> image_embeds [U, C]
    input_ids [B,S] -> embed -> [B,S,C]; decoder takes position_ids [3, B, S] (temporal, height, width)

Everything HF computes from `grid_thw` inside the tower (positions, `cu_seqlens`, the window
index) is computed on the host (runtime/mrope.py) and fed as tensors: the graph has no loops and
no data-dependent shapes. The attention segments become a block-diagonal mask inside the graph.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from vlmdeploy.runtime.manifest import MediaKind, ModelFacts
from vlmdeploy.runtime.mrope import vision_inputs
from vlmdeploy.runtime.qwen_images import QwenVLPreprocessor
from vlmdeploy.runtime.video import FrameSampling
from vlmdeploy.runtime.spec import GraphSpec, ModelDims, TensorSpec, llava_graph_specs

from . import components as c
from .components import ExportError
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles


class QwenVisionGraph(nn.Module):
    """(pixel_values [U,M,Dp], vision_positions [U,M,2], segments [U](, windows [U])) -> image_embeds [U,C].
    HF's own submodules (patch embed, rotary table, blocks' weights, merger); attention with a mask."""

    def __init__(self, visual: nn.Module, windowed: bool):
        super().__init__()
        self.visual, self.windowed = visual, windowed
        self.full_blocks = set(getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks)))

    def forward(self, pixel_values, vision_positions, segments, windows=None):
        units, merge2, _ = pixel_values.shape
        x = self.visual.patch_embed(pixel_values.reshape(units * merge2, -1))  # [N, E]
        cos, sin = self.visual.rotary_pos_emb(x, vision_positions.reshape(-1, 2))  # [N, head_dim]
        full = _segment_mask(segments, merge2, x.dtype)  # [1, 1, N, N]
        window = _segment_mask(windows, merge2, x.dtype) if self.windowed else full
        for i, block in enumerate(self.visual.blocks):
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, full if i in self.full_blocks else window)
            x = x + block.mlp(block.norm2(x))
        return self.visual.merger(x)  # [U, C]

    @staticmethod
    def _attention(attn, x, cos, sin, mask):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, H, D]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, N, D]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out[0].transpose(0, 1).reshape(n, -1))


def _segment_mask(segments, merge2: int, dtype):
    """segments [U] -> additive mask [1, 1, N, N]: 0 within a segment, the dtype's min across."""
    per_patch = segments[:, None].expand(-1, merge2).reshape(-1)  # [N]
    same = per_patch[:, None] == per_patch[None, :]
    return torch.where(same, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


def validation_grids(units: int) -> list[tuple[int, int, int]]:
    """Item grids (t, h, w) that add up to `units` merged units: a 2-frame item, 3x4-unit images
    (several windows, partial ones included), then one row of the rest; so validation covers
    frames, items, per-item masks and window order."""
    grids, left = [], units
    if left >= 2:
        grids.append((2, 2, 2))
        left -= 2
    while left >= 12:
        grids.append((1, 6, 8))
        left -= 12
    if left:
        grids.append((1, 2, 2 * left))
    return grids

# num_units the vision graph is validated at (export) and run at (`vlmdeploy check`)
VISION_VALIDATION = [{"num_units": 1}, {"num_units": 3}, {"num_units": 30}]


class Qwen2VLExport(LlavaStyleExport):
    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def model_class(self):
        import transformers

        return transformers.AutoModelForImageTextToText

    # ---- what the manifest records ---------------------------------------------------------

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        """{"image": the image processor, "video": the video processor} (HF builds the video one from
        the image config when the checkpoint has no video config, with the video class's defaults)."""
        video = files.processor.get("video_processor") or files.image_processor
        pre = {"image": QwenVLPreprocessor.from_dict(files.image_processor),
               "video": QwenVLPreprocessor.from_dict(video, video=True)}
        v = model.config.vision_config
        for kind, p in pre.items():
            if (p.patch_size, p.merge_size, p.temporal_patch_size) != (v.patch_size, v.spatial_merge_size,
                                                                        v.temporal_patch_size):
                raise ExportError(f"the {kind} processor's patch/merge/temporal sizes ({p.patch_size}, {p.merge_size}, "
                                  f"{p.temporal_patch_size}) differ from the vision tower's ({v.patch_size}, "
                                  f"{v.spatial_merge_size}, {v.temporal_patch_size})")
        sampling = FrameSampling.from_dict({"video_processor_type": "Qwen2VLVideoProcessor", **video})
        return {**{kind: p.to_dict() for kind, p in pre.items()}, "video_sampling": dataclasses.asdict(sampling)}

    def model_facts(self, model, files: ProcessorFiles, tokenizer, dtype: str) -> ModelFacts:
        cfg, text, v = model.config, model.config.get_text_config(), model.config.vision_config
        pre = QwenVLPreprocessor.from_dict(self.preprocess(files, model)["image"])
        unit = v.patch_size * v.spatial_merge_size
        max_units = pre.max_pixels // unit**2
        typical = (448 // unit) ** 2  # a 448x448 image
        eos = c.eos_ids(model, files.generation_config)
        pad = files.generation_config.get("pad_token_id", text.pad_token_id)
        context = int(text.max_position_embeddings)
        windowed = cfg.model_type == "qwen2_5_vl"
        return ModelFacts(
            family=self.family,
            dims=self._dims(model, files, dtype),
            media={"image": MediaKind(files.processor.get("image_token", "<|image_pad|>"), int(cfg.image_token_id), typical),
                   "video": MediaKind(files.processor.get("video_token", "<|video_pad|>"), int(cfg.video_token_id),
                                      typical)},
            eos_token_ids=eos,
            pad_token_id=int(pad if pad is not None else (eos[0] if eos else 0)),
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            context_length=context,
            kv_layers=c.kv_layers(text),
            family_params={"merge_size": v.spatial_merge_size, "window_units": _window_units(v) if windowed else None,
                           "tokens_per_second": getattr(v, "tokens_per_second", None) if windowed else None,
                           "mrope_section": list(text.rope_parameters["mrope_section"])},
            positions="mrope",
            pipeline={"image": ["vision"], "video": ["vision"], "embed": "embed", "decoders": ["decoder_gqa", "decoder"]},
            limits={"seq": context, "total": context, "capacity": context, "past": context - 1,
                    "batch": None, "num_units": None, "num_images": None, "rows_per_image": max_units},
        )

    def _dims(self, model, files: ProcessorFiles, dtype: str) -> ModelDims:
        text, v = model.config.get_text_config(), model.config.vision_config
        unit = v.patch_size * v.spatial_merge_size
        return ModelDims(
            image_size=(unit, unit), vision_tokens=1,  # one merged unit of unit x unit pixels = one token
            vision_hidden=getattr(v, "embed_dim", None) or v.hidden_size,
            hidden=text.hidden_size, vocab=text.vocab_size, num_layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=c.head_dim(text), dtype=dtype,
        )

    # ---- graphs ----------------------------------------------------------------------------

    def graph_specs(self, facts: ModelFacts, model, log) -> dict[str, GraphSpec]:
        d, v = facts.dims, model.config.vision_config
        f, merge2 = d.dtype, v.spatial_merge_size**2
        patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
        inputs = [TensorSpec("pixel_values", f, ("num_units", merge2, patch)),
                  TensorSpec("vision_positions", "int64", ("num_units", merge2, 2)),
                  TensorSpec("segments", "int64", ("num_units",))]
        if facts.family_params["window_units"] is not None:
            inputs.append(TensorSpec("windows", "int64", ("num_units",)))
        vision = GraphSpec("vision", tuple(inputs), (TensorSpec("image_embeds", f, ("num_units", d.hidden)),))
        specs = llava_graph_specs(d)
        del specs["projector"]  # the merger is the vision graph's last layer
        specs["vision"] = vision
        for name in ("decoder", "decoder_gqa"):  # position_ids [3, B, S]: temporal, height, width
            specs[name] = _with_3d_positions(specs[name])
        reason = c.decoder_gqa_spec_or_reason(specs, model.config.get_text_config(), d.dtype)
        if reason:
            log(f"{reason}; exporting the portable decoder only")
        return specs

    def graph_modules(self, model) -> dict[str, nn.Module]:
        windowed = model.config.model_type == "qwen2_5_vl"
        return {
            "vision": QwenVisionGraph(model.model.visual, windowed).eval(),
            "embed": c.EmbedGraph(model.get_input_embeddings()).eval(),
            "decoder": self.decoder_module(model),
        }

    def text_parts(self, model):
        return model.model.language_model, model.lm_head, model.config.get_text_config()

    def export_context(self, module: nn.Module, graph: str):
        import contextlib

        return contextlib.nullcontext()

    def validation_dims(self, name: str, spec: GraphSpec) -> list[dict]:
        return VISION_VALIDATION if name == "vision" else super().validation_dims(name, spec)

    def sample_feeds(self, name: str, spec: GraphSpec, dims: dict, facts: ModelFacts, rng):
        """The vision graph gets real host inputs for grids that fill `num_units` (validation_grids)."""
        from vlmdeploy.runtime.dummy import sample_feeds

        feeds = sample_feeds(spec, dims, facts, rng)
        if name == "vision":
            host = vision_inputs(validation_grids(dims["num_units"]), **_host_args(facts))
            feeds.update(vision_positions=host.positions, segments=host.segments)
            if host.windows is not None:
                feeds["windows"] = host.windows
        return feeds

    def reference(self, model, graph: str, module: nn.Module, spec: GraphSpec):
        """The vision graph against HF's own tower (its cu_seqlens/window code), on the same grids."""
        from .onnx_export import torch_reference

        if graph != "vision":
            return torch_reference(module, spec)
        facts_merge = model.config.vision_config.spatial_merge_size
        window = _window_units(model.config.vision_config) if model.config.model_type == "qwen2_5_vl" else None

        def run(feeds):
            units = feeds["pixel_values"].shape[0]
            grids = validation_grids(units)
            host = vision_inputs(grids, facts_merge, window)
            pixels = feeds["pixel_values"] if host.order is None else feeds["pixel_values"][host.restore]
            with torch.no_grad():
                out = model.model.visual(torch.from_numpy(pixels.reshape(-1, pixels.shape[-1])),
                                         grid_thw=torch.tensor(grids)).pooler_output.numpy()
            return [out if host.order is None else out[host.order]]

        return run

    def tensors(self, model, dtype: str) -> dict[str, np.ndarray]:
        return {}


def _with_3d_positions(spec: GraphSpec) -> GraphSpec:
    position_ids = TensorSpec("position_ids", "int64", (3, "batch", "seq"))
    inputs = tuple(position_ids if t.name == "position_ids" else t for t in spec.inputs)
    return GraphSpec(spec.name, inputs, spec.outputs, spec.dim_sums)


def _window_units(v) -> int:
    return v.window_size // v.spatial_merge_size // v.patch_size


def _host_args(facts: ModelFacts) -> dict:
    return {"merge": facts.family_params["merge_size"], "window_units": facts.family_params["window_units"]}


FAMILY = Qwen2VLExport()
