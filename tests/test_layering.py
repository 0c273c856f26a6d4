"""Imports go one way, down the stages, and no file imports itself back through others.

Every `import domainlm...` / `from domainlm... import ...` of src/domainlm is read with `ast`, at any depth (an
import inside a function counts as much as one at the top: it runs as soon as the function does). Layers, bottom up
(a module may import its own layer and the ones below, never one above):

0. the package face and the generic pieces every stage uses: errors, config, locks, outputs, checks (checks of options
   against any model's config: positions, label count; nothing of a stage), spans (cutting lengths into spans of
   least cost: inference batches, the CPU attention), plots (matplotlib with fonts that draw Chinese);
1. interop (model/tokenizer formats: HF, PaddleNLP, hub names), train (the one loop, accelerator, checkpoints),
   encoder (encoder forwards shared by pretraining, fine-tuning and inference);
2. data (corpora: read, clean, tokenize, store), vocab (training and extending a vocabulary, over data's tokenizer);
3. pretrain;
4. classify (fine-tuning, the linear floor, metrics, reports, the one classifier runtime);
5. sweep, serve, distill;
6. console, demo;
7. cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "domainlm"
LAYERS = [
    {"", "errors", "config", "options", "precision", "files", "locks", "outputs", "checks", "spans", "stats", "plots"},
    {"interop", "train", "encoder"},
    {"data", "vocab"},
    {"pretrain"},
    {"classify"},
    {"sweep", "serve", "distill"},
    {"console", "demo"},
    {"cli"},
]


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ("domainlm", *path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The domainlm modules a file imports (`from pkg import mod` counts as importing mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "domainlm"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "domainlm":
            for a in node.names:
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    matches = [i for i, names in enumerate(LAYERS) if top in names]
    assert matches, f"{module}: its place in the layers is not decided; add `{top}` to LAYERS (and to the docstring)"
    return matches[0]


def test_no_import_runs_up_the_layers():
    upward = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in sorted(graph().items())
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_loop_between_files():
    g = graph()
    loops, state = [], {}

    def visit(m: str, stack: list[str]) -> None:  # depth-first; a grey module met again closes a loop
        state[m] = "grey"
        for d in sorted(g[m]):
            if state.get(d) == "grey":
                loops.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = "black"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not loops, "\n".join(loops)


def test_the_checks_see_a_loop_and_an_upward_import(tmp_path):
    """The reader finds imports inside functions, and `from package import module`."""
    (tmp_path / "a.py").write_text("def f():\n    from domainlm.classify import runtime\n    import domainlm.cli\n")
    known = {"domainlm.classify.runtime": Path(), "domainlm.cli": Path(), "domainlm.classify": Path()}
    assert imports(tmp_path / "a.py", known) == {"domainlm.classify.runtime", "domainlm.cli"}
    assert (
        layer("domainlm.checks")
        < layer("domainlm.interop.paddle")
        < layer("domainlm.data.tokenize")
        < layer("domainlm.classify.runtime")
        < layer("domainlm.serve.server")
        < layer("domainlm.console.app")
    )
