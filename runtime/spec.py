"""Graph specs: each graph's inputs, outputs, dtypes and named dynamic axes, declared once as data.

Export (dynamic shapes, dummy inputs, validation), `vlmdeploy check`, and the runners' feed checks
all read these objects; the manifest stores them as JSON, so the runtime never re-derives them.

A dimension is an int (fixed) or a name (dynamic). Tensors that share a dimension name must agree
on its size in one call. `dim_sums` declares derived dims, e.g. total = past + seq.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

Dim = int | str

# dtypes as they appear in the manifest -> numpy
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class SpecError(ValueError):
    """A feed does not match a graph's spec; the message names the tensor, the shape and what is allowed."""


def require(ok: bool, message: str) -> None:
    """The manifest's type layer: every dataclass read from JSON checks its fields with this."""
    if not ok:
        raise TypeError(message)


def is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_name(value) -> bool:
    return isinstance(value, str) and bool(value)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # key of DTYPES
    shape: tuple[Dim, ...]

    def __post_init__(self):
        require(is_name(self.name), f"a tensor name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name}: dtype {self.dtype!r} not one of {sorted(DTYPES)}")
        require(all(is_int(d) or is_name(d) for d in self.shape),
                f"tensor {self.name}: shape {list(self.shape)!r} must hold ints >= 0 and dim names")

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        require(isinstance(d.get("shape"), list), f"tensor {d.get('name')!r}: shape must be a list, got {d.get('shape')!r}")
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_sums: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # total -> (past, seq)

    def __post_init__(self):
        require(is_name(self.name), f"a graph name must be a non-empty string, got {self.name!r}")
        require(all(isinstance(t, TensorSpec) for t in (*self.inputs, *self.outputs)) and bool(self.outputs),
                f"graph {self.name!r}: inputs and outputs must be tensor specs (at least one output)")
        require(all(is_name(k) and isinstance(v, tuple) and len(v) == 2 and all(map(is_name, v))
                    for k, v in self.dim_sums.items()),
                f"graph {self.name!r}: dim_sums must map a dim name to two dim names, got {dict(self.dim_sums)!r}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dim_names(self) -> list[str]:
        names = [d for t in self.inputs + self.outputs for d in t.shape if isinstance(d, str)]
        return list(dict.fromkeys(names))

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Validate a feed dict; return the bound dynamic dims. Raises SpecError naming the tensor."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise SpecError(
                f"graph {self.name!r}: missing inputs {missing}, unexpected inputs {extra}; "
                f"expected exactly {self.input_names}"
            )
        dims: dict[str, int] = {}
        origin: dict[str, str] = {}
        for t in self.inputs:
            self._check_tensor(t, feeds[t.name], dims, origin)
        self._check_sums(dims)
        return dims

    def _check_tensor(self, t: TensorSpec, arr: np.ndarray, dims: dict, origin: dict) -> None:
        allowed = f"[{', '.join(map(str, t.shape))}] of {t.dtype}"
        if not isinstance(arr, np.ndarray):
            raise SpecError(f"graph {self.name!r} input {t.name!r}: got {type(arr).__name__}, allowed a numpy array {allowed}")
        if arr.dtype != t.np_dtype:
            raise SpecError(f"graph {self.name!r} input {t.name!r}: dtype {arr.dtype}, allowed {allowed}")
        if arr.ndim != len(t.shape):
            raise SpecError(
                f"graph {self.name!r} input {t.name!r}: shape {list(arr.shape)} has rank {arr.ndim}, "
                f"allowed {allowed}"
            )
        for axis, (want, got) in enumerate(zip(t.shape, arr.shape)):
            if isinstance(want, int) and got != want:
                raise SpecError(
                    f"graph {self.name!r} input {t.name!r}: shape {list(arr.shape)}, axis {axis} must be "
                    f"{want}; allowed {allowed}"
                )
            if isinstance(want, str):
                if want in dims and dims[want] != got:
                    raise SpecError(
                        f"graph {self.name!r} input {t.name!r}: shape {list(arr.shape)}, axis {axis} "
                        f"({want}) is {got} but {origin[want]} set {want}={dims[want]}; allowed {allowed}"
                    )
                dims.setdefault(want, got)
                origin.setdefault(want, repr(t.name))

    def _check_sums(self, dims: dict[str, int]) -> None:
        for total, (a, b) in self.dim_sums.items():
            if total in dims and a in dims and b in dims and dims[total] != dims[a] + dims[b]:
                raise SpecError(
                    f"graph {self.name!r}: {total}={dims[total]} but it must equal {a} + {b} = "
                    f"{dims[a]} + {dims[b]} (e.g. attention_mask length = past length + new tokens)"
                )

    def undetermined_output_dims(self) -> list[str]:
        """Output dim names no input (nor dim_sums) sets: a runtime cannot size those outputs."""
        known = {d for t in self.inputs for d in t.shape if isinstance(d, str)} | set(self.dim_sums)
        return sorted({d for t in self.outputs for d in t.shape if isinstance(d, str)} - known)

    def output_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete_shape(dims) for t in self.outputs}

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dim_sums": {k: list(v) for k, v in self.dim_sums.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(
            name=d["name"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            dim_sums={k: tuple(v) if isinstance(v, list) else v for k, v in d.get("dim_sums", {}).items()},
        )


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Past input names and present output names, in graph order (key, value per layer)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


@dataclass(frozen=True)
class ModelDims:
    """The sizes a LLaVA-style graph set depends on (recorded in the manifest)."""

    image_size: tuple[int, int]  # (H, W) of pixel_values
    vision_tokens: int  # tokens per image out of the vision graph (after CLS select)
    vision_hidden: int  # feature size into the projector (x number of feature layers)
    hidden: int  # LLM hidden size
    vocab: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # float dtype of activations: float32 | float16

    def __post_init__(self):
        require(isinstance(self.image_size, tuple) and len(self.image_size) == 2 and all(is_int(v, 1) for v in self.image_size),
                f"dims.image_size must be [height, width], got {self.image_size!r}")
        for name in ("vision_tokens", "vision_hidden", "hidden", "vocab", "num_layers", "kv_heads", "head_dim"):
            require(is_int(getattr(self, name), 1), f"dims.{name} must be an int >= 1, got {getattr(self, name)!r}")
        require(self.dtype in ("float32", "float16"), f"dims.dtype {self.dtype!r} is not one of ['float16', 'float32']")


def llava_graph_specs(m: ModelDims, attention_scores: bool = False) -> dict[str, GraphSpec]:
    """The graphs of a LLaVA-1.5 export: vision, projector, embed, the portable decoder, and
    `decoder_gqa`, the ONNX Runtime decoder that updates a shared KV buffer [B, Hkv, capacity, D]
    in place and returns only the last position's logits. `attention_scores`: the vision graph also
    returns each feature token's attention score (runtime/compress.py ranks tokens by it)."""
    f = m.dtype
    scores = (TensorSpec("attention_scores", f, ("num_images", m.vision_tokens)),) if attention_scores else ()
    vision = GraphSpec(
        "vision",
        inputs=(TensorSpec("pixel_values", f, ("num_images", 3, *m.image_size)),),
        outputs=(TensorSpec("image_features", f, ("num_images", m.vision_tokens, m.vision_hidden)), *scores),
    )
    projector = GraphSpec(
        "projector",
        inputs=(TensorSpec("image_features", f, ("num_images", m.vision_tokens, m.vision_hidden)),),
        outputs=(TensorSpec("image_embeds", f, ("num_images", m.vision_tokens, m.hidden)),),
    )
    embed = GraphSpec(
        "embed",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
        outputs=(TensorSpec("inputs_embeds", f, ("batch", "seq", m.hidden)),),
    )
    past, present = kv_names(m.num_layers)
    kv_in = tuple(TensorSpec(n, f, ("batch", m.kv_heads, "past", m.head_dim)) for n in past)
    kv_out = tuple(TensorSpec(n, f, ("batch", m.kv_heads, "total", m.head_dim)) for n in present)
    decoder = GraphSpec(
        "decoder",
        inputs=(
            TensorSpec("inputs_embeds", f, ("batch", "seq", m.hidden)),
            TensorSpec("attention_mask", "int64", ("batch", "total")),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            *kv_in,
        ),
        outputs=(TensorSpec("logits", f, ("batch", "seq", m.vocab)), *kv_out),
        dim_sums={"total": ("past", "seq")},
    )
    decoder_gqa = GraphSpec(
        "decoder_gqa",
        inputs=(
            *decoder.inputs[:3],
            *(TensorSpec(n, f, ("batch", m.kv_heads, "capacity", m.head_dim)) for n in past),
        ),
        outputs=(
            TensorSpec("logits", f, ("batch", 1, m.vocab)),
            *(TensorSpec(n, f, ("batch", m.kv_heads, "capacity", m.head_dim)) for n in present),
        ),
    )
    return {g.name: g for g in (vision, projector, embed, decoder, decoder_gqa)}
