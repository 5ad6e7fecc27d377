"""The reader's path, kept: every training loop shows its backward and optimizer step, PPO's
iteration holds its minibatch loop, the functions named check_* only refuse (the settings they
derive are settled in settle_defaults), and no source line runs past 120 characters.

    python -m pytest -q tests/test_code_layout.py
"""
import ast
import glob
import os

import pytest

from conftest import ROOT

SCRIPTS = ["train_sft.py", "train_dpo.py", "train_rm.py", "train_ppo.py", "train_online_dpo.py"]


def function(path: str, name: str) -> ast.FunctionDef:
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)


def calls(node: ast.AST) -> list[str]:
    """The dotted names of every call inside node: optimizer.step, loss.backward, ..."""
    names = []
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        func = call.func
        if isinstance(func, ast.Attribute):
            inner = func.value
            prefix = inner.id if isinstance(inner, ast.Name) else ""
            names.append(f"{prefix}.{func.attr}")
        elif isinstance(func, ast.Name):
            names.append(func.id)
    return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_loop_shows_its_backward_and_optimizer_step(script):
    names = calls(function(script, "train"))
    assert "optimizer.step" in names and "optimizer.zero_grad" in names and ".backward" in names


def test_ppo_train_holds_the_minibatch_loop():
    train = function("train_ppo.py", "train")
    loops = [n for n in ast.walk(train) if isinstance(n, ast.For)]
    assert any("optimizer.step" in calls(loop) and ".backward" in calls(loop) for loop in loops)


def test_no_check_function_assigns_a_setting():
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("check"):
                for sub in ast.walk(node):
                    targets = (sub.targets if isinstance(sub, ast.Assign)
                               else [sub.target] if isinstance(sub, (ast.AugAssign, ast.AnnAssign)) else [])
                    offenders += [f"{os.path.basename(path)}: {node.name} sets cfg.{t.attr}" for t in targets
                                  if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "cfg"]
    assert not offenders


def test_no_source_line_is_over_120_characters():
    long = [f"{os.path.basename(path)}:{i}" for path in sorted(glob.glob(os.path.join(ROOT, "*.py")))
            for i, line in enumerate(open(path).read().splitlines(), 1) if len(line) > 120]
    assert not long, long
