"""CPU lists and pinning the processes an engine spawns (service.affinity)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.affinity import format_cpu_list, on_cpus, parse_cpu_list, usable_cpus
from service.config import WorkerSettings
from service.graph.schema import load_graph


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-1,4,6-7", {0, 1, 4, 6, 7}), (" 2 , 5", {2, 5})],
)
def test_cpu_lists_round_trip(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "a", "1-", "-1", "3-1", "1,,2", "1.5"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)
    with pytest.raises(ValueError, match="cpus"):
        WorkerSettings(model="m", cpus=text)


def test_children_start_pinned_and_the_thread_is_restored() -> None:
    before = os.sched_getaffinity(0)
    cpu = usable_cpus()[-1]

    def child_affinity() -> str:
        code = "import os; print(sorted(os.sched_getaffinity(0)))"
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()

    assert on_cpus(frozenset({cpu}), child_affinity) == f"[{cpu}]"
    assert os.sched_getaffinity(0) == before
    assert on_cpus(None, child_affinity) == str(sorted(before))


def test_cpus_this_process_cannot_use_are_refused() -> None:
    with pytest.raises(ValueError, match="not available"):
        on_cpus(frozenset({max(usable_cpus()) + 1000}), lambda: None)


def test_the_default_graph_gives_each_member_its_own_core_on_two() -> None:
    from service.embedded import plan_placement

    graph = load_graph(Path(__file__).resolve().parents[2] / "configs/local.yaml")
    plan = plan_placement(graph, ["smollm2", "gemma3", "router"], [0, 1])
    assert plan["smollm2"].cpus == {0} and plan["gemma3"].cpus == {1}
    assert plan["router"].cpus is None and plan["router"].threads == 1
