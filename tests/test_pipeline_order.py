"""One pipeline-order definition (messages.subjects.PIPELINE_ORDER): the stage registry follows
it and no other module of the project spells the order out again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from messages.subjects import PIPELINE_ORDER
from services.stages import BUILTIN, stage_names
from services.stages.stitch import UPSTREAM
from services.state.timeline import TAIL_HOPS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_registry_timeline_and_stitch_follow_the_one_order():
    assert PIPELINE_ORDER[0] == "watcher"
    assert stage_names() == list(BUILTIN) == list(PIPELINE_ORDER[1:])
    assert TAIL_HOPS == PIPELINE_ORDER
    assert UPSTREAM == ("convert", "process")


def spelled_orders(path: Path) -> list[int]:
    """Lines of tuple/list literals naming two or more services, all in pipeline order."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Tuple | ast.List):
            continue
        names = [e.value for e in node.elts if isinstance(e, ast.Constant)]
        if len(names) >= 2 and len(names) == len(node.elts) and set(names) <= set(PIPELINE_ORDER):
            found.append(node.lineno)
    return found


def test_no_other_module_lists_the_order():
    own = ROOT / "messages" / "subjects.py"
    files = [p for d in ("services", "messages", "kernels") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 40
    spelled = {str(p.relative_to(ROOT)): spelled_orders(p) for p in files if p != own}
    assert {name: lines for name, lines in spelled.items() if lines} == {}
    assert spelled_orders(own)  # the scan finds the definition itself
