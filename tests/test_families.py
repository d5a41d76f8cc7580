"""Every family x text backbone x vision tower: a seeded tiny checkpoint exported with the real
exporter, then the torch-free runtime against HF `generate` (greedy, 24 new tokens, EOS off) on a
non-square photo, two images of different sizes in one prompt, text only, and a left-padded batch,
through each decoder the export has; prefill logits within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAMILY_VARIANTS, noise_image, photo
from test_parity import NEW_TOKENS, hf_generate
from vlmdeploy.runtime.vlm import VLM

ONE = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO = "USER: <image> and <image>\nCompare them. ASSISTANT:"
TEXT = "USER: Tell me a story. ASSISTANT:"
CASES = {
    "non-square photo": (ONE, lambda: [photo("chelsea")]),  # 451 x 300
    "two images of different sizes": (TWO, lambda: [photo("coffee"), noise_image(3, size=(30, 70))]),
    "text only": (TEXT, lambda: []),
}


def _decoders(artifact) -> list[str]:
    return VLM.load(artifact, verify=False).facts.pipeline["decoders"]


@pytest.fixture(scope="module", params=list(FAMILY_VARIANTS))
def exported(request, exported_factory):
    return exported_factory(request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_hf(exported, case):
    prompt, images = CASES[case]
    want = hf_generate(exported, [prompt], [images()])[0]
    for decoder in _decoders(exported.artifact):
        got = VLM.load(exported.artifact, decoder=decoder).generate(prompt, images(), max_new_tokens=NEW_TOKENS,
                                                                   ignore_eos=True)
        assert got.token_ids == want, (exported.name, decoder, case)


def test_left_padded_batch_equals_hf(exported):
    prompts = [p for p, _ in CASES.values()]
    images = [imgs() for _, imgs in CASES.values()]
    want = hf_generate(exported, prompts, images)
    for decoder in _decoders(exported.artifact):
        got = VLM.load(exported.artifact, decoder=decoder).generate_batch(prompts, images, max_new_tokens=NEW_TOKENS,
                                                                         ignore_eos=True)
        assert [g.token_ids for g in got] == want, (exported.name, decoder)


def test_prefill_logits_match_hf(exported):
    images = [photo("astronaut"), noise_image(4, size=(60, 20))]
    inputs = exported.processor(images=images, text=[TWO], return_tensors="pt")
    with torch.no_grad():
        ref = exported.model(**inputs).logits[0].numpy()  # [S, V]
    ours = VLM.load(exported.artifact).prefill_logits(TWO, images)[0]
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= 1e-4


def test_manifest_says_what_the_runtime_needs(exported):
    facts = VLM.load(exported.artifact).facts
    cfg = exported.model.config
    assert facts.family == cfg.model_type and facts.positions == "cumsum"
    assert len(facts.kv_layers) == cfg.text_config.num_hidden_layers
    window = getattr(cfg.text_config, "sliding_window", None) if cfg.text_config.model_type == "mistral" else None
    assert {k.window for k in facts.kv_layers} == {window}
    names = {d for spec in VLM.load(exported.artifact).manifest.graphs.values() for d in spec.dim_names()}
    assert names <= set(facts.limits)  # every named dim has its limit (None: unbounded by the model)
    if facts.family == "llava_next":
        assert facts.tensors == {"image_newline": "image_newline.npy"}
        assert facts.limits["rows_per_image"] == 5  # base + the 2x2 grid


def test_decoder_gqa_falls_back_with_a_reason(exported_factory):
    """head_dim 20 (hidden 80 / 4 heads): ONNX Runtime's GroupQueryAttention cannot run it, so the export
    ships the portable decoder only instead of failing."""
    exp = exported_factory("llava-llama-clip-hd20")
    assert _decoders(exp.artifact) == ["decoder"]
    vlm = VLM.load(exp.artifact)
    assert vlm.decoder_graph == "decoder" and "decoder_gqa" not in vlm.manifest.graphs


def test_check_tensorrt_passes_every_family(exported):
    """The static TensorRT lint (ops, profiles from the spec's dims and the manifest's limits) on each family's graphs."""
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    report = check_artifact(exported.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed
    ok = "\n".join(report.ok)
    for graph in ("vision", "projector", "embed", "decoder", "greedy"):
        assert f"{graph}: tensorrt profiles:" in ok
    rows = VLM.load(exported.artifact, verify=False).facts.limits["rows_per_image"]
    assert f"num_images 1..{4 * rows}" in ok  # 4 images per call, each up to `rows` vision rows


def test_top_level_import():
    import vlmdeploy
    from vlmdeploy import VLM as TopLevelVLM

    assert TopLevelVLM is VLM and vlmdeploy.ArtifactError.__name__ == "ArtifactError"


def test_unknown_architecture_lists_the_supported_ones():
    from types import SimpleNamespace

    from vlmdeploy.export.recipes import RecipeError
    from vlmdeploy.export.registry import FAMILIES, family_for

    with pytest.raises(RecipeError, match=r"not supported; supported: \[.*'LlavaNextForConditionalGeneration'"):
        family_for(SimpleNamespace(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma"))
    assert all(family_for(SimpleNamespace(architectures=[a])).architectures for a in FAMILIES)


def test_runtime_family_registry_matches_export():
    """Every export family names a runtime family that exists (one file + one line on each side)."""
    from types import SimpleNamespace

    from vlmdeploy.export.registry import FAMILIES, family_for
    from vlmdeploy.runtime.families import FAMILIES as RUNTIME, family_class

    names = {family_for(SimpleNamespace(architectures=[a])).family for a in FAMILIES}
    assert names == set(RUNTIME) and all(family_class(n).name == n for n in names)


def test_v1_artifact_still_loads_and_generates_the_same(tiny, tmp_path):
    """An artifact written by vlmdeploy before manifest v2 (LLaVA-1.5 only) is upgraded on load."""
    import json
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(tiny.artifact, old)
    m = json.loads((old / "manifest.json").read_text())
    facts = m["model"]
    v1_model = {  # the v1 ModelFacts fields, exactly
        "family": "llava", "dims": facts["dims"], "image_token": facts["media"]["image"]["placeholder"],
        "image_token_id": facts["media"]["image"]["token_id"], "tokens_per_image": facts["media"]["image"]["typical_tokens"],
        "eos_token_ids": facts["eos_token_ids"], "pad_token_id": facts["pad_token_id"], "bos_token": facts["bos_token"],
        "eos_token": facts["eos_token"], "context_length": facts["context_length"],
        "vision_feature_layer": facts["family_params"]["vision_feature_layer"],
        "vision_feature_select_strategy": facts["family_params"]["vision_feature_select_strategy"],
    }
    (old / "manifest.json").write_text(json.dumps({**m, "manifest_version": 1, "model": v1_model}))
    img = photo("coffee")
    want = VLM.load(tiny.artifact).generate(ONE, [img], max_new_tokens=8, ignore_eos=True).token_ids
    vlm = VLM.load(old)
    assert vlm.facts.family == "llava" and vlm.facts.pipeline["decoders"] == ["decoder_gqa", "decoder"]
    assert vlm.generate(ONE, [img], max_new_tokens=8, ignore_eos=True).token_ids == want


def test_cli_exports_checks_and_runs_a_checkpoint_dir(exported_factory, tmp_path, capsys):
    """`vlmdeploy export --model DIR` on a LLaVA-NeXT checkpoint, then `check` and `run` (the chat
    template, a non-square photo): the same tokens as HF's chat prompt through `generate`."""
    import json

    from vlmdeploy.runtime.cli import main

    exp = exported_factory("llava_next-mistral-clip")
    out = tmp_path / "next"
    assert main(["export", "--model", str(exp.checkpoint), "--out", str(out)]) == 0
    assert main(["check", str(out)]) == 0
    image = tmp_path / "cat.png"
    photo("chelsea").save(image)
    capsys.readouterr()
    assert main(["run", str(out), "--image", str(image), "--prompt", "Describe it.", "--max-new-tokens", "24",
                 "--ignore-eos", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["token_ids"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = exp.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert got == hf_generate(exp, [prompt], [[photo("chelsea")]])[0]


def test_tiny_next_recipe_builds(tmp_path):
    """`make demo MODEL=tiny-next`'s recipe: a random-init LLaVA-NeXT on Mistral."""
    from vlmdeploy.export.recipes import load_recipe

    cfg = load_recipe("tiny-next").random_init
    assert (cfg.family, cfg.text_model, cfg.vision_model) == ("llava_next", "mistral", "clip")


def test_an_optional_graph_that_fails_never_fails_the_export(tiny, tmp_path, monkeypatch):
    """decoder_gqa's builder raising (a transformers change, an ORT kernel limit) leaves a complete
    artifact with the portable decoder, and says why in one line."""
    from vlmdeploy.export import decoder_gqa
    from vlmdeploy.export.exporter import export_model

    def broken(*a, **k):
        raise RuntimeError("simulated builder failure")

    monkeypatch.setattr(decoder_gqa, "build", broken)
    lines = []
    export_model(str(tiny.checkpoint), tmp_path / "art", log=lines.append)
    assert any("decoder_gqa: skipped" in line and "simulated builder failure" in line for line in lines)
    vlm = VLM.load(tmp_path / "art")
    assert vlm.decoder_graph == "decoder" and not list((tmp_path / "art").glob("decoder_gqa*"))
    assert vlm.generate(ONE, [photo("coffee")], max_new_tokens=4, ignore_eos=True).token_ids
