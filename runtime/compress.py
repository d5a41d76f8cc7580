"""Visual-token compression: fewer visual tokens per image in the prompt, chosen after the vision chain.

    Compression("pool", ratio=0.25)  # adaptive average pooling of the token grid (2x2 at 25%)
    Compression("topk", keep=36)     # the tokens the vision tower's attention scores highest
                                     # (FasterVLM / VisPruner: [CLS] attention; no CLS: mean attention received)
    Compression("merge", keep=36)    # VisionZip: dominant tokens by attention + contextual tokens,
                                     # each the mean of a group of the rest merged by similarity

All three act on one vision row's embeddings [T, C] laid out on a (h, w) grid, in numpy; a family
(runtime/families/) says which rows an image has and how the kept tokens become prompt tokens and
positions. `keep` is the tokens kept per row (per tile; per frame for video), `ratio` a fraction of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("pool", "topk", "merge")
SCORED = ("topk", "merge")  # methods that need the vision graph's attention scores
CONTEXTUAL_SHARE = 10 / 64  # VisionZip's split: 54 dominant + 10 contextual of 64 tokens

Grid = tuple[int, int]  # (rows, cols) of a vision row's tokens


@dataclass(frozen=True)
class Compression:
    method: str
    keep: int | None = None  # tokens kept per vision row
    ratio: float | None = None  # or this fraction of them (rounded, at least 1)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"visual-token compression {self.method!r} is not known; allowed: {', '.join(METHODS)}")
        if (self.keep is None) == (self.ratio is None):
            raise ValueError("visual-token compression needs exactly one of keep (tokens per image) and ratio (0 < r <= 1)")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1):
            raise ValueError(f"visual tokens to keep must be an int >= 1, got {self.keep!r}")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"visual-token keep ratio must be in (0, 1], got {self.ratio!r}")

    @property
    def needs_scores(self) -> bool:
        return self.method in SCORED

    def label(self) -> str:
        return f"{self.method} {self.keep} tokens" if self.keep is not None else f"{self.method} {self.ratio:g}"

    def tokens(self, grid: Grid) -> int:
        """Tokens kept of a row with `grid` tokens. ValueError when `keep` is more than it has, or
        pooling cannot reach that count."""
        n = grid[0] * grid[1]
        k = self.keep if self.keep is not None else max(1, round(self.ratio * n))
        if k > n:
            raise ValueError(f"--visual-tokens {k} is more than an image's {n} visual tokens ({grid[0]}x{grid[1]}); "
                             f"allowed: 1..{n}")
        return int(np.prod(pool_grid(grid, k))) if self.method == "pool" else k

    def apply(self, features: np.ndarray, grid: Grid, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """features [T, C] on `grid`, scores [T] -> (kept [K, C], where [K] int). `where`: each kept
        token's index in the row (merge: its group's dominant/target token); pool: -1 (a new grid)."""
        if features.shape[0] != grid[0] * grid[1]:
            raise ValueError(f"{features.shape[0]} visual tokens do not fill a {grid[0]}x{grid[1]} grid")
        k = self.tokens(grid)
        if self.method == "pool":
            out = adaptive_avg_pool(features.reshape(*grid, -1), pool_grid(grid, k))
            return out.reshape(k, -1), np.full(k, -1, dtype=np.int64)
        if scores is None:
            raise ValueError(f"{self.method} needs the vision graph's attention scores")
        return top_k(features, scores, k) if self.method == "topk" else visionzip_merge(features, scores, k)


def parse_visual_tokens(text: str) -> int | float:
    """`--visual-tokens`: "36" (tokens per image), "0.25" or "25%" (a fraction of them)."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"--visual-tokens {text!r}: give a count of tokens per image (36), or a fraction (0.25 or 25%)") from None


def _visual_tokens_flag(text: str) -> int | float:
    import argparse

    try:
        return parse_visual_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p) -> None:
    """`--visual-tokens` and `--compression` on an argparse parser (run, eval, serve, demo, plan)."""
    p.add_argument("--visual-tokens", type=_visual_tokens_flag, metavar="K",
                   help="keep K visual tokens per image (per tile), or a fraction (0.25 or 25%%); default: all")
    p.add_argument("--compression", choices=METHODS, default="pool",
                   help="how --visual-tokens chooses them: pool (average pooling of the token grid), topk (the "
                        "vision tower's [CLS] attention, FasterVLM), merge (VisionZip dominant + contextual)")


# ---- pooling --------------------------------------------------------------------------------------


def pool_grid(grid: Grid, k: int) -> Grid:
    """The (rows, cols) of k pooled tokens: a factor pair of k fitting the grid, exact strides first
    (144 = 12x12: 72 -> 12x6, 36 -> 6x6, 18 -> 6x3), then the aspect closest to the grid's."""
    h, w = grid
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= h and k // a <= w]
    if not pairs:
        raise ValueError(f"pool cannot make {k} tokens from a {h}x{w} grid (no rows x cols = {k} fits); "
                         "choose a count with a factor pair within the grid")
    return min(pairs, key=lambda p: (h % p[0] != 0 or w % p[1] != 0, abs(np.log(p[0] / p[1] * w / h)), -p[0]))


def pool_bin_starts(grid: Grid, out: Grid) -> np.ndarray:
    """[oh * ow]: the row-major index in `grid` of each pooled bin's first (top-left) token."""
    h, w = grid
    return np.array([(i * h // out[0]) * w + j * w // out[1] for i in range(out[0]) for j in range(out[1])], np.int64)


def adaptive_avg_pool(x: np.ndarray, out: Grid) -> np.ndarray:
    """x [h, w, C] -> [oh, ow, C]: torch's adaptive_avg_pool2d (bin i spans floor(i*h/oh)..ceil((i+1)*h/oh))."""
    h, w = x.shape[:2]
    rows = [(i * h // out[0], -(-(i + 1) * h // out[0])) for i in range(out[0])]
    cols = [(j * w // out[1], -(-(j + 1) * w // out[1])) for j in range(out[1])]
    return np.stack([np.stack([x[a:b, c:d].mean(axis=(0, 1)) for c, d in cols]) for a, b in rows]).astype(x.dtype)


# ---- attention-scored methods -----------------------------------------------------------------------


def top_k(features: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest-scored tokens (ties: the earlier), kept in their original order."""
    keep = np.sort(np.argsort(-scores, kind="stable")[:k])
    return features[keep], keep


def visionzip_merge(features: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """VisionZip (Yang et al. 2024): k - c dominant tokens by score (original order), then c contextual
    tokens: of the rest, every (rest // c)-th is a target; every other one joins its most similar
    target (cosine), and each target becomes the mean of its group."""
    c = min(max(1, round(k * CONTEXTUAL_SHARE)), k - 1) if k > 1 else 0
    dominant_feats, dominant = top_k(features, scores, k - c)
    if c == 0:
        return dominant_feats, dominant
    rest = np.setdiff1d(np.arange(len(features)), dominant)  # [R], ascending
    targets = rest[np.arange(c) * max(1, len(rest) // c)]  # [c]
    others = np.setdiff1d(rest, targets)
    unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    group = np.argmax(unit[others] @ unit[targets].T, axis=-1)  # [R - c]: each one's target
    merged = np.stack([np.concatenate([features[t][None], features[others[group == i]]]).mean(axis=0)
                       for i, t in enumerate(targets)])
    return np.concatenate([dominant_feats, merged.astype(features.dtype)]), np.concatenate([dominant, targets])


# ---- tiles after a pixel shuffle (InternVL, Idefics3/SmolVLM) ----------------------------------------


def block_scores(scores: np.ndarray, grid: Grid) -> np.ndarray:
    """scores [n, P] per patch of the vision tower ((h*r) x (w*r) patches) -> [n, h*w]: each shuffled
    token's score is the mean of the r x r patches the pixel shuffle folds into it. Both families'
    shuffles fold the patches of block (i, j) into token i*w + j (row-major)."""
    n, p = scores.shape
    h, w = grid
    r = int(round((p / (h * w)) ** 0.5))
    if h * r * w * r != p:
        raise ValueError(f"{p} patch scores do not fold onto a {h}x{w} token grid by a square pixel shuffle")
    return scores.reshape(n, h, r, w, r).mean(axis=(2, 4)).reshape(n, h * w)


def compress_tiles(compression: Compression, features: np.ndarray, grid: Grid, scores: np.ndarray | None) -> np.ndarray:
    """features [n, T, C] of n tiles on `grid` (scores [n, P] per patch, before the shuffle) -> [n, K, C],
    each tile compressed on its own."""
    tile_scores = [None] * len(features) if scores is None else block_scores(scores, grid)  # [n, T]
    return np.stack([compression.apply(f, grid, s)[0] for f, s in zip(features, tile_scores)])
