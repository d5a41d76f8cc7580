"""mllama (`MllamaForConditionalGeneration`, Llama-3.2-Vision): cross-attention fusion. The text holds one
`<|image|>` token per image; some decoder layers (`cross_attention_layers`) attend to the vision states
through their own K/V instead of to the context.

    tiles [N,T,3,t,t] + aspect_ratio_ids [N] + aspect_ratio_mask [N,T]  (runtime/mllama.py; N = B * I slots)
      -> vision (patch conv, gated tile/position embeddings, local layers, gated global layers,
                 intermediate layers concatenated) -> vision_states [N,T,P,Cvo]
      -> host: [B,I,T,P,Cvo] (visual-token compression: each tile's rows to P' = [CLS] + K patches)
      -> cross_kv (projector, each cross layer's k_proj/k_norm and v_proj; once per request)
      -> cross_key_values.{j}.key/value [B,Hkv,I,T,P',D]
    decoder: (embeds, mask, positions, cross_attention_mask [B,S,I,T], past self-attention K/V...,
              cross K/V...) -> logits, present self-attention K/V...   (the cross K/V are inputs only)

The rows per tile are the dynamic dim `tile_rows` of cross_kv and the decoder (P out of the vision graph;
fewer under compression): the decoder expands each tile's mask entry to the rows its K/V has.

A batch with no image at all gets one image slot of zero K/V and an all-zero cross-attention mask: each
cross layer is then exactly the identity (attention over zero values is 0, o_proj has no bias, the MLP
row is masked out), as HF skips those layers (`_has_cached_cross_attention_states`). (Empty K/V, I = 0,
would say the same but ONNX Reshape reads a computed 0 as "copy this axis".)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from vlmdeploy.runtime import mllama
from vlmdeploy.runtime.manifest import ModelFacts
from vlmdeploy.runtime.spec import GraphSpec, ModelDims, TensorSpec, kv_names

from . import components as c
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles

GQA_REASON = ("decoder_gqa: mllama's cross-attention layers read a second KV source (the vision K/V), which the "
              "GroupQueryAttention builder does not emit")


def cross_kv_names(num_cross: int) -> list[str]:
    """The cross-attention K/V tensors, in graph order (key, value per cross layer)."""
    return [f"cross_key_values.{j}.{kv}" for j in range(num_cross) for kv in ("key", "value")]


def cross_layers(text) -> tuple[list[int], list[int]]:
    """(self-attention layer indices, cross-attention layer indices) of the text model."""
    cross = sorted(text.cross_attention_layers)
    return [i for i in range(text.num_hidden_layers) if i not in cross], cross


class MllamaVisionGraph(nn.Module):
    """(pixel_values [N,T,3,t,t], aspect_ratio_ids [N], aspect_ratio_mask [N,T]) -> vision_states [N,T,P,Cvo],
    attention_scores [N,T,P-1]: HF's vision model with each image slot as its own prompt (it flattens
    prompts x images anyway), and what the last layer's attention gives each tile's patches (`patch_scores`;
    its input is caught on the way, so the tower runs once)."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.last_attn = last_vision_layer(vision_model).self_attn

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        seen = {}  # the last layer's attention input: normed hidden states [N,S,C], additive mask [N,1,S,S]

        def catch(module, args, kwargs):
            seen.update(h=args[0], mask=kwargs["attention_mask"])

        hook = self.last_attn.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            out = self.vision_model(pixel_values=pixel_values[:, None], aspect_ratio_ids=aspect_ratio_ids[:, None],
                                    aspect_ratio_mask=aspect_ratio_mask[:, None]).last_hidden_state  # [N,1,T,P,Cvo]
        finally:
            hook.remove()
        t, p = out.shape[2:4]
        return out[:, 0], patch_scores(self.last_attn, seen["h"], seen["mask"], t, p).to(out.dtype)


def last_vision_layer(vision_model: nn.Module) -> nn.Module:
    """The tower's last layer: the last gated global layer (the local ones where there is none)."""
    return (list(vision_model.global_transformer.layers) or list(vision_model.transformer.layers))[-1]


def patch_scores(attn: nn.Module, h, mask, tiles: int, rows: int) -> torch.Tensor:
    """[N, T, P-1]: each tile's [CLS] attention to its own tile's patches in one layer, head-averaged
    (FasterVLM's [CLS] ranking, per tile; softmax in fp32 as HF's eager). Only the T [CLS] query rows are
    computed, not the whole S x S attention.

        h [N, S, C] (S = T x Pp, Pp = P + padding to 8) -> q at each tile's [CLS] [N,H,T,D], k [N,H,S,D]
          -> softmax(q k^T * scale + mask's [CLS] rows) -> mean over heads [N, T, S] -> [N, T(query), T(key), Pp]
          -> the diagonal (a tile's own keys) [N, T, Pp] -> its patches 1..P-1"""
    n, s, _ = h.shape
    pp = s // tiles
    k = attn.k_proj(h).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)  # [N, H, S, D]
    q = attn.q_proj(h[:, ::pp]).view(n, tiles, attn.num_heads, attn.head_dim).transpose(1, 2)  # [N, H, T, D]
    logits = (q @ k.transpose(-1, -2)) * attn.scaling + mask[:, :, ::pp]  # [N, H, T, S]
    probs = torch.softmax(logits.float(), dim=-1).mean(1).view(n, tiles, tiles, pp)
    return torch.diagonal(probs, dim1=1, dim2=2).transpose(1, 2)[..., 1:rows]  # [N, T, P-1]


class CrossKVGraph(nn.Module):
    """vision_states [B,I,T,P,Cvo] -> per cross layer (k_norm(k_proj(x)), v_proj(x)), each [B,Hkv,I,T,P,D],
    x = projector(vision_states) in HF's (image, tile, row) order; P: any rows per tile."""

    def __init__(self, projector: nn.Module, text_model: nn.Module, text_config):
        super().__init__()
        self.projector = projector
        self.attns = nn.ModuleList(text_model.layers[i].cross_attn for i in cross_layers(text_config)[1])
        self.kv_heads, self.head_dim = text_config.num_key_value_heads, c.head_dim(text_config)

    def forward(self, vision_states):
        b, i, t, p, _ = vision_states.shape
        x = self.projector(vision_states)  # [B, I, T, P, C]
        out = []
        for attn in self.attns:
            k = attn.k_norm(attn.k_proj(x).view(b, i, t, p, self.kv_heads, self.head_dim).permute(0, 4, 1, 2, 3, 5))
            v = attn.v_proj(x).view(b, i, t, p, self.kv_heads, self.head_dim).permute(0, 4, 1, 2, 3, 5)
            out += [k, v]  # [B, Hkv, I, T, P, D]
        return tuple(out)


class MllamaDecoderGraph(nn.Module):
    """(inputs_embeds [B,S,C], attention_mask [B,P+S], position_ids [B,S], cross_attention_mask [B,S,I,T],
    past self-attention k/v [B,Hkv,P,D]..., cross k/v [B,Hkv,I,T,R,D]...) -> logits [B,S,V], present
    self-attention k/v [B,Hkv,P+S,D]... HF's text model with a DynamicCache that holds the past at the
    self-attention layers and the cross K/V at the cross-attention layers (as HF's cache does after the
    first step), and the cross-attention mask turned into HF's two masks, each tile's entry repeated
    for its R rows (R: the cross K/V's, so compressed tiles work as whole ones)."""

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, text_config):
        super().__init__()
        self.text_model, self.lm_head = text_model, lm_head
        self.self_layers, self.cross_layers = cross_layers(text_config)

    def forward(self, inputs_embeds, attention_mask, position_ids, cross_attention_mask, *kv):
        from transformers import DynamicCache

        n_self = len(self.self_layers)
        past, cross = kv[: 2 * n_self], kv[2 * n_self:]
        by_layer = {**{l: past[2 * i: 2 * i + 2] for i, l in enumerate(self.self_layers)},
                    **{l: [t.flatten(2, 4) for t in cross[2 * j: 2 * j + 2]] for j, l in enumerate(self.cross_layers)}}
        cache = DynamicCache()
        for layer in range(len(by_layer)):
            cache.update(*by_layer[layer], layer)
        mask, row_mask = cross_attention_masks(cross_attention_mask.to(inputs_embeds.dtype), cross[0].shape[4],
                                               inputs_embeds.dtype)
        out = self.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                              cross_attention_mask=mask, full_text_row_masked_out_mask=row_mask, cache=cache,
                              use_cache=True)
        present = [t for layer in self.self_layers for t in (cache.layers[layer].keys, cache.layers[layer].values)]
        return (self.lm_head(out.last_hidden_state), *present)


def cross_attention_masks(cross_attention_mask, rows, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_attention_mask [B,S,I,T] (0/1) -> HF's (additive mask [B,1,S,I*T*R], row mask [B,1,S,1]): HF's
    `_prepare_cross_attention_mask` with each tile's entry repeated for its `rows` K/V rows by an expand
    (a traced dim, where HF's repeat_interleave takes a fixed count)."""
    b, s, i, t = cross_attention_mask.shape
    mask = cross_attention_mask[..., None].expand(b, s, i, t, rows).reshape(b, s, -1)[:, None]  # [B,1,S,I*T*R]
    inverted = (1.0 - mask).to(dtype)
    lowest = torch.finfo(dtype).min
    additive = inverted.masked_fill(inverted.to(torch.bool), lowest)
    row_mask = (additive != lowest).any(dim=-1).type_as(additive)[..., None]  # [B,1,S,1]: reads any row
    return additive * row_mask, row_mask


def mllama_graph_specs(d: ModelDims, num_cross: int, max_tiles: int) -> dict[str, GraphSpec]:
    """vision, cross_kv, embed and the portable decoder (with the cross K/V and mask as inputs); the
    rows per tile of cross_kv and the decoder are `tile_rows` (d.vision_tokens uncompressed)."""
    f, t, p = d.dtype, max_tiles, d.vision_tokens
    vision = GraphSpec("vision", inputs=(
        TensorSpec("pixel_values", f, ("num_images", t, 3, *d.image_size)),
        TensorSpec("aspect_ratio_ids", "int64", ("num_images",)),
        TensorSpec("aspect_ratio_mask", "int64", ("num_images", t)),
    ), outputs=(TensorSpec("vision_states", f, ("num_images", t, p, d.vision_hidden)),
                TensorSpec("attention_scores", f, ("num_images", t, p - 1))))
    cross = tuple(TensorSpec(n, f, ("batch", d.kv_heads, "images", t, "tile_rows", d.head_dim))
                  for n in cross_kv_names(num_cross))
    cross_kv = GraphSpec("cross_kv", inputs=(TensorSpec("vision_states", f, ("batch", "images", t, "tile_rows", d.vision_hidden)),),
                         outputs=cross)
    embed = GraphSpec("embed", inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
                      outputs=(TensorSpec("inputs_embeds", f, ("batch", "seq", d.hidden)),))
    past, present = kv_names(d.num_layers)
    decoder = GraphSpec("decoder", inputs=(
        TensorSpec("inputs_embeds", f, ("batch", "seq", d.hidden)),
        TensorSpec("attention_mask", "int64", ("batch", "total")),
        TensorSpec("position_ids", "int64", ("batch", "seq")),
        TensorSpec("cross_attention_mask", "int64", ("batch", "seq", "images", t)),
        *(TensorSpec(n, f, ("batch", d.kv_heads, "past", d.head_dim)) for n in past),
        *cross,
    ), outputs=(TensorSpec("logits", f, ("batch", "seq", d.vocab)),
                *(TensorSpec(n, f, ("batch", d.kv_heads, "total", d.head_dim)) for n in present)),
        dim_sums={"total": ("past", "seq")})
    return {g.name: g for g in (vision, cross_kv, embed, decoder)}


class MllamaExport(LlavaStyleExport):
    family = "mllama"
    architectures = ("MllamaForConditionalGeneration",)

    def model_class(self):
        from transformers import MllamaForConditionalGeneration

        return MllamaForConditionalGeneration

    def _params(self, files: ProcessorFiles, model) -> mllama.MllamaParams:
        p = mllama.MllamaParams.from_hf(files.image_processor)
        v = model.config.vision_config
        if p.tile_size != v.image_size or p.max_image_tiles != v.max_num_tiles:
            raise c.ExportError(f"the image processor makes {p.max_image_tiles} tiles of {p.tile_size} px but the vision "
                                f"model takes {v.max_num_tiles} tiles of {v.image_size} px")
        if [list(r) for r in mllama.supported_aspect_ratios(p.max_image_tiles)] != [list(r) for r in v.supported_aspect_ratios]:
            raise c.ExportError(f"vision_config.supported_aspect_ratios {v.supported_aspect_ratios} differ from the "
                                f"processor's for {p.max_image_tiles} tiles")
        return p

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        return self._params(files, model).to_dict()

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        side = model.config.vision_config.image_size
        return side, side

    def feature_params(self, cfg) -> dict:
        v, text = cfg.vision_config, cfg.get_text_config()
        self_layers, cross = cross_layers(text)
        if 0 in cross:
            raise c.ExportError("cross_attention_layers includes layer 0; the cache's length is read from layer 0, "
                                "which must be a self-attention layer")
        return {"max_image_tiles": v.max_num_tiles, "tokens_per_tile": (v.image_size // v.patch_size) ** 2 + 1,
                "input_vocab": text.vocab_size + 8,  # MllamaTextModel.embed_tokens: <|image|> is id vocab_size
                "cross_attention_layers": cross, "self_attention_layers": self_layers}

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        return {"typical": 1}  # one <|image|> token; the vision states take no context

    def rows_per_image(self, preprocess: dict) -> int:
        return 1  # one vision row (of max_image_tiles tiles) per image

    def _dims(self, model, files: ProcessorFiles, dtype: str) -> ModelDims:
        v, text = model.config.vision_config, model.config.get_text_config()
        return ModelDims(
            image_size=(v.image_size, v.image_size), vision_tokens=(v.image_size // v.patch_size) ** 2 + 1,
            vision_hidden=v.vision_output_dim, hidden=text.hidden_size, vocab=text.vocab_size,
            num_layers=len(cross_layers(text)[0]), kv_heads=text.num_key_value_heads, head_dim=c.head_dim(text),
            dtype=dtype)

    def model_facts(self, model, files: ProcessorFiles, tokenizer, dtype: str) -> ModelFacts:
        facts = super().model_facts(model, files, tokenizer, dtype)
        placeholder = self._params(files, model).image_token
        return dataclasses.replace(
            facts,
            media={"image": dataclasses.replace(facts.media["image"], placeholder=placeholder)},
            pipeline={"image": ["vision", "cross_kv"], "embed": "embed", "decoders": ["decoder"]},
            limits={**facts.limits, "images": None, "tile_rows": facts.family_params["tokens_per_tile"]})

    def kv_layers(self, text) -> tuple:
        """Only the self-attention layers hold context K/V (the cross layers' K/V are per request, not per token)."""
        all_layers = c.kv_layers(text)
        return tuple(all_layers[i] for i in cross_layers(text)[0])

    def graph_specs(self, facts: ModelFacts, model, log) -> dict[str, GraphSpec]:
        log(f"{GQA_REASON}; exporting the portable decoder only")
        fp = facts.family_params
        return mllama_graph_specs(facts.dims, len(fp["cross_attention_layers"]), fp["max_image_tiles"])

    def graph_modules(self, model) -> dict[str, nn.Module]:
        text = model.config.get_text_config()
        return {
            "vision": MllamaVisionGraph(model.model.vision_model).eval(),
            "cross_kv": CrossKVGraph(model.model.multi_modal_projector, model.model.language_model, text).eval(),
            "embed": c.EmbedGraph(model.get_input_embeddings()).eval(),
            "decoder": self.decoder_module(model),
        }

    def decoder_module(self, model) -> nn.Module:
        return MllamaDecoderGraph(model.model.language_model, model.lm_head, model.config.get_text_config()).eval()

    def text_parts(self, model):
        return model.model.language_model, model.lm_head, model.config.get_text_config()

    def reference(self, model, graph: str, module: nn.Module, spec: GraphSpec):
        """cross_kv: what HF's own cross-attention layers put in their cache; the others: their modules."""
        from .onnx_export import torch_reference

        if graph != "cross_kv":
            return torch_reference(module, spec)
        return lambda feeds: _hf_cross_cache(model, torch.from_numpy(feeds["vision_states"]))

    def validation_dims(self, name: str, spec: GraphSpec) -> list[dict]:
        dims = super().validation_dims(name, spec)
        if name == "decoder":  # tile_rows: any count (compressed tiles have fewer rows than the vision graph's)
            return [{**d, "images": i, "tile_rows": r} for d, i, r in zip(dims, (1, 2, 1, 3), (3, 2, 1, 5))]
        if name == "cross_kv":
            return [{"batch": 1, "images": 1, "tile_rows": 5}, {"batch": 2, "images": 3, "tile_rows": 2}]
        return dims

    def sample_feeds(self, name: str, spec: GraphSpec, dims: dict, facts, rng) -> dict:
        """Aspect-ratio ids with their tile masks (id 0: an absent image); a cross-attention mask of whole
        images' tile prefixes, some rows reading none."""
        feeds = super().sample_feeds(name, spec, dims, facts, rng)
        tiles = facts.family_params["max_image_tiles"]
        if name == "vision":
            ratios = mllama.supported_aspect_ratios(tiles)
            ids = rng.integers(0, len(ratios) + 1, dims["num_images"])
            feeds["aspect_ratio_ids"] = ids.astype(np.int64)
            feeds["aspect_ratio_mask"] = _tile_mask([int(np.prod(ratios[i - 1])) if i else 1 for i in ids], tiles)
        if name == "decoder":
            b, s, i = feeds["cross_attention_mask"].shape[:3]
            reads = rng.integers(0, 2, (b, s, i, 1)) * _tile_mask(rng.integers(1, tiles + 1, i), tiles)[None, None]
            feeds["cross_attention_mask"] = reads.astype(np.int64)
        return feeds


def _hf_cross_cache(model, vision_states: torch.Tensor) -> list[np.ndarray]:
    """vision_states [B,I,T,P,Cvo] -> each cross layer's cached (keys, values) after HF's first pass, [B,Hkv,I,T,P,D]."""
    from transformers import DynamicCache

    b, i, t, p, _ = vision_states.shape
    text = model.config.get_text_config()
    with torch.no_grad():
        states = model.model.multi_modal_projector(vision_states).reshape(-1, p, text.hidden_size)  # as MllamaModel
        cache, out = DynamicCache(), []
        for layer in cross_layers(text)[1]:
            model.model.language_model.layers[layer].cross_attn(torch.zeros(b, 1, text.hidden_size), states, cache=cache)
            out += [x.reshape(b, x.shape[1], i, t, p, x.shape[-1]).numpy() for x in (cache.layers[layer].keys, cache.layers[layer].values)]
    return out


def _tile_mask(num_tiles, max_tiles: int) -> np.ndarray:
    """[n] tile counts -> [n, max_tiles] int64 with each row's first count on."""
    return (np.arange(max_tiles)[None] < np.asarray(num_tiles)[:, None]).astype(np.int64)


FAMILY = MllamaExport()
