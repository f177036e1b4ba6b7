"""One home per concept, checked on the source: the layers of trainer/ (no cycle, no lower module importing a
higher one), and where model-family code, ranks and resume decisions may live. The README's "Architecture"
section draws the same layers."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

from helpers import REPO

# Each module may import only modules of lower levels (imports inside functions and under TYPE_CHECKING count).
LAYERS = [
    # 0: no trainer imports
    ["trainer", "errors", "rng", "files", "dtypes", "reporting", "reporting.tables"],
    # 1: the contracts: the process environment, the spec, the shard format, the rank layout, the objective
    ["process_env", "spec", "shard_format", "parallel", "diffusion", "watchdog", "media", "reporting.wandb_run"],
    # 2: what the contracts are made into
    ["shard_index", "state", "families.base", "engine", "reporting.writers", "low_memory", "compiled"],
    ["families.cogvideox_pipeline", "families.cogvideox_i2v", "families.cogvideox_ulysses", "sequence", "data",
     "checkpoint", "faults", "reporting.interval", "ema"],
    ["families.cogvideox", "resume", "sampling"],
    ["families", "costs", "reporting.run_dir"],  # families: the registry, above every family
    ["export", "reporting.startup_table", "fit"],
    ["validation", "planner"],
    ["startup"],
    ["loop"],
]
LEVEL = {f"trainer.{name}" if name != "trainer" else name: level
         for level, names in enumerate(LAYERS) for name in names}
SOURCES = ("trainer", "data_tools", "launch", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def trainer_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / "trainer").rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The trainer modules ``path`` imports: ``from trainer.x import y`` is trainer.x.y where that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= subs or {node.module}
    return {name for name in found if name in known}


def test_trainer_imports_go_down_the_layers_only():
    modules = trainer_modules()
    assert set(modules) == set(LEVEL), f"place every module in LAYERS: {set(modules) ^ set(LEVEL)}"
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    upward = [f"{name} (level {LEVEL[name]}) imports {dep} (level {LEVEL[dep]})"
              for name, deps in graph.items() for dep in sorted(deps) if LEVEL[dep] >= LEVEL[name]]
    assert not upward, "\n".join(upward)
    assert graph["trainer.loop"] and graph["trainer.families"]  # the walk finds imports at all


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def lines_matching(pattern: str, files: list[Path]) -> dict[str, list[str]]:
    regex = re.compile(pattern)
    hits: dict[str, list[str]] = {}
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if regex.search(line):
                hits.setdefault(str(path.relative_to(REPO)), []).append(f"{number}: {line.strip()}")
    return hits


def cogvideox_imports(path: Path) -> list[str]:
    """What ``path`` imports of diffusers' CogVideoX classes and modules (anywhere in the file)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffusers":
            names = [node.module or ""] + [alias.name for alias in node.names]
            found += [name for name in names if re.search("cogvideo", name, re.IGNORECASE)]
    return found


def test_model_family_code_lives_under_trainer_families():
    """Outside trainer/families/ (and the tiny-model tool, and tests), nothing imports a CogVideoX class or
    module of diffusers; and trainer/ never imports data_tools/."""
    imports = {str(p.relative_to(REPO)): found for p in python_files(*SOURCES) if (found := cogvideox_imports(p))}
    allowed = {path for path in imports if path.startswith("trainer/families/")} | {"data_tools/tiny_model.py"}
    assert imports.keys() - allowed == set(), {k: v for k, v in imports.items() if k not in allowed}
    assert "CogVideoXTransformer3DModel" in imports["trainer/families/cogvideox.py"]  # the walk does find them
    assert lines_matching(r"^\s*(from|import) data_tools\b", python_files("trainer")) == {}


def test_ranks_come_from_the_parallel_layout_and_the_process_environment():
    hits = lines_matching(r"\bget_(world_size|rank)\(", python_files(*SOURCES))
    assert set(hits) == {"trainer/parallel.py"}, hits


def test_the_resume_rules_live_in_trainer_resume():
    """Choosing a checkpoint (checkpoint.resume), refusing one, universal loading and restoring: resume.py alone
    (checkpoint.py is the format it reads)."""
    rules = r"\.checkpoint\.resume\b|load_universal|\bensure_universal\(|\bload_checkpoint\(|\bcomplete_checkpoints\(" \
            r"|\bread_marker\(|seed_global_rngs\("
    hits = lines_matching(rules, python_files(*SOURCES))
    assert set(hits) <= {"trainer/resume.py", "trainer/checkpoint.py", "trainer/state.py"}, hits
    assert "trainer/resume.py" in hits
