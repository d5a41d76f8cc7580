"""`make bigckpt`: a seeded random checkpoint with a real model's shapes, written one shard at a time.
Checked on the 7B recipe's tensor list (no weights written) and on a small architecture written in full:
HF loads it with no missing or unexpected keys, the bytes are seeded, shards stay under the budget,
and `vlmdeploy export` takes it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from vlmdeploy.export import bigckpt
from vlmdeploy.export.recipes import TinyConfig

SMALL = TinyConfig(image_size=28, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=64,
                   text_layers=2, text_heads=4, text_kv_heads=4, text_intermediate=128, vocab_size=300, context_length=128)


def test_the_7b_and_13b_recipes_have_llava_15_shapes():
    for recipe, params in (("llava", 7.063e9), ("llava-13b", 13.35e9)):
        config, specs = bigckpt.tensor_specs(bigckpt.tiny_config_for(recipe))
        total = sum(int(np.prod(shape)) for _, shape in specs)
        assert abs(total - params) / params < 1e-3, (recipe, total)
    shapes = dict(specs)
    assert shapes["model.language_model.embed_tokens.weight"] == (32064, 5120)
    assert shapes["model.vision_tower.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)


def test_written_checkpoint_loads_in_hf_seeded_and_sharded(tmp_path, monkeypatch):
    import safetensors.numpy
    import transformers

    held = []
    real_save = safetensors.numpy.save_file

    def recording_save(tensors, path, metadata=None):
        held.append(sum(t.nbytes for t in tensors.values()))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", recording_save)
    budget = 60_000
    meta = bigckpt.write_checkpoint("llava", tmp_path / "a", seed=3, shard_bytes=budget, log=lambda m: None, cfg=SMALL)
    _, specs = bigckpt.tensor_specs(SMALL)
    biggest = max(int(np.prod(s)) * 2 for _, s in specs)
    assert len(held) > 3 and max(held) <= max(budget, biggest)  # one shard in memory at a time
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in specs} and meta["total_size"] == sum(held)

    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "a", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.dtype.is_floating_point
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    want = bigckpt.random_tensor(name, dict(specs)[name], 3, np.float16)
    assert np.array_equal(model.state_dict()[name].numpy(), want)

    bigckpt.write_checkpoint("llava", tmp_path / "b", seed=3, shard_bytes=budget, log=lambda m: None, cfg=SMALL)
    bigckpt.write_checkpoint("llava", tmp_path / "c", seed=4, shard_bytes=budget, log=lambda m: None, cfg=SMALL)
    first = sorted((tmp_path / "a").glob("model-*.safetensors"))[0].name
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()
    with pytest.raises(FileExistsError):
        bigckpt.write_checkpoint("llava", tmp_path / "a", cfg=SMALL, log=lambda m: None)


def test_export_takes_the_generated_checkpoint(tmp_path):
    from vlmdeploy.export.exporter import export_model
    from vlmdeploy.runtime.vlm import VLM

    bigckpt.write_checkpoint("llava", tmp_path / "ckpt", cfg=dataclasses.replace(SMALL, seed=1), log=lambda m: None)
    export_model(str(tmp_path / "ckpt"), tmp_path / "art", dtype="fp16", log=lambda m: None)
    vlm = VLM.load(tmp_path / "art")
    assert vlm.manifest.source["dtype"] == "fp16"
    assert len(vlm.generate("USER: hi ASSISTANT:", max_new_tokens=3, ignore_eos=True).token_ids) == 3
