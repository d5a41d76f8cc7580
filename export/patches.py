"""Version-specific patches that make HF text models traceable by torch.export (transformers 5.x).

`traceable_rope(language_model)`: RoPE types whose frequencies depend on the sequence length
("longrope": Phi-3/Phi-3.5/Phi-4-mini; "dynamic": dynamic NTK) pick or recompute `inv_freq` in
transformers' `dynamic_rope_update` wrapper (modeling_rope_utils.py), once per forward call, from
`seq_len = max(position_ids) + 1` over the whole batch. That wrapper keeps state on the rotary
module, which tracing must not touch:

* longrope (5.24): the choice is already a `torch.where`, but the first call caches the long
  table in a plain attribute (`long_inv_freq`). The first call being the trace, a FakeTensor is
  left there, and every later eager call (the PyTorch reference of export validation, `generate`
  in the same process) mixes that FakeTensor into its frequencies: 3e-3 off once past the
  original length. Older 5.x releases branched in Python instead (specialized by the trace).
* dynamic: `if seq_len > max_seq_len_cached` on a tensor; torch.export refuses it
  (GuardOnDataDependentSymNode) and the wrapper re-registers buffers.

While the context is active, each such rotary module's forward is a stateless equivalent: it
computes both tables and selects with `torch.where`, then runs HF's own undecorated forward
(`forward.__wrapped__`: cos/sin, `attention_scaling`) on them. Nothing is written to the module.

* longrope: `where(seq_len > original_max_position_embeddings, long, short)`, long = HF's init
  function at `original_max_position_embeddings + 1`, short = `original_inv_freq`, cast to the
  `inv_freq` buffer's dtype (HF copies the choice into that buffer) - identical to HF on every call.
* dynamic: `where(seq_len > max_position_embeddings, ntk(seq_len), original_inv_freq)` - identical
  to a fresh HF module and to HF `generate` (lengths only grow); HF's eager module remembers the
  longest length it has seen, so after a longer call it keeps that table for shorter ones
  (>= max_position_embeddings), which a stateless graph does not reproduce.

Enter it only while tracing (DecoderGraph does so under `torch.compiler.is_exporting()`): the
PyTorch reference must run HF's original code. Rotary modules with per-layer rope types (a dict
`rope_type`, e.g. Gemma 3), other RoPE types and models without such a wrapper are left alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

PATCHED_ROPE_TYPES = ("longrope", "dynamic")


def _rope_kind(module: nn.Module) -> str | None:
    """'longrope' / 'dynamic' for a rotary module this patch handles, else None."""
    rope_type = getattr(module, "rope_type", None)
    if not isinstance(rope_type, str) or getattr(module, "config", None) is None:
        return None
    if getattr(type(module).forward, "__wrapped__", None) is None:  # not decorated by dynamic_rope_update
        return None
    if rope_type == "longrope":
        return "longrope"
    if "dynamic" in rope_type:  # HF's own test in dynamic_rope_update
        return "dynamic"
    return None


class _WithInvFreq:
    """The rotary module as HF's undecorated forward sees it, with `inv_freq` replaced."""

    def __init__(self, module: nn.Module, inv_freq: torch.Tensor):
        self.__dict__["_module"], self.__dict__["inv_freq"] = module, inv_freq

    def __getattr__(self, name):
        return getattr(self._module, name)


def _inv_freq(module: nn.Module, kind: str, position_ids: torch.Tensor, device) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    seq_len = torch.max(position_ids) + 1  # over the whole batch, as HF
    original = module.original_inv_freq.to(device)
    if kind == "longrope":
        bound = module.config.rope_parameters["original_max_position_embeddings"]
        long, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config, device, seq_len=bound + 1)
        # HF: where(...) then copy_ into the inv_freq buffer (its dtype)
        return torch.where(seq_len > bound, long.to(device), original).to(module.inv_freq.dtype)
    bound = module.original_max_seq_len  # = max_seq_len_cached of a fresh module
    grown, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config, device, seq_len=seq_len)
    # HF: growth registers the new table as the buffer (fp32); otherwise the original buffer
    return torch.where(seq_len > bound, grown.to(device), original)


def _stateless_forward(module: nn.Module, kind: str):
    rope_forward = type(module).forward.__wrapped__

    def forward(x, position_ids):
        inv_freq = _inv_freq(module, kind, position_ids, x.device)
        return rope_forward(_WithInvFreq(module, inv_freq), x, position_ids)

    return forward


@contextlib.contextmanager
def traceable_rope(language_model: nn.Module) -> Iterator[list[str]]:
    """Context: sequence-length-dependent RoPE modules under `language_model` run a stateless,
    traceable forward. Yields the names of the patched modules (empty: nothing to patch)."""
    patched = []
    for name, module in language_model.named_modules():
        kind = _rope_kind(module)
        if kind is None:
            continue
        had = "forward" in vars(module)
        patched.append((name, module, had, vars(module).get("forward")))
        module.forward = _stateless_forward(module, kind)
    try:
        yield [name for name, *_ in patched]
    finally:
        for _, module, had, old in reversed(patched):
            if had:
                module.forward = old
            else:
                del module.forward
