"""LLaVA-1.5 (`LlavaForConditionalGeneration`): the four graphs as torch modules, and the model facts.

    pixel_values [N,3,H,W] -> vision -> [N,T,Cv] -> projector -> [N,T,C] --+
    input_ids [B,S] -> embed -> [B,S,C] ---- scatter at <image> tokens ----+-> decoder -> logits, present
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from vlmdeploy.runtime.dummy import EXPORT_DIMS, VALIDATION_DIMS, sample_feeds  # noqa: F401 (family API)
from vlmdeploy.runtime.images import ImagePreprocessor
from vlmdeploy.runtime.manifest import ModelFacts
from vlmdeploy.runtime.spec import ModelDims, llava_graph_specs

from .hf_files import ProcessorFiles

ARCHITECTURES = ("LlavaForConditionalGeneration",)


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why."""


def feature_layers(vision_feature_layer, num_layers: int) -> list[int]:
    """HF hidden_states indices (0 = embeddings, L = last layer) as non-negative ints."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    return [layer % (num_layers + 1) for layer in layers]


@contextlib.contextmanager
def truncated_encoder(tower: nn.Module, keep: int):
    """Run only the first `keep` encoder layers: layers after the feature layer are never exported."""
    layers = tower.encoder.layers
    tower.encoder.layers = nn.ModuleList(list(layers)[:keep])
    try:
        yield tower
    finally:
        tower.encoder.layers = layers


class VisionGraph(nn.Module):
    """pixel_values [N,3,H,W] -> image_features [N,T,Cv]: hidden state(s) of the feature layer(s)."""

    def __init__(self, tower: nn.Module, layers: list[int], strategy: str):
        super().__init__()
        self.tower, self.layers, self.strategy = tower, layers, strategy

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        picked = [hidden[i] for i in self.layers]  # each [N, 1+P, Cv]
        if self.strategy == "default":
            picked = [h[:, 1:] for h in picked]  # drop CLS
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


class ProjectorGraph(nn.Module):
    """image_features [N,T,Cv] -> image_embeds [N,T,C]."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, image_features):
        return self.projector(image_features)


class EmbedGraph(nn.Module):
    """input_ids [B,S] -> inputs_embeds [B,S,C]."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids):
        return self.embedding(input_ids)


class DecoderGraph(nn.Module):
    """(inputs_embeds [B,S,C], attention_mask [B,P+S], position_ids [B,S], past k/v [B,Hkv,P,D]...)
    -> logits [B,S,V], present k/v [B,Hkv,P+S,D]... One graph for prefill (P = 0) and decode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.text_config = model.config.get_text_config()
        self.num_layers = self.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=True,
        )
        logits = self.lm_head(out.last_hidden_state)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


def graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    cfg = model.config
    tower = model.model.vision_tower
    layers = feature_layers(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers)
    return {
        "vision": VisionGraph(tower, layers, cfg.vision_feature_select_strategy).eval(),
        "projector": ProjectorGraph(model.model.multi_modal_projector).eval(),
        "embed": EmbedGraph(model.get_input_embeddings()).eval(),
        "decoder": DecoderGraph(model).eval(),
    }


def export_context(model: nn.Module, graph: str):
    """Context under which a graph is exported: the vision tower runs only up to its feature layer."""
    if graph != "vision":
        return contextlib.nullcontext()
    cfg = model.config
    keep = max(feature_layers(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers))
    return truncated_encoder(model.model.vision_tower, keep)


def reference_image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What HF feeds the projector, computed by the full (untruncated) tower; the vision graph's oracle."""
    cfg = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer
    picked = [hidden[i] for i in layers]
    if cfg.vision_feature_select_strategy == "default":
        picked = [h[:, 1:] for h in picked]
    return torch.cat(picked, dim=-1)


def _eos_ids(model, files: ProcessorFiles) -> tuple[int, ...]:
    eos = files.generation_config.get("eos_token_id", model.config.get_text_config().eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return tuple(int(e) for e in eos)


def tokens_per_image(files: ProcessorFiles, image_size: tuple[int, int]) -> int:
    """The number of placeholders LlavaProcessor expands each <image> into."""
    proc = files.processor
    patch = proc.get("patch_size")
    if not patch:
        raise ExportError("processor config has no patch_size; LlavaProcessor cannot expand <image> without it")
    n = (image_size[0] // patch) * (image_size[1] // patch) + proc.get("num_additional_image_tokens", 0)
    return n - 1 if proc.get("vision_feature_select_strategy") == "default" else n


def model_facts(model, files: ProcessorFiles, tokenizer, dtype: str) -> ModelFacts:
    cfg, text = model.config, model.config.get_text_config()
    pre = ImagePreprocessor.from_hf_config(files.image_processor)
    image_size = tuple(pre.output_size)
    with torch.no_grad():
        probe = reference_image_features(model, torch.zeros(1, 3, *image_size, dtype=model.dtype))
    dims = ModelDims(
        image_size=image_size,
        vision_tokens=probe.shape[1],
        vision_hidden=probe.shape[2],
        hidden=text.hidden_size,
        vocab=text.vocab_size,
        num_layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        dtype=dtype,
    )
    per_image = tokens_per_image(files, image_size)
    if per_image != dims.vision_tokens:
        raise ExportError(
            f"the processor expands <image> into {per_image} tokens but the vision tower yields "
            f"{dims.vision_tokens} features per image (check patch_size, num_additional_image_tokens and "
            "vision_feature_select_strategy in the processor config); HF would fail on this checkpoint too"
        )
    image_token = files.processor.get("image_token", "<image>")
    eos = _eos_ids(model, files)
    pad = files.generation_config.get("pad_token_id", text.pad_token_id)
    return ModelFacts(
        family="llava",
        dims=dims,
        image_token=image_token,
        image_token_id=int(cfg.image_token_id),
        tokens_per_image=per_image,
        eos_token_ids=eos,
        pad_token_id=int(pad if pad is not None else (eos[0] if eos else 0)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        context_length=int(text.max_position_embeddings),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )


def graph_specs(facts: ModelFacts, model) -> dict:
    """All graphs; decoder_gqa only where its builder reproduces the text model exactly (fp32 Llama)."""
    from . import llama_gqa

    specs = llava_graph_specs(facts.dims)
    try:
        llama_gqa.check_supported(model.config.get_text_config())
        if facts.dims.dtype != "float32":
            raise NotImplementedError("decoder_gqa is exported for fp32 only")
    except NotImplementedError:
        specs.pop("decoder_gqa")
    return specs


def build_graph(graph: str, model, spec, facts, path, tolerance_scale: float) -> dict | None:
    """Graphs written directly as ONNX (not traced): build, save, validate. None for traced graphs."""
    if graph != "decoder_gqa":
        return None
    from . import llama_gqa

    llama_gqa.save(llama_gqa.build_decoder_gqa(model, spec), path)
    return llama_gqa.validate(path, spec, model, facts, VALIDATION_DIMS[graph], tolerance_scale)


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




def model_class():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def reference(model, graph: str, module: nn.Module, spec):
    """The PyTorch oracle a graph is validated against. Vision: HF's full tower, not our truncation."""
    from .onnx_export import torch_reference

    if graph != "vision":
        return torch_reference(module, spec)

    def run(feeds):
        with torch.no_grad():
            return [reference_image_features(model, torch.from_numpy(feeds["pixel_values"])).numpy()]

    return run
