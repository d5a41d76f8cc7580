"""The ORT-optimized decoder for HF text backbones: `decoder_gqa`.

Backbones: Llama, Mistral (sliding window), Qwen2 (q/k/v biases, per-layer windows from `layer_types`),
Gemma ((1 + w) RMSNorm, gelu-tanh MLP), Phi-3 (fused qkv_proj / gate_up_proj, LongRoPE, partial rotary).
`unsupported_reason(text_config, dtype)` says, in one line, when `build` would not reproduce HF exactly.

Same inputs as the portable decoder except the cache: each layer's K/V is ONE preallocated buffer
`[B, Hkv, capacity, D]`, bound as both past and present (ONNX Runtime's GroupQueryAttention with a
shared past/present buffer writes the new entries in place; nothing grows or is copied per step).
Only the last position's logits are computed.

Per layer (weights from the HF model, transposed for MatMul; biases added where the Linear has one):

    x --SkipSimplifiedLayerNorm(+residual)--> h --MatMul(Wqkv)(+b)--> Split -> q, k, v
    q, k --RotaryEmbedding(positions)-->               (positions from the runtime: HF's left-pad rule)
    q, k, v, cache_k, cache_v, bias --GroupQueryAttention(local_window_size)--> a --MatMul(Wo)--> o
    o --SkipSimplifiedLayerNorm(+residual)--> h2 --MatMul(Wg), MatMul(Wu)--> act(g) * u --MatMul(Wd)--> x'

Left padding: GroupQueryAttention has no mask input, so pads are masked with `attention_bias`
[B, 1, S, T] (0 or the float32 minimum) built in the graph from `attention_mask`, and every row
shares one cache length T (pads occupy cache slots, as in HF). RoPE is applied outside the
attention op with the explicit `position_ids`, which keeps left-padded rows token-exact.

Exactness notes, per backbone:
- Sliding window (Mistral, Phi-3: every layer; Qwen2: layers whose `layer_types` entry is
  "sliding_attention"): HF lets cache slot i see slot j iff i - window < j <= i (window counts the
  token itself; pads occupy slots). ONNX Runtime 1.32's CPU GroupQueryAttention `local_window_size`
  has the same meaning (measured: window 4 matches with local_window_size 4, not 3 or 5), so it is
  `sliding_window` itself. HF's sliding cache keeps only the last window - 1 entries; this graph
  keeps every entry in the buffer (slots older than the window are never read).
- Gemma: the (1 + w) of GemmaRMSNorm is baked into the norm weights. transformers 5.x scales by
  sqrt(hidden) inside `embed_tokens` (GemmaTextScaledWordEmbedding), not on `inputs_embeds`, so the
  graph does not scale; with an older model whose embedding has no `embed_scale` (4.x: the scale is
  applied in GemmaModel.forward) the graph multiplies inputs_embeds by float32(sqrt(hidden)).
- LongRoPE (Phi-3 `rope_type: longrope`): HF picks the short or long factors for a whole forward
  call from max(position_ids) + 1 > original_max_position_embeddings (over all rows), and never
  re-rotates keys already cached. The graph holds both tables ([short rows 0..orig-1; long rows
  0..max-1]) and makes the same choice per call, so it is exact at every length, including
  prompts that cross the threshold during decoding.
- RoPE types with per-call state other than longrope ("dynamic") are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from vlmdeploy.runtime.spec import GraphSpec, kv_names

MS = "com.microsoft"
F32_MIN = float(np.finfo(np.float32).min)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "phi3", "qwen2_vl_text", "qwen2_5_vl_text")
QWEN2_LIKE = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")  # windows per layer from layer_types
MROPE_MODEL_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")  # position_ids [3, B, S], rotary pairs split by axis
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu")  # HF ACT2FN names
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init
WINDOW_EVERY_LAYER = ("mistral", "phi3")  # attention uses config.sliding_window in every layer


class Graph:
    """Nodes and initializers under construction; `op` returns the output name(s)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[str, np.ndarray] = {}
        self._n = 0

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; a name already made is reused (shared constants such as shapes)."""
        array = np.array(array, order="C")  # keeps 0-d scalars
        if name in self._consts:
            if not np.array_equal(self._consts[name], array):
                raise ValueError(f"decoder_gqa builder: constant {name!r} made twice with different values")
            return name
        self._consts[name] = array
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs):
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = outputs or [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


# ---------------------------------------------------------------------------------------------
# What the config says


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_parameters(cfg) -> dict:
    """transformers 5.x `rope_parameters` (4.x: `rope_scaling` + `rope_theta`)."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return dict(params)


def _rope_type(cfg) -> str:
    params = _rope_parameters(cfg)
    return params.get("rope_type", params.get("type", "default"))


def _rotary_dim(cfg) -> int:
    """Rotated channels per head (Phi-3 `partial_rotary_factor` rotates the first fraction only)."""
    if cfg.model_type != "phi3":
        return _head_dim(cfg)
    factor = _rope_parameters(cfg).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    return int(_head_dim(cfg) * (factor or 1.0))


def _original_max_positions(cfg) -> int:
    params = _rope_parameters(cfg)
    return int(params.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
               or cfg.max_position_embeddings)


def layer_windows(cfg) -> list[int | None]:
    """Each layer's sliding window (HF: tokens a query sees, itself included), None for full attention."""
    n, window = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)
    if cfg.model_type in WINDOW_EVERY_LAYER:
        return [window] * n
    if cfg.model_type in QWEN2_LIKE:
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
        return [window if t == "sliding_attention" else None for t in types]
    return [None] * n


def _activation(cfg) -> str:
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu"


def unsupported_reason(text_config, dtype: str) -> str | None:
    """None when build() reproduces this HF text model exactly; else ONE line saying why not."""
    cfg = text_config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"decoder_gqa: model_type {cfg.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if dtype != "float32":
        return f"decoder_gqa: dtype {dtype} is not supported (float32 only)"
    head_dim = _head_dim(cfg)
    if head_dim % 8:
        return f"decoder_gqa: head_dim {head_dim} is not a multiple of 8 (ONNX Runtime GroupQueryAttention requires it)"
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        return f"decoder_gqa: {cfg.num_attention_heads} heads are not a multiple of {cfg.num_key_value_heads} kv heads"
    if _activation(cfg) not in ACTIVATIONS:
        return f"decoder_gqa: hidden activation {_activation(cfg)!r} is not supported ({', '.join(ACTIVATIONS)})"
    return _rope_reason(cfg) or _attention_reason(cfg)


def _rope_reason(cfg) -> str | None:
    rope_type, rotary = _rope_type(cfg), _rotary_dim(cfg)
    if rope_type not in STATIC_ROPE_TYPES + ("longrope",):
        return f"decoder_gqa: rope type {rope_type!r} is not supported ({', '.join(STATIC_ROPE_TYPES)}, longrope)"
    if rotary % 2 or rotary <= 0 or rotary > _head_dim(cfg):
        return f"decoder_gqa: rotary dimension {rotary} does not fit head_dim {_head_dim(cfg)}"
    section = mrope_section(cfg)
    if section is not None and sum(section) != rotary // 2:
        return f"decoder_gqa: mrope_section {section} does not add up to the {rotary // 2} rotary pairs"
    return None


def mrope_section(cfg) -> list[int] | None:
    """Qwen2-VL's rotary pairs per axis (temporal, height, width); None for 1-D RoPE."""
    if cfg.model_type not in MROPE_MODEL_TYPES:
        return None
    return list(_rope_parameters(cfg).get("mrope_section", [16, 24, 24]))


def _attention_reason(cfg) -> str | None:
    if getattr(cfg, "use_bidirectional_attention", False):
        return "decoder_gqa: bidirectional attention (use_bidirectional_attention) is not supported"
    types = getattr(cfg, "layer_types", None) or []
    if cfg.model_type in QWEN2_LIKE and set(types) - {"full_attention", "sliding_attention"}:
        return f"decoder_gqa: layer_types {sorted(set(types))} are not supported (full_attention, sliding_attention)"
    windows = layer_windows(cfg)
    if cfg.model_type in QWEN2_LIKE and "sliding_attention" in types and getattr(cfg, "sliding_window", None) is None:
        return "decoder_gqa: layer_types has sliding_attention layers but sliding_window is None"
    if any(w is not None and w < 1 for w in windows):
        return f"decoder_gqa: sliding_window {cfg.sliding_window} is not supported (must be >= 1)"
    return None


@dataclass(frozen=True)
class Arch:
    """The per-backbone choices `build` makes, read once from the config and the model."""

    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    eps: float
    activation: str
    windows: tuple  # per layer: int (HF sliding_window) or None
    norm_offset: float  # Gemma: weight is (1 + w)
    embed_scale: float | None  # multiply inputs_embeds by this (Gemma under transformers 4.x)

    @classmethod
    def of(cls, language_model, cfg, rotary_dim: int) -> "Arch":
        """rotary_dim: the width of HF's cos table (the channels its rotation touches)."""
        gemma = cfg.model_type == "gemma"
        scaled_in_embedding = hasattr(getattr(language_model, "embed_tokens", None), "embed_scale")
        return cls(
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=_head_dim(cfg),
            rotary_dim=rotary_dim, eps=float(cfg.rms_norm_eps), activation=_activation(cfg),
            windows=tuple(layer_windows(cfg)), norm_offset=1.0 if gemma else 0.0,
            embed_scale=float(cfg.hidden_size**0.5) if gemma and not scaled_in_embedding else None,
        )


# ---------------------------------------------------------------------------------------------
# Weights


def _weight(linear: torch.nn.Linear) -> np.ndarray:
    return linear.weight.detach().float().numpy().T  # [in, out]


def _bias(linear: torch.nn.Linear) -> np.ndarray:
    b = linear.bias
    return np.zeros(linear.out_features, np.float32) if b is None else b.detach().float().numpy()


def _linear(g: Graph, x: str, linear: torch.nn.Linear, name: str, out: str | None = None) -> str:
    """x [B, S, in] -> [B, S, out] (MatMul, + bias when the Linear has one); `out` names the result."""
    named = {"outputs": [out]} if out else {}
    if linear.bias is None:
        return g.op("MatMul", [x, g.const(name, _weight(linear))], **named)
    y = g.op("MatMul", [x, g.const(name, _weight(linear))])
    return g.op("Add", [y, g.const(f"{name}.bias", _bias(linear))], **named)


def _norm_weight(g: Graph, norm: torch.nn.Module, arch: Arch, name: str) -> str:
    w = norm.weight.detach().float()
    return g.const(name, (w + arch.norm_offset).numpy() if arch.norm_offset else w.numpy())  # f32 as HF


# ---------------------------------------------------------------------------------------------
# Graph pieces


def _rope_tables(language_model, cfg) -> tuple[np.ndarray, np.ndarray, int]:
    """(cos, sin [rows, rotary/2], long_offset): exactly as the HF rotary module computes them.
    long_offset is 0 without LongRoPE; with it, rows [0, orig) hold the short factors and rows
    [orig, orig + max) the long ones, and a call uses the long rows when max(position) + 1 > orig."""
    def table(n: int):
        with torch.no_grad():
            cos, sin = language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(n)[None])
        half = cos.shape[-1] // 2  # [1, n, rotary], halves repeated
        return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()

    total = cfg.max_position_embeddings
    if _rope_type(cfg) != "longrope":
        return (*table(total), 0)
    orig = _original_max_positions(cfg)
    (short_cos, short_sin), (long_cos, long_sin) = table(orig), table(max(total, orig + 1))
    return np.concatenate([short_cos, long_cos]), np.concatenate([short_sin, long_sin]), orig


def _rope_positions(g: Graph, long_offset: int) -> str:
    """position_ids [B, S] -> rows of the rope tables [B, S] (LongRoPE: + orig when HF picks the long factors)."""
    if not long_offset:
        return "position_ids"
    top = g.op("ReduceMax", ["position_ids"], keepdims=0)  # [] over all rows, as HF
    use_long = g.op("Greater", [top, g.const("rope_last_short", np.array(long_offset - 1, np.int64))])
    offset = g.op("Where", [use_long, g.const("rope_long_offset", np.array(long_offset, np.int64)),
                            g.const("rope_zero", np.array(0, np.int64))])
    return g.op("Add", ["position_ids", offset])


def _mask_inputs(g: Graph) -> tuple[str, str, str]:
    """attention_mask [B, T] -> (seqlens_k [B] int32, total_len [] int32, bias [B, 1, S, T] f32)."""
    shape_mask = g.op("Shape", ["attention_mask"])  # [2]: B, T
    total = g.op("Gather", [shape_mask, g.const("one_i64", np.array(1, np.int64))], axis=0)  # []
    total32 = g.op("Cast", [total], to=TensorProto.INT32)
    batch = g.op("Gather", [shape_mask, g.const("zero_i64", np.array(0, np.int64))], axis=0)
    batch_1d = g.op("Unsqueeze", [batch, g.const("axes0", np.array([0], np.int64))])
    last32 = g.op("Sub", [total32, g.const("one_i32", np.array(1, np.int32))])
    seqlens = g.op("Expand", [last32, batch_1d])  # [B] = T - 1
    pad = g.op("Equal", ["attention_mask", g.const("zero_mask", np.array(0, np.int64))])
    bias = g.op("Where", [pad, g.const("f32_min", np.array(F32_MIN, np.float32)), g.const("f32_zero", np.array(0, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes12", np.array([1, 2], np.int64))])  # [B, 1, 1, T]
    seq = g.op("Gather", [g.op("Shape", ["inputs_embeds"]), g.const("one_i64b", np.array(1, np.int64))], axis=0)
    target = g.op("Concat", [batch_1d, g.const("one_1d", np.array([1], np.int64)),
                             g.op("Unsqueeze", [seq, "axes0"]), g.op("Unsqueeze", [total, "axes0"])], axis=0)
    return seqlens, total32, g.op("Expand", [bias, target])  # [B, 1, S, T]


def _qkv(g: Graph, i: int, attn, arch: Arch, h: str) -> list[str]:
    """h [B, S, C] -> q [B, S, H*D], k, v [B, S, Hkv*D]: one MatMul (Phi-3's qkv_proj, or q|k|v concatenated)."""
    if hasattr(attn, "qkv_proj"):
        qkv = _linear(g, h, attn.qkv_proj, f"l{i}.qkv")
    else:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv = g.op("MatMul", [h, g.const(f"l{i}.qkv", np.concatenate([_weight(p) for p in projs], axis=1))])
        if any(p.bias is not None for p in projs):  # Qwen2; Llama / Gemma attention_bias
            qkv = g.op("Add", [qkv, g.const(f"l{i}.qkv.bias", np.concatenate([_bias(p) for p in projs]))])
    q_size, kv_size = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    split = g.const(f"l{i}.split", np.array([q_size, kv_size, kv_size], np.int64))
    return g.op("Split", [qkv, split], n_out=3, axis=-1)


def _mrope_tables(g: Graph, section: list[int]) -> tuple[str, str]:
    """position_ids [3, B, S] -> (cos, sin) [B, S, 1, D]: rotary pair j takes its angle from the
    axis whose section holds j (HF's `recomposition_frequencies`), halves repeated."""
    bounds = np.cumsum([0, *section])
    out = []
    for table in ("rope_cos", "rope_sin"):
        parts = []
        for axis in range(3):
            pos = g.op("Gather", ["position_ids", g.const(f"mrope_axis{axis}_{table}", np.array(axis, np.int64))], axis=0)
            rows = g.op("Gather", [table, pos], axis=0)  # [B, S, half]
            parts.append(g.op("Slice", [rows, g.const(f"mrope_lo{axis}_{table}", bounds[axis:axis + 1]),
                                        g.const(f"mrope_hi{axis}_{table}", bounds[axis + 1:axis + 2]),
                                        g.const(f"mrope_ax{axis}_{table}", np.array([-1], np.int64))]))
        half = g.op("Concat", parts, axis=-1)  # [B, S, half]
        full = g.op("Concat", [half, half], axis=-1)  # [B, S, D]
        out.append(g.op("Unsqueeze", [full, g.const(f"mrope_heads_axis_{table}", np.array([2], np.int64))]))
    return out[0], out[1]


def _rotary_mrope(g: Graph, x: str, heads: int, arch: Arch, tables: tuple[str, str]) -> str:
    """x [B, S, heads*D] -> x*cos + rotate_half(x)*sin with per-token M-RoPE tables [B, S, 1, D]."""
    cos, sin = tables
    d, half = arch.head_dim, arch.head_dim // 2
    xh = g.op("Reshape", [x, g.const(f"mrope_shape{heads}", np.array([0, 0, heads, d], np.int64))])  # [B, S, H, D]
    x1, x2 = g.op("Split", [xh, g.const("mrope_halves", np.array([half, half], np.int64))], n_out=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    out = g.op("Add", [g.op("Mul", [xh, cos]), g.op("Mul", [rotated, sin])])
    return g.op("Reshape", [out, g.const(f"mrope_flat{heads}", np.array([0, 0, heads * d], np.int64))])


def _rotary(g: Graph, x: str, heads: int, arch: Arch, positions) -> str:
    """x [B, S, heads*D] rotated (rotate-half layout; the first rotary_dim channels of each head).
    `positions`: rows of the rope tables [B, S], or M-RoPE's (cos, sin) tables."""
    if isinstance(positions, tuple):
        return _rotary_mrope(g, x, heads, arch, positions)
    partial = {"rotary_embedding_dim": arch.rotary_dim} if arch.rotary_dim != arch.head_dim else {}
    return g.op("RotaryEmbedding", [x, positions, "rope_cos", "rope_sin"], domain=MS, num_heads=heads,
                interleaved=0, **partial)


def _attention(g: Graph, i: int, arch: Arch, q: str, k: str, v: str, mask_parts) -> str:
    """GroupQueryAttention on the shared buffer: [B, S, H*D] -> [B, S, H*D]; writes present.{i} in place."""
    seqlens, total32, bias = mask_parts
    past_k, past_v = (f"past_key_values.{i}.{kv}" for kv in ("key", "value"))
    present_k, present_v = (f"present.{i}.{kv}" for kv in ("key", "value"))
    window = arch.windows[i]
    a, _, _ = g.op(
        "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total32, "", "", "", bias],
        outputs=[f"l{i}.attn", present_k, present_v], domain=MS, name=f"l{i}.gqa",
        num_heads=arch.heads, kv_num_heads=arch.kv_heads, scale=float(arch.head_dim**-0.5),
        local_window_size=-1 if window is None else int(window),  # keys seen, the token itself included
    )
    return a


def _act(g: Graph, x: str, activation: str) -> str:
    if activation in ("gelu_pytorch_tanh", "gelu_new"):
        return g.op("FastGelu", [x], domain=MS)  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    if activation == "gelu":
        return g.op("Gelu", [x], domain=MS)  # erf
    return g.op("Mul", [x, g.op("Sigmoid", [x])])  # silu


def _mlp(g: Graph, i: int, mlp, arch: Arch, h: str) -> str:
    """h [B, S, C] -> down(act(gate(h)) * up(h)) [B, S, C]."""
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: one Linear, gate first
        gate, up = g.op("Split", [_linear(g, h, mlp.gate_up_proj, f"l{i}.gate_up")], n_out=2, axis=-1, num_outputs=2)
    else:
        gate, up = _linear(g, h, mlp.gate_proj, f"l{i}.gate"), _linear(g, h, mlp.up_proj, f"l{i}.up")
    return _linear(g, g.op("Mul", [_act(g, gate, arch.activation), up]), mlp.down_proj, f"l{i}.down")


def _layer(g: Graph, i: int, layer, arch: Arch, x: str, residual: str | None, mask_parts, positions: str) -> tuple[str, str]:
    """One decoder layer; returns (mlp output, residual stream) for the next layer's fused norm."""
    attn = layer.self_attn
    w_in = _norm_weight(g, layer.input_layernorm, arch, f"l{i}.input_norm")
    if residual is None:
        h, residual = _rms_norm(g, x, w_in, arch.eps), x
    else:
        h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [x, residual, w_in], n_out=4, domain=MS, epsilon=arch.eps)
    q, k, v = _qkv(g, i, attn, arch, h)
    q, k = _rotary(g, q, arch.heads, arch, positions), _rotary(g, k, arch.kv_heads, arch, positions)
    o = _linear(g, _attention(g, i, arch, q, k, v, mask_parts), attn.o_proj, f"l{i}.o")
    w_post = _norm_weight(g, layer.post_attention_layernorm, arch, f"l{i}.post_norm")
    h2, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, w_post], n_out=4, domain=MS, epsilon=arch.eps)
    return _mlp(g, i, layer.mlp, arch, h2), residual


def _rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    """x * rsqrt(mean(x^2) + eps) * weight, in standard ops (ONNX Runtime fuses it)."""
    var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const("axes_last", np.array([-1], np.int64))], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const("rms_eps", np.array(eps, np.float32))])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), weight])


def build(language_model, lm_head, text_config, spec: GraphSpec) -> onnx.ModelProto:
    """The ONNX model for `spec` (`decoder_gqa`) from an HF base text model (.layers, .norm, .rotary_emb)
    and its lm_head. Raises NotImplementedError with `unsupported_reason` when it would not be exact."""
    cfg, dtype = text_config, spec.inputs[0].dtype
    reason = unsupported_reason(cfg, dtype)
    if reason:
        raise NotImplementedError(reason)
    cos, sin, long_offset = _rope_tables(language_model, cfg)  # [rows, rotary/2]
    arch, g = Arch.of(language_model, cfg, rotary_dim=2 * cos.shape[1]), Graph()
    g.const("rope_cos", cos)
    g.const("rope_sin", sin)
    section = mrope_section(cfg)
    positions = _mrope_tables(g, section) if section else _rope_positions(g, long_offset)
    mask_parts = _mask_inputs(g)
    x = "inputs_embeds"
    if arch.embed_scale is not None:  # Gemma under transformers 4.x: GemmaModel.forward scales inputs_embeds
        x = g.op("Mul", [x, g.const("embed_scale", np.array(arch.embed_scale, np.float32))])
    residual = None
    for i, layer in enumerate(language_model.layers[: cfg.num_hidden_layers]):
        x, residual = _layer(g, i, layer, arch, x, residual, mask_parts, positions)
    w_final = _norm_weight(g, language_model.norm, arch, "final_norm")
    h, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [x, residual, w_final], n_out=4, domain=MS, epsilon=arch.eps)
    last = g.op("Gather", [h, g.const("last_index", np.array([-1], np.int64))], axis=1)  # [B, 1, C]
    _linear(g, last, lm_head, "lm_head", out="logits")  # [B, 1, V]
    return _model(g, spec)


def _model(g: Graph, spec: GraphSpec) -> onnx.ModelProto:
    def value(t):
        return helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(np.dtype(t.np_dtype)), list(t.shape))

    graph = helper.make_graph(g.nodes, "decoder_gqa", [value(t) for t in spec.inputs], [value(t) for t in spec.outputs], g.inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="vlmdeploy")


def save(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=1024)


# ---------------------------------------------------------------------------------------------
# Validation


def validate(path, spec: GraphSpec, reference, feeds_at, dims_list: list[dict], num_layers: int,
             tolerance_scale: float) -> dict:
    """decoder_gqa in ONNX Runtime, driven as the runtime drives it (shared buffers bound as past and
    present), against `reference` (the portable decoder: feeds with past [B,H,P,D] -> [logits [B,S,V],
    present k/v [B,H,P+S,D]...]) on `feeds_at(dims)`. A reference whose present is shorter (HF's
    sliding-window cache keeps the last entries only) is compared with the same last slots."""
    from vlmdeploy.runtime.runners import OrtRunner

    runner, (past_names, present_names) = OrtRunner(path, spec, low_memory=True), kv_names(num_layers)
    worst, runs = 0.0, []
    for dims in dims_list:
        feeds = feeds_at(dims)
        seq, total = dims["seq"], dims["past"] + dims["seq"]
        portable = portable_feeds(num_layers, feeds, dims)
        ref = _valid_positions(portable["attention_mask"], seq, reference(portable))
        got = runner.run(feeds, out={out: feeds[inp] for inp, out in zip(past_names, present_names)})
        got_kv = [got[n][:, :, :total] for n in present_names]  # [B, H, P+S, D]
        got_kv = [t[:, :, total - r.shape[2]:] for t, r in zip(got_kv, ref[1:])]
        got_list = _valid_positions(portable["attention_mask"], seq, [np.repeat(got["logits"], seq, 1), *got_kv])
        ref[0], got_list[0] = ref[0][:, -1:], got_list[0][:, -1:]  # decoder_gqa returns the last position only
        diff, scale = _max_abs_diff(ref, got_list)
        tol = tolerance_scale * max(1.0, scale)
        if not diff <= tol:
            raise ValueError(f"graph decoder_gqa: ONNX Runtime differs from PyTorch by {diff:.3g} at {dims} (tolerance {tol:.3g})")
        worst = max(worst, diff)
        runs.append({"dims": dims, "max_abs_diff": diff, "tolerance": tol})
    return {"max_abs_diff": worst, "runs": runs}


def portable_feeds(num_layers: int, feeds: dict, dims: dict) -> dict:
    """decoder_gqa's feeds as the portable decoder takes them: past [B,H,capacity,D] cut to [B,H,P,D]."""
    past_names, _ = kv_names(num_layers)
    return {**feeds, **{n: feeds[n][:, :, : dims["past"]].copy() for n in past_names}}


def _valid_positions(mask: np.ndarray, seq: int, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Zero logits [B,S,V] and K/V [B,H,n,D] at left-pad positions (a pad never reaches a real token);
    K/V of length n are the last n slots of the mask [B, P+S]."""
    mask = mask.astype(bool)
    logits = np.where(mask[:, -seq:, None], outputs[0], 0)
    kv = [np.where(mask[:, None, mask.shape[1] - t.shape[2]:, None], t, 0) for t in outputs[1:]]
    return [logits, *kv]


def _max_abs_diff(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(max abs diff, max |ref|) over all outputs."""
    diff = max(float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)), initial=0.0)) for r, g in zip(ref, got))
    scale = max(float(np.max(np.abs(r.astype(np.float64)), initial=0.0)) for r in ref)
    return diff, scale
