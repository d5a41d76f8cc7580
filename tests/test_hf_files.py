"""read_processor_files must read transformers 5.x and 4.x checkpoint layouts alike."""

import json
import random
import shutil

import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers  # noqa: E402
from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlavaProcessor  # noqa: E402

from vlmdeploy.export.hf_files import ProcessorFiles, read_processor_files, save_runtime_tokenizer_json  # noqa: E402
from vlmdeploy.export.tiny_tokenizer import _CORPUS, LLAVA_CHAT_TEMPLATE, build_tiny_tokenizer  # noqa: E402
from vlmdeploy.runtime.text import TextProcessor  # noqa: E402

GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 255}


@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("v5")
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=build_tiny_tokenizer(256),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return out


def _write_json(path, data):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def write_v4_layout(v5_dir, out, template_in="chat_template.json"):
    """The files transformers 4.x would have saved for the same processor."""
    out.mkdir()
    v5 = json.loads((v5_dir / "processor_config.json").read_text())
    image_processor = {**v5.pop("image_processor"), "processor_class": "LlavaProcessor"}
    _write_json(out / "preprocessor_config.json", image_processor)
    _write_json(out / "processor_config.json", v5)
    template = (v5_dir / "chat_template.jinja").read_text()
    tokenizer_config = json.loads((v5_dir / "tokenizer_config.json").read_text())
    if template_in == "chat_template.json":
        _write_json(out / "chat_template.json", {"chat_template": template})
    else:
        tokenizer_config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(v5_dir / name, out / name)
    return out


def _comparable(files: ProcessorFiles):
    return {**vars(files), "tokenizer_json": files.tokenizer_json.read_bytes()}


def test_v5_layout(v5_dir):
    files = read_processor_files(v5_dir)
    assert not (v5_dir / "preprocessor_config.json").exists()  # FACTS.md: 5.x writes one processor_config.json
    assert files.processor == {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": 14,
        "vision_feature_select_strategy": "default",
    }
    assert files.image_processor["crop_size"] == {"height": 28, "width": 28}
    assert files.image_processor["size"] == {"shortest_edge": 28}
    assert files.image_processor["image_processor_type"] == "CLIPImageProcessor"
    assert files.chat_template == LLAVA_CHAT_TEMPLATE
    assert files.tokenizer_json == v5_dir / "tokenizer.json"
    assert files.tokenizer_config["bos_token"] == "<s>"
    assert files.generation_config == GENERATION_CONFIG


@pytest.mark.parametrize("template_in", ["chat_template.json", "tokenizer_config.json"])
def test_v4_layout_reads_the_same(v5_dir, tmp_path, template_in):
    v4_dir = write_v4_layout(v5_dir, tmp_path / "v4", template_in)
    assert _comparable(read_processor_files(v4_dir)) == _comparable(read_processor_files(v5_dir))


def test_v4_layout_is_what_transformers_loads(v5_dir, tmp_path):
    """The hand-written 4.x layout is a valid checkpoint: transformers loads the same processor from it."""
    v4 = AutoProcessor.from_pretrained(write_v4_layout(v5_dir, tmp_path / "v4"))
    v5 = AutoProcessor.from_pretrained(v5_dir)
    for attr in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_token"):
        assert getattr(v4, attr) == getattr(v5, attr)
    assert v4.chat_template == v5.chat_template
    assert v4.image_processor.to_dict() == v5.image_processor.to_dict()


def test_old_v4_checkpoint_without_processor_config(v5_dir, tmp_path):
    v4_dir = write_v4_layout(v5_dir, tmp_path / "v4")
    (v4_dir / "processor_config.json").unlink()
    (v4_dir / "generation_config.json").unlink()
    files = read_processor_files(v4_dir)
    assert files.processor == {}  # patch_size etc. must then come from config.json
    assert files.generation_config == {}
    assert files.image_processor == read_processor_files(v5_dir).image_processor


def test_chat_template_lookup_order(v5_dir, tmp_path):
    d = write_v4_layout(v5_dir, tmp_path / "v4", template_in="tokenizer_config.json")
    assert read_processor_files(d).chat_template == LLAVA_CHAT_TEMPLATE
    (d / "chat_template.jinja").write_text("jinja")
    assert read_processor_files(d).chat_template == "jinja"
    _write_json(d / "chat_template.json", {"chat_template": "json"})
    assert read_processor_files(d).chat_template == "json"  # transformers prefers the legacy json too
    config = json.loads((d / "processor_config.json").read_text())
    _write_json(d / "processor_config.json", {**config, "chat_template": "in processor config"})
    assert read_processor_files(d).chat_template == "in processor config"
    assert "chat_template" not in read_processor_files(d).processor


def test_named_chat_templates(v5_dir, tmp_path):
    d = write_v4_layout(v5_dir, tmp_path / "v4", template_in="tokenizer_config.json")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    _write_json(d / "tokenizer_config.json", config)
    files = read_processor_files(d)
    assert files.chat_template == "d"
    assert "chat_template" not in files.tokenizer_config


def test_no_chat_template(v5_dir, tmp_path):
    d = write_v4_layout(v5_dir, tmp_path / "v4")
    (d / "chat_template.json").unlink()
    assert read_processor_files(d).chat_template is None


def test_missing_tokenizer_json(v5_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(v5_dir, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_processor_files(d)
    assert str(d) in str(err.value) and "tokenizer.json" in str(err.value)


def test_missing_image_processor_config(v5_dir, tmp_path):
    d = write_v4_layout(v5_dir, tmp_path / "v4")
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_processor_files(d)
    message = str(err.value)
    assert str(d) in message and "preprocessor_config.json" in message and "processor_config.json" in message


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_processor_files(tmp_path / "nope")


def test_invalid_json(v5_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(v5_dir, d)
    (d / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="processor_config.json is not valid JSON"):
        read_processor_files(d)


def test_special_tokens_from_config_are_added_like_transformers(v5_dir, tmp_path):
    """A special token the config names but tokenizer.json lacks gets a new id, as in transformers."""
    d = tmp_path / "ckpt"
    shutil.copytree(v5_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(mask_token="<mask>", extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    _write_json(d / "tokenizer_config.json", config)
    hf = AutoTokenizer.from_pretrained(d)
    files = read_processor_files(d)
    tp = TextProcessor.from_files(files.tokenizer_json, files.tokenizer_config)
    text = "a <mask> b <video> c <image>"
    assert tp.encode(text) == hf(text)["input_ids"]
    assert tp.special_tokens == hf.special_tokens_map
    assert tp.decode(tp.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)


def _legacy_llama_tokenizer_json(path):
    """A tokenizer.json shaped like the Llama-2 ones llava-hf ships: byte-fallback BPE, legacy
    normalizer (Prepend "▁" + Replace " " -> "▁"), `<s> $A` post-processor, `<image>` added."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    learned = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])[3:]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *[t for t, _ in learned]]
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(
        models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<image>", "<pad>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.save(str(path))


def test_runtime_tokenizer_json_from_a_llama_tokenizer_class(tmp_path):
    """llava-hf checkpoints declare LlamaTokenizer, which transformers 5.x rebuilds on load; the
    runtime must use the loaded backend (save_runtime_tokenizer_json), not the raw file."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _legacy_llama_tokenizer_json(ckpt / "tokenizer.json")
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "clean_up_tokenization_spaces": False,
    }  # fmt: skip
    _write_json(ckpt / "tokenizer_config.json", config)
    hf = AutoTokenizer.from_pretrained(ckpt)
    assert type(hf).__name__ == "LlamaTokenizer"

    out = save_runtime_tokenizer_json(hf, tmp_path / "artifact" / "tokenizer.json")
    tp = TextProcessor.from_files(out, config)
    for text in ["USER: <image>\nWhat is shown? ASSISTANT:", " lead", "中文 😀 é\n\n", "<s>x</s>", ""]:
        ids = hf(text)["input_ids"]
        assert tp.encode(text) == ids
        chat_ids = hf(text, add_special_tokens=not text.startswith("<s>"))["input_ids"]
        assert tp.encode_chat_prompt(text) == chat_ids
        assert tp.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        detok = tp.detokenizer(skip_special_tokens=False)
        assert "".join(detok.push(i) for i in ids) + detok.flush() == hf.decode(ids)

    # Streaming over byte-fallback runs, valid and invalid UTF-8, special tokens in between.
    byte_ids = [tp.token_to_id(f"<0x{b:02X}>") for b in (0xE4, 0xB8, 0xAD, 0xF0, 0x9F, 0x98, 0x80, 0xC3, 0xA9, 0x41)]
    pool = byte_ids * 3 + tp.encode("the cat is", False) + [1, 2, tp.token_to_id("<image>")]
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 20))]
        for skip in (True, False):
            expected = hf.decode(ids, skip_special_tokens=skip)
            assert tp.decode(ids, skip_special_tokens=skip) == expected
            detok = tp.detokenizer(skip_special_tokens=skip)
            assert "".join(detok.push(i) for i in ids) + detok.flush() == expected
