"""Optimization profiles from the graph spec and the build limits (CPU; no TensorRT)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlmdeploy.runtime.spec import ModelDims, llava_graph_specs
from vlmdeploy.runtime.tensorrt.backends import profile_shape_options
from vlmdeploy.runtime.tensorrt.greedy import greedy_spec
from vlmdeploy.runtime.tensorrt.profiles import (DimRange, Limits, Profile, ProfileError, check_profiles, derive_profiles,
                                                 envelope, select_profile, shared_dim_problems)

DIMS = ModelDims(image_size=(56, 56), vision_tokens=16, vision_hidden=64, hidden=64, vocab=256, num_layers=2,
                 kv_heads=2, head_dim=16, dtype="float32")
ENGINE_GRAPHS = ("vision", "projector", "embed", "decoder")
SPECS = {**{g: llava_graph_specs(DIMS)[g] for g in ENGINE_GRAPHS}, "greedy": greedy_spec(DIMS)}
FACTS = SimpleNamespace(context_length=512, tokens_per_image=16)
LIMITS = Limits.for_model(FACTS, max_batch=4, max_images=6, max_context=256, max_input=128)


def _ranges(profile: Profile) -> dict[str, tuple[int, int, int]]:
    return {d: (r.min, r.opt, r.max) for d, r in profile.dims.items()}


def test_limits_defaults_come_from_the_model():
    limits = Limits.for_model(FACTS)
    assert (limits.max_batch, limits.max_images, limits.max_context, limits.max_input) == (1, 4, 512, 512)
    assert limits.typical_input == 16 + 64  # one image and a short question: what TensorRT tunes prefill for


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_context=1024), "max_context 1024 > the model's context length 512"),
    (dict(max_context=64, max_input=65), "max_input 65 > max_context 64"),
    (dict(max_batch=0), "max_batch must be an int >= 1"),
])
def test_limits_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Limits.for_model(FACTS, **kwargs)


def test_vision_and_projector_get_one_profile_over_images():
    for name in ("vision", "projector"):
        (profile,) = derive_profiles(SPECS[name], LIMITS)
        assert _ranges(profile) == {"num_images": (1, 1, 6)}


def test_embed_and_greedy_cover_prefill_and_decode_in_one_profile():
    for name in ("embed", "greedy"):
        (profile,) = derive_profiles(SPECS[name], LIMITS)
        assert _ranges(profile) == {"batch": (1, 1, 4), "seq": (1, 80, 128)}


def test_decoder_gets_prefill_and_decode_profiles():
    prefill, decode = derive_profiles(SPECS["decoder"], LIMITS)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert _ranges(prefill) == {"batch": (1, 1, 4), "seq": (1, 80, 128), "total": (1, 80, 128), "past": (0, 0, 0)}
    assert _ranges(decode) == {"batch": (1, 1, 4), "seq": (1, 1, 1), "total": (1, 129, 256), "past": (0, 128, 255)}


def test_every_tensor_sharing_a_dim_gets_the_same_range():
    """What TensorRT requires (NVIDIA/TensorRT#1808), checked on the per-input shapes handed to it."""
    for name, spec in SPECS.items():
        profiles = derive_profiles(spec, LIMITS)
        assert check_profiles(spec, profiles) == [], name
    decode = derive_profiles(SPECS["decoder"], LIMITS)[1]
    shapes = decode.shapes(SPECS["decoder"])
    assert shapes["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 128, 16), (4, 2, 255, 16))
    assert shapes["attention_mask"] == ((1, 1), (1, 129), (4, 256))
    assert shapes["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (4, 1, 64))


def test_hand_typed_shapes_with_two_ranges_for_one_dim_are_caught():
    spec = SPECS["decoder"]
    shapes = derive_profiles(spec, LIMITS)[1].shapes(spec)
    shapes["past_key_values.1.value"] = ((1, 2, 0, 16), (1, 2, 64, 16), (4, 2, 255, 16))  # opt differs from the others
    shapes["attention_mask"] = ((1, 1), (1, 129), (8, 256))  # batch max differs
    problems = shared_dim_problems(spec, shapes)
    assert "dim 'past' is (0, 128, 255) on 'past_key_values.0.key' but (0, 64, 255) on 'past_key_values.1.value'" in problems
    assert "dim 'batch' is (1, 1, 4) on 'inputs_embeds' but (1, 1, 8) on 'attention_mask'" in problems
    shapes.pop("position_ids")
    assert "input 'position_ids' has no shapes in the profile" in shared_dim_problems(spec, shapes)


def test_polygraphy_profiles_are_what_we_derived():
    pytest.importorskip("polygraphy")
    from vlmdeploy.runtime.tensorrt.loader import polygraphy_profiles

    spec = SPECS["decoder"]
    ours = derive_profiles(spec, LIMITS)
    theirs = polygraphy_profiles(spec, ours)
    assert len(theirs) == 2
    for mine, poly in zip(ours, theirs):
        shapes = {name: tuple(poly[name]) for name in spec.input_names}
        assert shapes == mine.shapes(spec)
        assert shared_dim_problems(spec, shapes) == []


def test_a_dim_with_no_limit_is_an_error():
    from vlmdeploy.runtime.spec import GraphSpec, TensorSpec

    spec = GraphSpec("tiles", (TensorSpec("x", "float32", ("num_tiles", 3)),), (TensorSpec("y", "float32", ("num_tiles", 3)),))
    with pytest.raises(ValueError, match="no profile range for dynamic dim 'num_tiles'"):
        derive_profiles(spec, LIMITS)


def test_select_profile_by_phase():
    spec, profiles = SPECS["decoder"], derive_profiles(SPECS["decoder"], LIMITS)
    assert select_profile(spec, profiles, {"batch": 2, "seq": 100, "past": 0, "total": 100}) == 0
    assert select_profile(spec, profiles, {"batch": 2, "seq": 1, "past": 0, "total": 1}) == 0  # first that fits
    assert select_profile(spec, profiles, {"batch": 2, "seq": 1, "past": 200, "total": 201}) == 1


def test_shape_outside_every_profile_names_tensor_shape_and_ranges():
    spec, profiles = SPECS["decoder"], derive_profiles(SPECS["decoder"], LIMITS)
    with pytest.raises(ProfileError) as e:
        select_profile(spec, profiles, {"batch": 1, "seq": 200, "past": 0, "total": 200})
    msg = str(e.value)
    assert "graph 'decoder' input 'inputs_embeds': shape [1, 200, 64] (seq=200) is outside every optimization profile" in msg
    assert "prefill: batch 1..4, seq 1..128, total 1..128, past 0..0; decode: batch 1..4, seq 1..1" in msg
    with pytest.raises(ProfileError, match=r"input 'past_key_values.0.key': shape \[1, 2, 300, 16\] \(past=300\)"):
        select_profile(spec, profiles, {"batch": 1, "seq": 1, "past": 300, "total": 301})
    with pytest.raises(ProfileError, match=r"input 'pixel_values': shape \[7, 3, 56, 56\] \(num_images=7\)"):
        select_profile(SPECS["vision"], derive_profiles(SPECS["vision"], LIMITS), {"num_images": 7})


def test_profiles_round_trip_through_json():
    for profile in derive_profiles(SPECS["decoder"], LIMITS):
        assert Profile.from_dict(profile.to_dict()) == profile
    assert Limits.from_dict(LIMITS.to_dict()) == LIMITS


def test_ort_tensorrt_ep_gets_one_envelope_profile():
    spec = SPECS["decoder"]
    env = envelope("ort-trt", derive_profiles(spec, LIMITS))
    assert _ranges(env) == {"batch": (1, 1, 4), "seq": (1, 80, 128), "total": (1, 129, 256), "past": (0, 128, 255)}
    options = profile_shape_options(spec, env)
    assert options["trt_profile_min_shapes"].startswith("inputs_embeds:1x1x64,attention_mask:1x1,position_ids:1x1,"
                                                         "past_key_values.0.key:1x2x0x16,")
    assert "past_key_values.1.value:4x2x255x16" in options["trt_profile_max_shapes"]
    assert set(options) == {"trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"}


def test_dim_range_is_validated():
    with pytest.raises(ValueError, match="need 0 <= min <= opt <= max"):
        DimRange(4, 2, 8)
