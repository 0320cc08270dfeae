"""The code reads one way: imports point down, never in a circle, and every top-level file reads in
one sitting. The layers, bottom first (README, "Files"):

    model, saliency, masking, data     the method and its data: import no file of a higher layer
    plumbing                           processes (torchrun, srun), the output folder's lock, writes that
                                       fail in one line: imports the bottom layer only (in fact none of it)
    pictures, probe, region_stats      the plan picture and line charts, the linear probe's grid, the
                                       region statistics: import the bottom layer only, so evaluate and
                                       train can both use them
    config                             the shared parser, checkpoints, devices: imports the bottom layer
                                       and plumbing only
    evaluate                           imports config and the layers below, never train
    train                              imports config, evaluate and the layers below
    seeds, bench                       may import anything

Read from the source (ast), so nothing is imported or run."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTTOM = ("model", "saliency", "masking", "data")
BESIDE_BOTTOM = ("plumbing", "pictures", "probe", "region_stats")  # each imports the bottom layer only
MAX_LINES = 500  # what a reader takes in at one sitting (nanoGPT's train.py: ~330; MAE's models_mae.py: ~250)

# Top-level files allowed past MAX_LINES, each with the reason, which the README repeats word for word.
LONG_FILES = {
    "evaluate.py": "the paper's evaluation protocol side by side (the checkpoint's configuration, kNN, the linear probe, fine-tuning and two baselines), each a few small functions over cached features",
    "data.py": "six datasets and their loaders, without torchvision",
    "masking.py": "the I-JEPA sampler, both DSeq plan modes with their ablations, and the packing of plans",
    "bench.py": "a benchmark with many measurements, not read beside the paper",
}


def top_level_files():
    return sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def project_imports(path, modules):
    """The project modules a file imports anywhere in it (top of file or inside a function)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules


def import_graph():
    """{module: the project modules it imports} for every top-level .py."""
    modules = {f[:-3] for f in top_level_files()}
    return {m: project_imports(os.path.join(ROOT, m + ".py"), modules - {m}) for m in modules}


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []  # state: 1 = on the current path, 2 = done

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle {' -> '.join(cycle)}: move what both need into a file below both"


def test_find_cycle_finds_one():
    """The checker itself: a two-file cycle and a longer one are found; a chain is not a cycle."""
    assert find_cycle({"train": {"evaluate"}, "evaluate": {"train"}}) in (["evaluate", "train", "evaluate"],
                                                                         ["train", "evaluate", "train"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"train": {"evaluate", "config"}, "evaluate": {"config"}, "config": set()}) is None


def test_arrows_point_down():
    graph = import_graph()
    for m in BOTTOM:
        assert graph[m] <= set(BOTTOM), f"{m}.py imports {sorted(graph[m] - set(BOTTOM))}: the bottom layer " \
                                        "(model, saliency, masking, data) imports none of the files above it"
    for m in BESIDE_BOTTOM:
        assert not graph.get(m, set()) - set(BOTTOM), f"{m}.py imports only the bottom layer " \
                                                      f"(it imports {sorted(graph[m] - set(BOTTOM))})"
    assert not graph.get("config", set()) - set(BOTTOM) - {"plumbing"}, "config.py imports only the bottom layer and plumbing"
    assert "train" not in graph.get("evaluate", ()), "evaluate.py imports config, never train (train imports evaluate)"


@pytest.mark.parametrize("name", top_level_files())
def test_file_reads_in_one_sitting(name):
    with open(os.path.join(ROOT, name)) as f:
        lines = len(f.read().splitlines())
    if name not in LONG_FILES:
        assert lines <= MAX_LINES, (f"{name} has {lines} lines (> {MAX_LINES}): remove what a reader does not need, "
                                    f"or add it to LONG_FILES with the reason and repeat that reason in the README")
    else:
        assert lines > MAX_LINES, f"{name} has {lines} lines (<= {MAX_LINES}): remove its LONG_FILES entry"
        with open(os.path.join(ROOT, "README.md")) as f:
            if LONG_FILES[name] not in f.read():
                pytest.fail(f"the README must say why {name} is long, in these words: {LONG_FILES[name]!r}")
