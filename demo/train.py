"""Train the shapes demo model: a small LLaVA (CLIP-style vision tower + Llama) on `demo.shapes`.

    python -m vlmdeploy.demo.train --out models/shapes          # what `make train-shapes` runs

Writes a standard Hugging Face checkpoint (safetensors, config, word-level tokenizer, processor,
chat template, generation config) and `training.json` (settings, wall and CPU time, held-out
accuracy). Needs torch and transformers (`pip install 'vlmdeploy[export]'`). Every step draws fresh
pictures from the training split. The language-model loss covers answer tokens (and their EOS)
only; a training-only auxiliary loss (`CellProbe`) supervises the visual tokens. One thread, about
10 minutes on an idle core of this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from . import shapes
from .scorecard import PROMPT, Answer, Scorecard

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
# LLaVA-1.5's chat template (export/tiny_tokenizer.py) with the text before the images, as in part
# of LLaVA-1.5's own training data: `USER: {question}\n<image> ASSISTANT:` (= evaluate.PROMPT).
# With the question first every visual token can check itself against the question, so the answer
# position only has to gather the tokens that match, instead of looking one up with a query that
# depends on the question.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '\n<image>' }}{% endfor %}"
    "{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # model
    image_size: int = 84  # shapes.IMAGE_SIZE; larger sizes re-render the same scenes (shapes.at_size)
    patch_size: int = 28  # one patch per grid cell: 3x3 visual tokens
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 8
    text_kv_heads: int = 4
    text_intermediate: int = 384
    context_length: int = 256
    init_text_from: str = ""  # a shapes checkpoint dir whose language model (and lm_head) to start from
    init_from: str = ""  # a checkpoint dir of this same config to continue training (a second stage)
    first_example: int = 0  # index of the first training picture (a second stage starts after the first's)
    text_init_std: float = 0.08  # ~1/sqrt(hidden). HF's 0.02 suits 4096-wide models; here it learned
    # a lookup task 5x slower (loss 0.30 vs 0.06 after 400 steps)
    # optimisation
    steps: int = 2500
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 1.0  # CellProbe loss (training only)
    probe_only_steps: int = 0  # first steps: the vision tower + projector on the CellProbe loss alone (no language
    # model forward, its word embeddings frozen): about half a full step's cost, spent where shapes-hd learns slowest
    threads: int = 1  # 2 threads on a busy 2-core machine ran 20x slower (OpenMP waits for a taken core)
    eval_n: int = 500
    log_every: int = 100
    eval_every: int = 0  # steps between quick held-out checks (0: none)


# The shipped models: `make train-shapes` (models/shapes) and `make train-shapes-hd` (models/shapes-hd).
# shapes-hd draws the same scenes at 168 px with 14 px patches: 12x12 = 144 visual tokens, 4x4 per
# grid cell, enough to measure visual-token compression on (docs/PERFORMANCE.md).
PRESETS = {
    "shapes": TrainConfig(),
    # 144 tokens cost ~10x the compute per step of 9. The language model starts from models/shapes'
    # (same tokenizer and sizes; it already answers from visual tokens that the CellProbe aligns with its
    # word embeddings); the vision tower, which must now tell a shape's kind from 14 px patches, trains
    # alone on the CellProbe loss for the first 800 steps (half a step's cost), then everything for 500.
    # (700 steps of everything: 55% held-out at step 500, kinds 16-37%: the tower was the bottleneck.)
    "shapes-hd": TrainConfig(image_size=168, patch_size=14, init_text_from="models/shapes", steps=1300,
                             probe_only_steps=800, batch=16, lr=2e-3, warmup=50),
    # its second stage (`make train-shapes-hd` runs both): everything, on pictures the first never drew
    # (the first stage alone: ~60% held-out, captions and kinds lowest: the language model needs more steps)
    "shapes-hd-stage2": TrainConfig(image_size=168, patch_size=14, init_from="models/shapes-hd", first_example=1300 * 16,
                                    steps=700, batch=16, lr=1e-3, warmup=20),
    # Stages 1-2 gave 67.8% held-out: a linear probe on the visual tokens named a cell's shape kind 70% of
    # the time (non-empty cells, 200 pictures): the tower, not the language model, was the bottleneck.
    # Stage 3: the tower alone on the CellProbe again (0.34 s a step; 400 steps took the probe to 81%),
    # stage 4: everything, so the language model reads the sharper tokens.
    "shapes-hd-stage3": TrainConfig(image_size=168, patch_size=14, init_from="models/shapes-hd", first_example=40000,
                                    steps=3000, probe_only_steps=3000, batch=16, lr=2e-3, warmup=50),
    "shapes-hd-stage4": TrainConfig(image_size=168, patch_size=14, init_from="models/shapes-hd",
                                    first_example=40000 + 3000 * 16, steps=1500, batch=16, lr=1e-3, warmup=50),
}


# ---------------------------------------------------------------------------------------------
# Tokenizer, processor, model


def build_tokenizer():
    """Word-level: one id per word of `shapes.vocabulary()`, lower-cased, BOS from the post-processor."""
    from transformers import PreTrainedTokenizerFast

    words = [UNK, BOS, EOS, *shapes.vocabulary()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS, IMAGE, PAD)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, words.index(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def build_processor(tokenizer, cfg: TrainConfig):
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = cfg.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = 8 * math.ceil(len(tokenizer) / 8)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=vocab,
        max_position_embeddings=cfg.context_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=cfg.text_init_std,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    if cfg.init_text_from:
        _load_text_model(model, Path(cfg.init_text_from))
    if cfg.init_from:  # strict: a checkpoint of other sizes fails, naming the tensors
        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32).state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _load_text_model(model, checkpoint: Path) -> None:
    """Copy the language model and lm_head of a trained shapes checkpoint (same tokenizer and text sizes)."""
    from transformers import LlavaForConditionalGeneration

    source = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    # load_state_dict (strict) refuses a checkpoint of other text sizes, naming the tensors
    model.model.language_model.load_state_dict(source.model.language_model.state_dict())
    model.lm_head.load_state_dict(source.lm_head.state_dict())


# ---------------------------------------------------------------------------------------------
# Batches


class Batcher:
    """Right-padded training batches, one picture and one question per row:

        <s> USER: Q <image>x9 ASSISTANT: A </s>     labels: -100 except on `A </s>` (answer loss only)
    """

    def __init__(self, processor, cfg: TrainConfig):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.image_tokens = IMAGE * (cfg.image_size // cfg.patch_size) ** 2  # LlavaProcessor's expansion ("default": no CLS)

    def __call__(self, batch: list[shapes.Example]) -> dict[str, torch.Tensor]:
        rows = [self._row(ex) for ex in batch]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_ids)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        pixels = self.processor.image_processor([ex.image for ex in batch], return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}

    def _row(self, ex: shapes.Example) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer(PROMPT.format(question=ex.question).replace(IMAGE, self.image_tokens))["input_ids"]
        answer = self.tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return prompt + answer, [-100] * len(prompt) + answer


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class CellProbe(torch.nn.Module):
    """Training-only auxiliary loss (nothing of it is saved or exported). Each visual token is one
    grid cell; at the projector's output (the language model's input) it must

      - classify its cell: shape kind or empty, color or empty (two linear heads), and
      - score the words that describe its cell highest against the language model's own word
        embeddings: `red`, `circle`, `circles`, and its position (`top`, `left`), `<pad>` if empty.

    Measured (800 steps, same settings otherwise, 200 held-out questions): with the linear heads
    alone on the vision tower's output 54% exact match, with the word scores 75%: visual tokens
    that resemble the question's words are found by attention early. Without any probe the answer
    loss stayed at its no-picture level for 1,000+ steps (with the earlier 0.02 init)."""

    def __init__(self, model, cfg: TrainConfig, tokenizer):
        super().__init__()
        c, self.side = cfg.text_hidden, cfg.image_size // cfg.patch_size  # side: tokens per row
        self.kind, self.color = torch.nn.Linear(c, len(shapes.SHAPES) + 1), torch.nn.Linear(c, len(shapes.COLORS) + 1)
        self._embeddings = [model.get_input_embeddings()]  # a list: not a submodule (its weight is the model's)
        self._word = tokenizer.convert_tokens_to_ids
        self.features = None  # [B*T, C], set by the hook on each forward
        model.model.multi_modal_projector.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self.features = output

    def _cell_of_token(self) -> list[tuple[int, int]]:
        return [(r * shapes.GRID // self.side, c * shapes.GRID // self.side) for r in range(self.side) for c in range(self.side)]

    def targets(self, batch: list[shapes.Example]):
        """kinds, colors [B, T] (0 = empty) and word ids [B, T, 5] (-100 = no such word)."""
        n = self.side * self.side
        kinds, colors = torch.zeros((len(batch), n), dtype=torch.long), torch.zeros((len(batch), n), dtype=torch.long)
        words = torch.full((len(batch), n, 5), -100, dtype=torch.long)
        for i, ex in enumerate(batch):
            cells = {(s.row, s.col): s for s in ex.shapes}
            for t, cell in enumerate(self._cell_of_token()):
                where = shapes.POSITIONS[cell[0]][cell[1]].split()
                s = cells.get(cell)
                if s is None:
                    ids = [self._word("<pad>"), *map(self._word, where)]
                else:
                    kinds[i, t], colors[i, t] = 1 + shapes.SHAPES.index(s.kind), 1 + list(shapes.COLORS).index(s.color)
                    ids = [self._word(w) for w in (s.kind, f"{s.kind}s", s.color, *where)]
                words[i, t, : len(ids)] = torch.tensor(ids)
        return kinds, colors, words

    def loss(self, batch: list[shapes.Example], freeze_words: bool = False) -> torch.Tensor:
        kinds, colors, words = self.targets(batch)
        f = self.features.reshape(len(batch), self.side * self.side, -1)  # [B, T, C]
        ce = torch.nn.functional.cross_entropy
        heads = ce(self.kind(f).flatten(0, 1), kinds.flatten()) + ce(self.color(f).flatten(0, 1), colors.flatten())
        vocab = self._embeddings[0].weight  # [V, C]
        scores = f @ (vocab.detach() if freeze_words else vocab).T  # [B, T, V]
        per_word = scores[:, :, None, :].expand(-1, -1, words.shape[-1], -1)  # [B, T, 5, V]
        return heads + 2 * ce(per_word.flatten(0, 2), words.flatten(), ignore_index=-100)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over each row's answer tokens, then over rows: a 20-word caption
    weighs as much as a one-word answer (a per-token mean lets captions dominate)."""
    labels = labels[:, 1:]  # [B, S-1]: position t predicts token t+1
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    counted = (labels != -100).float()
    return ((per_token * counted).sum(1) / counted.sum(1)).mean()


def train(cfg: TrainConfig, log=print):
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, cfg)
    model = build_model(cfg, tokenizer).train()
    probe = CellProbe(model, cfg, tokenizer)
    batcher = Batcher(processor, cfg)
    params = list(model.named_parameters()) + list(probe.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {cfg.steps} steps x {cfg.batch}")
    start, smoothed = time.perf_counter(), None
    for step in range(cfg.steps):
        examples = list(shapes.examples("train", cfg.batch, start=cfg.first_example + step * cfg.batch, size=cfg.image_size))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = batcher(examples)
        labels = batch.pop("labels")
        probe_only = step < cfg.probe_only_steps
        if probe_only:  # the projector's forward hook gives the probe its features
            model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
            lm_loss = torch.zeros(())
        else:
            lm_loss = answer_loss(model(**batch).logits, labels)
        aux_loss = probe.loss(examples, freeze_words=probe_only)
        opt.zero_grad(set_to_none=True)
        (lm_loss + cfg.aux_weight * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        now = torch.tensor([lm_loss.item(), aux_loss.item()])
        smoothed = now if smoothed is None else 0.95 * smoothed + 0.05 * now
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  answer loss {smoothed[0]:.4f}  cell loss {smoothed[1]:.4f}  "
                f"lr {lr_at(step, cfg):.2e}  {time.perf_counter() - start:6.0f}s")
        if cfg.eval_every and step % cfg.eval_every == cfg.eval_every - 1:
            model.eval()
            card = evaluate_torch(model, 100, processor=processor)
            log(f"  held-out (100 questions, not the final split's size): {card.table().splitlines()[-1]}")
            model.train()
    model.eval()
    return model, processor, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Evaluation of the PyTorch model (the runtime's is in evaluate.py)


@torch.no_grad()
def torch_answers(model, processor, batch: list[shapes.Example], max_new_tokens: int = 32) -> list[Answer]:
    """Greedy answers from HF `generate` on a left-padded batch (what the runtime must reproduce)."""
    prompts = [PROMPT.format(question=ex.question) for ex in batch]
    inputs = processor(text=prompts, images=[ex.image for ex in batch], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    answers = []
    for ex, row in zip(batch, new.tolist()):
        row = row[: row.index(eos)] if eos in row else row  # as the runtime reports: EOS not included
        answers.append(Answer(ex, processor.tokenizer.decode(row, skip_special_tokens=True), tuple(row)))
    return answers


def evaluate_torch(checkpoint_or_model, n: int, batch: int = 50, processor=None, threads: int | None = None) -> Scorecard:
    """Exact-match accuracy of a PyTorch checkpoint (dir) or model on the first `n` held-out questions."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    model, name = checkpoint_or_model, "trained model"
    if isinstance(model, (str, Path)):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would garble the eval table
        name = Path(model).name
        processor = AutoProcessor.from_pretrained(model)
        model = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    card = Scorecard(name, "pytorch fp32")
    examples = list(shapes.examples("heldout", n, size=model.config.vision_config.image_size))
    for i in range(0, n, batch):
        card.extend(torch_answers(model, processor, examples[i : i + batch]))
    return card


def save(model, processor, out: Path, record: dict) -> None:
    """Written beside `out`, then swapped in: a failed save leaves the previous checkpoint whole."""
    import shutil

    tmp, old = out.with_name(out.name + ".saving"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmdeploy.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/shapes", help="checkpoint directory to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="shapes", help="settings to start from (flags below override)")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=f"default: {f.default}")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    cfg = dataclasses.replace(preset, **{f.name: v for f in dataclasses.fields(TrainConfig) if (v := getattr(args, f.name)) is not None})
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cpu0, load0 = time.process_time(), os.getloadavg()[0]
    model, processor, train_s = train(cfg, log)
    train_cpu_s = time.process_time() - cpu0
    log(f"trained in {train_s:.0f}s; evaluating on {cfg.eval_n} held-out questions")
    t0 = time.perf_counter()
    card = evaluate_torch(model, cfg.eval_n, processor=processor)
    print(card.table())
    record = {
        "config": dataclasses.asdict(cfg), "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "load_average_1min": {"start": load0, "end": os.getloadavg()[0]}, "cpus": os.cpu_count(),
        "eval_seconds": round(time.perf_counter() - t0, 1), "heldout": card.summary(),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }
    if cfg.init_from:  # the stage this one continued from
        record["previous_stage"] = json.loads((Path(cfg.init_from) / "training.json").read_text())
    save(model, processor, Path(args.out), record)
    log(f"wrote {args.out}")
    return 0


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    sys.exit(main())
