"""The ORT-optimized decoder for Llama-family text models: `decoder_gqa`.

Same inputs as the portable decoder except the cache: each layer's K/V is ONE preallocated buffer
`[B, Hkv, capacity, D]`, bound as both past and present (ONNX Runtime's GroupQueryAttention with a
shared past/present buffer writes the new entries in place; nothing grows or is copied per step).
Only the last position's logits are computed.

Per layer (weights from the HF model, transposed for MatMul):

    x --SkipSimplifiedLayerNorm(+residual)--> h --MatMul(Wqkv)--> Split -> q, k, v
    q, k --RotaryEmbedding(position_ids)-->            (positions from the runtime: HF's left-pad rule)
    q, k, v, cache_k, cache_v, bias --GroupQueryAttention--> a --MatMul(Wo)--> o
    o --SkipSimplifiedLayerNorm(+residual)--> h2 --MatMul(Wg), MatMul(Wu)--> silu(g) * u --MatMul(Wd)--> x'

Left padding: GroupQueryAttention has no mask input, so pads are masked with `attention_bias`
[B, 1, S, T] (0 or the float32 minimum) built in the graph from `attention_mask`, and every row
shares one cache length T (pads occupy cache slots, as in HF). RoPE is applied outside the
attention op with the explicit `position_ids`, which keeps left-padded rows token-exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from vlmdeploy.runtime.spec import GraphSpec, kv_names

MS = "com.microsoft"
F32_MIN = float(np.finfo(np.float32).min)


class Graph:
    """Nodes and initializers under construction; `op` returns the output name(s)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d scalars
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs):
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = outputs or [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def _weight(linear: torch.nn.Linear) -> np.ndarray:
    return linear.weight.detach().float().numpy().T  # [in, out]


def _rope_caches(text_model, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, D/2] exactly as the HF rotary module computes them."""
    positions = torch.arange(max_positions)[None]
    dummy = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(dummy, positions)  # [1, P, D], halves repeated
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


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


def _layer(g: Graph, i: int, layer, cfg, x: str, residual: str | None, mask_parts) -> tuple[str, str]:
    """One decoder layer; returns (mlp output, residual stream) for the next layer's fused norm."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    attn, mlp = layer.self_attn, layer.mlp
    w_in = g.const(f"l{i}.input_norm", layer.input_layernorm.weight.detach().float().numpy())
    if residual is None:
        h, residual = _rms_norm(g, x, w_in, eps), x
    else:
        h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [x, residual, w_in], n_out=4, domain=MS, epsilon=eps)
    wqkv = np.concatenate([_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)], axis=1)
    qkv = g.op("MatMul", [h, g.const(f"l{i}.qkv", wqkv)])
    split = g.const(f"l{i}.split", np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64))
    q, k, v = g.op("Split", [qkv, split], n_out=3, axis=-1)
    q = g.op("RotaryEmbedding", [q, "position_ids", "rope_cos", "rope_sin"], domain=MS, num_heads=heads, interleaved=0)
    k = g.op("RotaryEmbedding", [k, "position_ids", "rope_cos", "rope_sin"], domain=MS, num_heads=kv_heads, interleaved=0)
    seqlens, total32, bias = mask_parts
    (past_k, past_v), (present_k, present_v) = kv_names(1)[0], kv_names(1)[1]
    names = [n.replace(".0.", f".{i}.") for n in (past_k, past_v, present_k, present_v)]
    # present is written into the buffer bound as past (shared): outputs are the graph outputs themselves
    a, _, _ = g.op(
        "GroupQueryAttention", [q, k, v, names[0], names[1], seqlens, total32, "", "", "", bias],
        outputs=[f"l{i}.attn", names[2], names[3]], domain=MS, name=f"l{i}.gqa",
        num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim**-0.5),
    )
    o = g.op("MatMul", [a, g.const(f"l{i}.o", _weight(attn.o_proj))])
    w_post = g.const(f"l{i}.post_norm", layer.post_attention_layernorm.weight.detach().float().numpy())
    h2, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, w_post], n_out=4, domain=MS, epsilon=eps)
    gate = g.op("MatMul", [h2, g.const(f"l{i}.gate", _weight(mlp.gate_proj))])
    up = g.op("MatMul", [h2, g.const(f"l{i}.up", _weight(mlp.up_proj))])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # silu(gate) * up
    out = g.op("MatMul", [act, g.const(f"l{i}.down", _weight(mlp.down_proj))])
    return out, residual


def _rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    """x * rsqrt(mean(x^2) + eps) * weight, in standard ops (ONNX Runtime fuses it)."""
    var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const("axes_last", np.array([-1], np.int64))], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const("rms_eps", np.array(eps, np.float32))])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), weight])


def check_supported(text_config) -> None:
    """Raise NotImplementedError for text models this builder does not reproduce exactly."""
    if text_config.model_type not in ("llama",):
        raise NotImplementedError(f"decoder_gqa supports Llama text models, not {text_config.model_type}")
    if getattr(text_config, "attention_bias", False) or getattr(text_config, "mlp_bias", False):
        raise NotImplementedError("decoder_gqa: Llama with attention/MLP biases is not supported")
    if getattr(text_config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"decoder_gqa: hidden_act {text_config.hidden_act} is not supported")


def build_decoder_gqa(model, spec: GraphSpec) -> onnx.ModelProto:
    """The ONNX model for `spec` (llava `decoder_gqa`) from an HF LlavaForConditionalGeneration."""
    text_model, cfg = model.model.language_model, model.config.get_text_config()
    check_supported(cfg)
    g = Graph()
    cos, sin = _rope_caches(text_model, cfg.max_position_embeddings)
    g.const("rope_cos", cos)
    g.const("rope_sin", sin)
    mask_parts = _mask_inputs(g)
    x, residual = "inputs_embeds", None
    for i, layer in enumerate(text_model.layers):
        x, residual = _layer(g, i, layer, cfg, x, residual, mask_parts)
    w_final = g.const("final_norm", text_model.norm.weight.detach().float().numpy())
    h, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [x, residual, w_final], n_out=4, domain=MS, epsilon=cfg.rms_norm_eps)
    last = g.op("Gather", [h, g.const("last_index", np.array([-1], np.int64))], axis=1)  # [B, 1, C]
    g.op("MatMul", [last, g.const("lm_head", _weight(model.lm_head))], outputs=["logits"])
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


def validate(path, spec: GraphSpec, model, facts, dims_list: list[dict], tolerance_scale: float) -> dict:
    """decoder_gqa in ONNX Runtime, driven as the runtime drives it (shared buffers bound as past and
    present), against HF's decoder (the portable DecoderGraph) on the same random inputs."""
    from vlmdeploy.runtime.dummy import bound_outputs, sample_feeds
    from vlmdeploy.runtime.runners import OrtRunner

    from .llava import DecoderGraph, valid_positions
    from .onnx_export import max_abs_diff, torch_reference

    runner, reference = OrtRunner(path, spec), torch_reference(DecoderGraph(model).eval(), _portable_spec(spec))
    rng, worst, runs = np.random.default_rng(0), 0.0, []
    for dims in dims_list:
        feeds = sample_feeds("decoder_gqa", dims, facts, np.random.default_rng(rng.integers(1 << 31)))
        portable = {**feeds, **{n: feeds[n][:, :, : dims["past"]] for n in kv_names(facts.dims.num_layers)[0]}}
        ref = valid_positions("decoder", portable, reference(portable))
        got = runner.run(feeds, out=bound_outputs("decoder_gqa", feeds))
        total = dims["past"] + dims["seq"]
        got_list = [got["logits"], *(got[n][:, :, :total] for n in kv_names(facts.dims.num_layers)[1])]
        got_list = valid_positions("decoder", portable, [np.repeat(got_list[0], dims["seq"], 1), *got_list[1:]])
        ref[0], got_list[0] = ref[0][:, -1:], got_list[0][:, -1:]  # decoder_gqa returns the last position only
        diff, scale = max_abs_diff(ref, got_list)
        tol = tolerance_scale * max(1.0, scale)
        if not diff <= tol:
            raise ValueError(f"graph decoder_gqa: ONNX Runtime differs from PyTorch by {diff:.3g} at {dims} (tolerance {tol:.3g})")
        worst = max(worst, diff)
        runs.append({"dims": dims, "max_abs_diff": diff, "tolerance": tol})
    return {"max_abs_diff": worst, "runs": runs}


def _portable_spec(spec: GraphSpec) -> GraphSpec:
    """The input order of the portable decoder (same names as decoder_gqa's)."""
    return GraphSpec("decoder", spec.inputs, spec.outputs)
