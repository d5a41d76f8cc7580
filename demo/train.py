"""Train the shapes demo model: a small LLaVA (CLIP-style vision tower + Llama) on `demo.shapes`.

    python -m vlmdeploy.demo.train --out models/shapes          # what `make train-shapes` runs

Writes a standard Hugging Face checkpoint (safetensors, config, word-level tokenizer, processor,
chat template, generation config) and `training.json` (settings, wall time, held-out accuracy).
Needs torch and transformers (`pip install 'vlmdeploy[export]'`). The loss covers answer tokens
(and their EOS) only; every step sees fresh pictures from the training split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from . import shapes
from .evaluate import PROMPT, Answer, Scorecard

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # model
    patch_size: int = 28  # one patch per grid cell: 3x3 visual tokens
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384
    context_length: int = 256
    # optimisation
    steps: int = 3000
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    max_turns: int = 4  # questions per picture in a training row
    aux_weight: float = 1.0  # CellProbe loss (training only)
    threads: int = 1
    eval_n: int = 500
    log_every: int = 100
    eval_every: int = 0  # steps between quick held-out checks (0: none)


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

    from vlmdeploy.export.tiny_tokenizer import LLAVA_CHAT_TEMPLATE

    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = 8 * math.ceil(len(tokenizer) / 8)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=shapes.IMAGE_SIZE, patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=vocab,
        max_position_embeddings=cfg.context_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# ---------------------------------------------------------------------------------------------
# Batches


class Batcher:
    """Right-padded training batches. A row is one picture and 1..`max_turns` questions about it as
    a multi-turn chat (the first turn exactly as evaluated):

        <s> USER: <image>x9 \n Q1 ASSISTANT: A1 </s> USER: Q2 ASSISTANT: A2 </s> ...
        labels: -100 everywhere except on A1 </s>, A2 </s>, ... (the loss covers answers only)
    """

    def __init__(self, processor, cfg: TrainConfig):
        self.processor, self.tokenizer, self.max_turns = processor, processor.tokenizer, cfg.max_turns
        self.image_tokens = IMAGE * (shapes.IMAGE_SIZE // cfg.patch_size) ** 2  # LlavaProcessor's expansion ("default": no CLS)

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

    def turns(self, ex: shapes.Example) -> list[shapes.QA]:
        rng = np.random.default_rng([*ex.seed, 1])
        others = [i for i in range(len(ex.qa)) if i != ex.pick]
        extra = rng.permutation(others)[: int(rng.integers(0, self.max_turns))]
        return [ex.qa[ex.pick]] + [ex.qa[int(i)] for i in extra]

    def _row(self, ex: shapes.Example) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for turn, qa in enumerate(self.turns(ex)):
            if turn == 0:
                prompt = self.tokenizer(PROMPT.format(question=qa.question).replace(IMAGE, self.image_tokens))["input_ids"]
            else:
                prompt = self.tokenizer(f"USER: {qa.question} ASSISTANT:", add_special_tokens=False)["input_ids"]
            answer = self.tokenizer(qa.answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class CellProbe(torch.nn.Module):
    """Training-only auxiliary heads (not saved): each visual token predicts the shape kind and the
    color in its grid cell (or "empty"). Dense labels teach the vision tower to see shapes in a few
    hundred steps; without them it takes thousands, because the answer loss reaches each patch only
    through the language model's attention. Reads the vision tower's output through a hook."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        c = cfg.vision_hidden
        self.kind, self.color = torch.nn.Linear(c, len(shapes.SHAPES) + 1), torch.nn.Linear(c, len(shapes.COLORS) + 1)
        self.side = shapes.IMAGE_SIZE // cfg.patch_size  # tokens per row
        self.features = None
        model.model.vision_tower.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self.features = output.hidden_states[-1][:, 1:] if output.hidden_states else output.last_hidden_state[:, 1:]

    def targets(self, batch: list[shapes.Example]) -> tuple[torch.Tensor, torch.Tensor]:
        kinds = torch.zeros((len(batch), self.side * self.side), dtype=torch.long)  # [B, T], 0 = empty
        colors = torch.zeros_like(kinds)
        cell_of_token = [(r * shapes.GRID // self.side) * shapes.GRID + c * shapes.GRID // self.side
                         for r in range(self.side) for c in range(self.side)]
        for i, ex in enumerate(batch):
            cells = {s.row * shapes.GRID + s.col: s for s in ex.shapes}
            for t, cell in enumerate(cell_of_token):
                if cell in cells:
                    kinds[i, t] = 1 + shapes.SHAPES.index(cells[cell].kind)
                    colors[i, t] = 1 + list(shapes.COLORS).index(cells[cell].color)
        return kinds, colors

    def loss(self, batch: list[shapes.Example]) -> torch.Tensor:
        kinds, colors = self.targets(batch)
        f = self.features  # [B, T, Cv]
        ce = torch.nn.functional.cross_entropy
        return ce(self.kind(f).flatten(0, 1), kinds.flatten()) + ce(self.color(f).flatten(0, 1), colors.flatten())


def train(cfg: TrainConfig, log=print):
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, cfg)
    model = build_model(cfg, tokenizer).train()
    probe = CellProbe(model, cfg)
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
        examples = list(shapes.examples("train", cfg.batch, start=step * cfg.batch))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        lm_loss = model(**batcher(examples)).loss
        aux_loss = probe.loss(examples)
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
    model = checkpoint_or_model
    if isinstance(model, (str, Path)):
        processor = AutoProcessor.from_pretrained(model)
        model = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    card = Scorecard("pytorch fp32")
    examples = list(shapes.examples("heldout", n))
    for i in range(0, n, batch):
        card.extend(torch_answers(model, processor, examples[i : i + batch]))
    return card


def save(model, processor, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmdeploy.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/shapes", help="checkpoint directory to write")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model, processor, train_s = train(cfg, log)
    log(f"trained in {train_s:.0f}s; evaluating on {cfg.eval_n} held-out questions")
    t0 = time.perf_counter()
    card = evaluate_torch(model, cfg.eval_n, processor=processor)
    print(card.table())
    record = {
        "config": dataclasses.asdict(cfg), "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1), "heldout": card.summary(),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }
    save(model, processor, Path(args.out), record)
    log(f"wrote {args.out}")
    return 0


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    sys.exit(main())
