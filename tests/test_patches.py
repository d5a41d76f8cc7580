"""Length-dependent RoPE (Phi-3 LongRoPE, dynamic NTK) exports exactly: export/patches.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from vlmdeploy.export import onnx_export
from vlmdeploy.export.components import DecoderGraph
from vlmdeploy.export.patches import traceable_rope
from vlmdeploy.runtime.dummy import export_dims, sample_feeds
from vlmdeploy.runtime.runners import OrtRunner
from vlmdeploy.runtime.spec import ModelDims, llava_graph_specs

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
DIMS = ModelDims((28, 28), 4, 64, 64, 256, 2, 2, 16, "float32")
# original length 16: total 20 is beyond it; (1, 15) ends exactly at it (short), (1, 16) one past
# (long); batch 2 past 16: row 0 reaches position 16, row 1 (one left pad) 15 - HF's max is per batch
SHAPES = [
    {"batch": 1, "seq": 6, "past": 0},
    {"batch": 1, "seq": 20, "past": 0},
    {"batch": 1, "seq": 1, "past": 20},
    {"batch": 2, "seq": 1, "past": 9},
    {"batch": 1, "seq": 1, "past": 15},
    {"batch": 1, "seq": 1, "past": 16},
    {"batch": 2, "seq": 1, "past": 16},
]


def phi3_longrope():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(**SMALL, max_position_embeddings=64, original_max_position_embeddings=16,
                     rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                   "long_factor": [2.0 + 0.3 * i for i in range(8)]})
    torch.manual_seed(0)
    return Phi3ForCausalLM(cfg).eval()


def llama(**rope):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(**SMALL, max_position_embeddings=16, **rope)).eval()


def export_decoder(model, tmp_path):
    module = DecoderGraph(model.model, model.lm_head, model.config).eval()
    spec = llava_graph_specs(DIMS)["decoder"]
    facts = SimpleNamespace(dims=DIMS, positions="cumsum")
    rng = np.random.default_rng(0)
    path = tmp_path / "decoder.onnx"
    onnx_export.export_graph(module, spec, sample_feeds(spec, export_dims(spec), facts, rng), path, 18)
    return module, spec, path, lambda dims: sample_feeds(spec, dims, facts, rng)


def worst(ref, got, spec):
    return max(float(np.abs(r - got[n]).max()) for r, n in zip(ref, spec.output_names))


def test_longrope_decoder_matches_hf_at_every_length(tmp_path):
    model = phi3_longrope()
    before = copy.deepcopy(model)  # never traced
    module, spec, path, feeds_at = export_decoder(model, tmp_path)
    rotary = model.model.rotary_emb
    assert "forward" not in vars(rotary)  # patch gone after export
    assert not any(isinstance(v, FakeTensor) for v in vars(rotary).values())  # nothing leaked from the trace
    assert not {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node} & {"If", "Loop"}

    runner = OrtRunner(path, spec)
    reference = onnx_export.torch_reference(module, spec)  # what export validation runs
    untraced = onnx_export.torch_reference(DecoderGraph(before.model, before.lm_head, before.config).eval(), spec)
    diffs = {}
    for dims in SHAPES:
        feeds = feeds_at(dims)
        got = runner.run(feeds)
        ref = reference(feeds)
        diffs[str(dims)] = worst(ref, got, spec)
        assert worst(untraced(feeds), got, spec) <= 1e-4, dims
    assert max(diffs.values()) <= 1e-4, diffs
    # the long factors really are in use beyond the original length: short-only would differ
    assert float(np.abs(reference(feeds_at(SHAPES[2]))[0]).max()) > 0


def test_dynamic_ntk_exports_and_matches_a_fresh_hf_module(tmp_path):
    model = llama(rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    pristine = copy.deepcopy(model)
    _, spec, path, feeds_at = export_decoder(model, tmp_path)  # unpatched: GuardOnDataDependentSymNode
    runner = OrtRunner(path, spec)
    for dims in SHAPES[:4]:
        fresh = copy.deepcopy(pristine)  # HF's dynamic module remembers the longest length it saw
        ref = onnx_export.torch_reference(DecoderGraph(fresh.model, fresh.lm_head, fresh.config).eval(), spec)
        feeds = feeds_at(dims)
        assert worst(ref(feeds), runner.run(feeds), spec) <= 1e-4, dims


def test_patch_is_exact_in_eager_and_leaves_other_rope_alone():
    model = phi3_longrope()
    rotary = model.model.rotary_emb
    x = torch.randn(2, 5, 64)
    for last in (10, 15, 16, 40):  # around original_max_position_embeddings = 16
        pos = torch.arange(last - 4, last + 1).expand(2, 5)
        want = rotary(x, pos)
        with traceable_rope(model.model) as names:
            assert names == ["rotary_emb"]
            got = rotary(x, pos)
        assert all(torch.equal(w, g) for w, g in zip(want, got)), last
    assert "forward" not in vars(rotary)

    plain = llama()
    ids = torch.randint(0, 256, (1, 7))
    want = plain(ids).logits
    with traceable_rope(plain.model) as names:
        assert names == []
        assert "forward" not in vars(plain.model.rotary_emb)
        got = plain(ids).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("rope", [{"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                                  {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}])
def test_static_rope_types_are_not_patched(rope):
    model = llama(**rope)
    with traceable_rope(model.model) as names:
        assert names == []
