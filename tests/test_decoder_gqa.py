"""decoder_gqa (export/decoder_gqa.py) against HF on seeded tiny backbones: Llama (also with biases), Mistral (window 4),
Qwen2 (biases; one full and one sliding layer), Gemma, Phi-3 (LongRoPE; partial rotary with a window of 5).

Each backbone: last-position prefill logits vs HF forward on inputs_embeds (incl. a left-padded batch),
a 16-token greedy decode driven in numpy on shared KV buffers vs HF `generate`, and `validate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmdeploy.export import decoder_gqa
from vlmdeploy.runtime.runners import OrtRunner
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec, kv_names

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=100, initializer_range=0.1, max_position_embeddings=64, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
PHI3_ROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=8,
                 short_factor=[1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5], long_factor=[1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0])


def _config(name: str):
    import transformers as tf

    if name == "llama":
        return tf.LlamaConfig(**SMALL)
    if name == "llama-bias":  # biases on q/k/v/o and the MLP
        return tf.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)
    if name == "mistral":
        return tf.MistralConfig(**SMALL, sliding_window=4)
    if name == "qwen2":  # layer 0 full attention, layer 1 a window of 4
        return tf.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if name == "gemma":
        return tf.GemmaConfig(**SMALL, hidden_act="gelu_pytorch_tanh")
    if name == "phi3":  # LongRoPE with original_max_position_embeddings 8: prompts and decode cross it
        return tf.Phi3Config(**SMALL, rope_parameters=dict(PHI3_ROPE), original_max_position_embeddings=8)
    if name == "phi3-partial":  # Phi-4-mini style: rotate the first half of each head; and a window of 5
        rope = {**PHI3_ROPE, "partial_rotary_factor": 0.5, "short_factor": PHI3_ROPE["short_factor"][:4],
                "long_factor": PHI3_ROPE["long_factor"][:4]}
        return tf.Phi3Config(**SMALL, rope_parameters=rope, original_max_position_embeddings=8, sliding_window=5)
    raise KeyError(name)


BACKBONES = ["llama", "llama-bias", "mistral", "qwen2", "gemma", "phi3", "phi3-partial"]
CLASSES = {"llama": "LlamaForCausalLM", "llama-bias": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM", "phi3-partial": "Phi3ForCausalLM"}


def _spec(cfg) -> GraphSpec:
    """runtime/spec.py's decoder_gqa spec for this text config (fp32)."""
    f, head_dim = "float32", decoder_gqa._head_dim(cfg)
    past, present = kv_names(cfg.num_hidden_layers)
    kv = ("batch", cfg.num_key_value_heads, "capacity", head_dim)
    return GraphSpec(
        "decoder_gqa",
        inputs=(TensorSpec("inputs_embeds", f, ("batch", "seq", cfg.hidden_size)),
                TensorSpec("attention_mask", "int64", ("batch", "total")),
                TensorSpec("position_ids", "int64", ("batch", "seq")),
                *(TensorSpec(n, f, kv) for n in past)),
        outputs=(TensorSpec("logits", f, ("batch", 1, cfg.vocab_size)), *(TensorSpec(n, f, kv) for n in present)),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (HF *ForCausalLM, ORT runner on its decoder_gqa, graph path, spec); built once per module."""
    import transformers

    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cfg = _config(name)
            model = getattr(transformers, CLASSES[name])(cfg).eval()
            with torch.no_grad():  # norms and biases away from their init (1 / 0 / zeros would hide mistakes)
                for pname, p in model.named_parameters():
                    if "norm" in pname or pname.endswith(".bias"):
                        p.add_(0.2 * torch.randn_like(p))
            model.generation_config.eos_token_id = None
            spec = _spec(cfg)
            path = tmp_path_factory.mktemp(name) / "decoder_gqa.onnx"
            decoder_gqa.save(decoder_gqa.build(model.model, model.lm_head, model.config, spec), path)
            cache[name] = (model, OrtRunner(path, spec, threads=1), path, spec)  # tiny: 1 thread, no spinning
        return cache[name]

    return get


def _prompt(model, batch_pads: list[int], seq: int, seed: int = 0):
    """(inputs_embeds [B,S,C] f32, attention_mask [B,S] i64, position_ids [B,S] i64); row b has pads on the left."""
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(3, model.config.vocab_size, (len(batch_pads), seq)))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).numpy()
    mask = np.ones((len(batch_pads), seq), np.int64)
    for row, pads in enumerate(batch_pads):
        mask[row, :pads] = 0
    return embeds, mask, _positions(mask)


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def _buffers(model, batch: int, capacity: int) -> dict:
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, capacity, decoder_gqa._head_dim(cfg))
    return {n: np.zeros(shape, np.float32) for n in kv_names(cfg.num_hidden_layers)[0]}


def _run(runner, cfg, embeds, mask, positions, buffers) -> np.ndarray:
    """One call with the buffers bound as past and present; logits [B, V] of the last position."""
    past, present = kv_names(cfg.num_hidden_layers)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **buffers}
    out = runner.run(feeds, out={o: buffers[i] for i, o in zip(past, present)})
    return out["logits"][:, -1]


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("pads", [[0], [3, 0]], ids=["batch1", "leftpad2"])
def test_prefill_logits_match_hf(built, name, pads):
    model, runner, _, spec = built(name)
    embeds, mask, positions = _prompt(model, pads, 12)
    with torch.no_grad():
        ref = model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits[:, -1].numpy()
    got = _run(runner, model.config, embeds, mask, positions, _buffers(model, len(pads), 12 + 3))
    assert np.abs(got - ref).max() <= 1e-4


def _greedy(model, runner, spec, embeds, mask, new_tokens: int) -> np.ndarray:
    """Greedy decode in numpy: prefill, then one-token steps into the same capacity-sized buffers."""
    cfg, batch = model.config, embeds.shape[0]
    with torch.no_grad():  # HF's embedding of every token (Gemma: scaled), looked up in numpy below
        table = model.get_input_embeddings()(torch.arange(cfg.vocab_size)).numpy()  # [V, C]
    buffers = _buffers(model, batch, mask.shape[1] + new_tokens)
    logits, tokens = _run(runner, cfg, embeds, mask, _positions(mask), buffers), []
    for _ in range(new_tokens):
        token = logits.argmax(-1)  # [B]
        tokens.append(token)
        embeds = table[token][:, None]  # [B, 1, C]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logits = _run(runner, cfg, embeds, mask, _positions(mask)[:, -1:], buffers)
    return np.stack(tokens, axis=1)  # [B, new_tokens]


@pytest.mark.parametrize("name", BACKBONES)
def test_greedy_decode_matches_hf_generate(built, name):
    model, runner, _, spec = built(name)
    seq = 6 if name.startswith("phi3") else 12  # Phi-3: short factors at prefill, long from position 8 on
    embeds, mask, _ = _prompt(model, [3, 0], seq, seed=1)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=16, do_sample=False).numpy()
    got = _greedy(model, runner, spec, embeds, mask, 16)
    assert got.tolist() == ref[:, -16:].tolist()


def _portable_reference(model):
    """The portable decoder in PyTorch: feeds with past [B,H,P,D] -> [logits [B,S,V], present k/v...]."""
    from transformers import DynamicCache

    cfg = model.config

    def run(feeds):
        past = [torch.from_numpy(feeds[n]) for n in kv_names(cfg.num_hidden_layers)[0]]
        cache = DynamicCache(config=cfg)
        for i in range(cfg.num_hidden_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        with torch.no_grad():
            out = model(inputs_embeds=torch.from_numpy(feeds["inputs_embeds"]),
                        attention_mask=torch.from_numpy(feeds["attention_mask"]),
                        position_ids=torch.from_numpy(feeds["position_ids"]), cache=cache, use_cache=True)
        return [out.logits.numpy(), *(t.numpy() for layer in cache.layers for t in (layer.keys, layer.values))]

    return run


def _feeds_at(model):
    """Random decoder_gqa feeds: row b has b left pads; past copied into capacity-sized buffers."""
    cfg, rng = model.config, np.random.default_rng(0)

    def feeds_at(dims):
        b, s, p = dims["batch"], dims["seq"], dims["past"]
        mask = np.ones((b, p + s), np.int64)
        for row in range(b):
            mask[row, : min(row, p + s - 1)] = 0
        buffers = _buffers(model, b, dims["capacity"])
        for buf in buffers.values():
            buf[:, :, :p] = rng.standard_normal(buf[:, :, :p].shape)
        embeds = rng.standard_normal((b, s, cfg.hidden_size)).astype(np.float32)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": _positions(mask)[:, p:], **buffers}

    return feeds_at


@pytest.mark.parametrize("name", BACKBONES)
def test_validate_against_portable_decoder(built, name):
    model, _, path, spec = built(name)
    dims_list = [{"batch": 1, "seq": 6, "past": 0, "capacity": 9}, {"batch": 2, "seq": 5, "past": 0, "capacity": 8},
                 {"batch": 2, "seq": 1, "past": 9, "capacity": 12}, {"batch": 3, "seq": 1, "past": 4, "capacity": 5}]
    record = decoder_gqa.validate(path, spec, _portable_reference(model), _feeds_at(model), dims_list,
                                  model.config.num_hidden_layers, tolerance_scale=1e-4)
    assert record["max_abs_diff"] <= 1e-4 and len(record["runs"]) == 4


def test_validate_raises_beyond_tolerance(built):
    model, _, path, spec = built("llama")
    reference = _portable_reference(model)

    def off(feeds):
        out = reference(feeds)
        return [out[0] + 1.0, *out[1:]]

    with pytest.raises(ValueError, match="differs from PyTorch"):
        decoder_gqa.validate(path, spec, off, _feeds_at(model), [{"batch": 1, "seq": 3, "past": 0, "capacity": 4}],
                             model.config.num_hidden_layers, tolerance_scale=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_supported_tiny_configs(name):
    assert decoder_gqa.unsupported_reason(_config(name), "float32") is None


def test_gemma_embed_scale_only_where_the_embedding_lacks_it(built):
    """transformers 5.x scales in GemmaTextScaledWordEmbedding (graph must not); 4.x scaled inputs_embeds in forward."""
    model = built("gemma")[0]
    assert decoder_gqa.Arch.of(model.model, model.config, rotary_dim=16).embed_scale is None
    plain = torch.nn.Module()
    plain.embed_tokens = torch.nn.Embedding(4, 64)
    assert decoder_gqa.Arch.of(plain, model.config, rotary_dim=16).embed_scale == pytest.approx(8.0)


def _one_line(reason):
    return isinstance(reason, str) and reason and "\n" not in reason


def test_unsupported_reasons():
    import transformers as tf

    cfg = tf.LlamaConfig(**{**SMALL, "head_dim": None, "hidden_size": 80, "num_attention_heads": 4})  # 80 / 4 = 20
    reason = decoder_gqa.unsupported_reason(cfg, "float32")
    assert _one_line(reason) and "head_dim 20" in reason
    assert _one_line(decoder_gqa.unsupported_reason(tf.GPT2Config(), "float32"))
    assert "model_type" in decoder_gqa.unsupported_reason(tf.GPT2Config(), "float32")
    assert _one_line(decoder_gqa.unsupported_reason(_config("llama"), "float16"))
    dynamic = tf.LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "dynamic" in decoder_gqa.unsupported_reason(dynamic, "float32")
    with pytest.raises(NotImplementedError, match="head_dim 20"):
        decoder_gqa.build(None, None, cfg, _spec(_config("llama")))
