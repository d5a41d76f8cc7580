"""The docs stay true: README's "Supported models" table against the registries and the harness,
docs/ADDING_A_FAMILY.md's file paths and line counts against the tree, and ARCHITECTURE.md's
layering rules against the module-level imports. Reads files and registries only (fast)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import FAMILY_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ADDING = ROOT / "docs" / "ADDING_A_FAMILY.md"

# display names the README uses; a new tower or backbone needs a line here and a mention in the table
TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP", "dinov2": "DINOv2"}  # HF model_type
TINY_TOWERS = {"clip": "CLIP", "siglip": "SigLIP", "dinov2": "DINOv2"}  # TinyConfig.vision_model
BACKBONES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "phi3": "Phi-3",
             "qwen2_vl_text": "Qwen2 (M-RoPE)", "qwen2_5_vl_text": "Qwen2 (M-RoPE)"}
COLUMNS = ("family", "architectures", "towers", "backbones", "decoders", "tested")

# files ADDING_A_FAMILY.md must name: the two family modules, the registries, the builder, the harness
ADDING_MUST_NAME = (
    "runtime/families/llava_next.py", "export/llava_next.py", "runtime/anyres.py",
    "runtime/families/__init__.py", "export/registry.py", "export/tiny.py",
    "tests/conftest.py", "tests/test_families.py",
)
REPO_PATH = re.compile(r"\b(?:runtime|export|tests|docs|configs|demo|package|scripts|serve)/[\w/.-]*\w")


def supported_models() -> list[dict[str, str]]:
    """The rows of README's "Supported models" table as {column: cell}."""
    text = README.read_text()
    section = text.split("\n## Supported models\n", 1)
    assert len(section) == 2, "README.md has no '## Supported models' section"
    lines = [ln for ln in section[1].split("\n## ", 1)[0].splitlines() if ln.startswith("|")]
    header = [c.strip().lower() for c in lines[0].strip("|").split("|")]
    assert len(header) == len(COLUMNS), f"table header {header}: expected {len(COLUMNS)} columns {COLUMNS}"
    rows = [[c.strip() for c in _cells(ln)] for ln in lines[2:]]
    assert rows and all(len(r) == len(COLUMNS) for r in rows), rows
    return [dict(zip(COLUMNS, r)) for r in rows]


def _cells(line: str) -> list[str]:
    return re.split(r"(?<!\\)\|", line.strip().strip("|"))


def row_of(family: str) -> dict[str, str]:
    rows = [r for r in supported_models() if f"`{family}`" in r["family"]]
    assert len(rows) == 1, f"README Supported models: {len(rows)} rows name family `{family}` in their family column"
    return rows[0]


def column(name: str) -> str:
    return "\n".join(r[name] for r in supported_models())


def test_every_registered_architecture_is_in_the_table():
    from vlmdeploy.export.registry import FAMILIES

    for arch in FAMILIES:
        assert f"`{arch}`" in column("architectures"), f"{arch} (export/registry.py) is not in README's Supported models"


def test_every_runtime_family_has_a_row():
    from vlmdeploy.runtime.families import FAMILIES

    for name in FAMILIES:
        row_of(name)


def test_every_decoder_gqa_backbone_is_in_the_table():
    from vlmdeploy.export.decoder_gqa import SUPPORTED_MODEL_TYPES

    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in BACKBONES, f"decoder_gqa supports {model_type!r}: add its display name to BACKBONES here"
        assert BACKBONES[model_type] in column("backbones"), f"{BACKBONES[model_type]} is not in README's table"


def test_every_vision_tower_is_in_the_table():
    from vlmdeploy.export.components import TOWER_LAYER_LISTS

    for model_type in TOWER_LAYER_LISTS:
        assert model_type in TOWERS, f"export/components.py supports tower {model_type!r}: add its display name to TOWERS here"
        assert TOWERS[model_type] in column("towers"), f"{TOWERS[model_type]} is not in README's table"


@pytest.mark.parametrize("name", list(FAMILY_VARIANTS))
def test_every_harness_variant_is_covered_by_its_row(name):
    cfg = FAMILY_VARIANTS[name]
    row = row_of(cfg.family)
    backbone, tower = BACKBONES[cfg.text_model], TINY_TOWERS[cfg.vision_model]
    assert backbone in row["backbones"] and tower in row["towers"], (name, row)
    assert f"{backbone}+{tower}" in _tested_pairs(row), f"{name}: README's tested column lacks {backbone}+{tower}"


def test_tested_pairs_are_exactly_the_harness_variants():
    """A pair in the tested column that no FAMILY_VARIANTS entry runs would be a claim nothing checks."""
    for row in supported_models():
        family = re.search(r"`(\w+)`", row["family"]).group(1)
        want = {f"{BACKBONES[c.text_model]}+{TINY_TOWERS[c.vision_model]}" for c in FAMILY_VARIANTS.values()
                if c.family == family}
        assert _tested_pairs(row) == want, (family, row["tested"])


def _tested_pairs(row: dict[str, str]) -> set[str]:
    return set(re.findall(r"[\w-]+\+[\w-]+", row["tested"]))


def test_readme_says_manifest_v2_and_v1_loads():
    from vlmdeploy.runtime.manifest import MANIFEST_VERSION, READABLE_VERSIONS

    text = README.read_text()
    assert MANIFEST_VERSION == 2 and 1 in READABLE_VERSIONS
    assert "manifest v2" in text and "(v1, LLaVA-1.5) still load" in text


def test_adding_a_family_names_the_files_and_they_exist():
    text = ADDING.read_text()
    for path in ADDING_MUST_NAME:
        assert path in text, f"docs/ADDING_A_FAMILY.md does not mention {path}"
    named = {p for p in REPO_PATH.findall(text) if "NAME" not in p}  # runtime/families/NAME.py: a template
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/ADDING_A_FAMILY.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md", "docs/SERVING.md"])
def test_docs_name_only_files_that_exist(doc):
    text = (ROOT / doc).read_text()
    links = re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)\)", text)
    base = (ROOT / doc).parent
    named = [p for p in REPO_PATH.findall(text) if not p.startswith("docs/") and "NAME" not in p]  # docs/operators.md: onnx-tensorrt's
    missing = sorted({p for p in named if not (ROOT / p).exists()} | {p for p in links if not (base / p).exists()})
    assert not missing, f"{doc} names files that do not exist: {missing}"


# ---- layering (docs/ARCHITECTURE.md "Layering") -------------------------------------------------

PACKAGES = {"runtime": "vlmdeploy.runtime", "export": "vlmdeploy.export", "package": "vlmdeploy", "serve": "vlmdeploy.serve"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path) -> set[str]:
    """Absolute names imported by statements in the module body (lazy imports inside functions are allowed)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from . import anyres` imports a module
    return out


def _modules() -> dict[str, Path]:
    files = [p for d in PACKAGES for p in (ROOT / d).rglob("*.py")]
    return {_module_name(p): p for p in files}


def test_runtime_never_imports_export_or_torch_at_module_level():
    for name, path in _modules().items():
        if not name.startswith("vlmdeploy.runtime"):
            continue
        bad = sorted(i for i in _module_level_imports(path)
                     if i.split(".")[0] in ("torch", "transformers") or i.startswith("vlmdeploy.export"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad} at module level (runtime must not)"


def test_no_import_cycles():
    modules = _modules()
    graph = {m: sorted(i for i in _module_level_imports(p) if i in modules and i != m) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n):], n])
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
