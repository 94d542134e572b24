"""An unset thread count is llama.cpp's own choice for the machine (issue 25):
common_cpu_get_num_math in llama.cpp's common/common.cpp, as inference/cpus.py
reads it, on the machine topologies it distinguishes."""

import os
from pathlib import Path

import pytest

from inference.cpus import math_threads, parse_cpu_list, performance_cpus, physical_cores
from inference.engine import resolve_threads


def sysfs(root, siblings: list[str], atom: str | None = None) -> str:
    """A /sys/devices with one thread_siblings per CPU (and cpu_atom/cpus)."""
    for cpu, mask in enumerate(siblings):
        topology = root / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings").write_text(mask + "\n")
    if atom is not None:
        (root / "cpu_atom").mkdir()
        (root / "cpu_atom" / "cpus").write_text(atom + "\n")
    return str(root)


def test_two_cores_without_hyper_threads_are_two_threads_not_one(tmp_path):
    """The 2-core cloud machine of the issue: llama-server chose 2 threads there,
    llama-cpp-python's default (half the logical CPUs) 1."""
    root = sysfs(tmp_path, ["1", "2"])
    assert math_threads(root) == 2


def test_hyper_threads_sharing_a_core_count_once(tmp_path):
    # 4 cores, 8 CPUs: cpuN and cpuN+4 are siblings, as Linux numbers them on x86.
    masks = ["11", "22", "44", "88"] * 2
    assert math_threads(sysfs(tmp_path, masks)) == 4


def test_a_hybrid_cpu_counts_its_performance_cores_only(tmp_path):
    # 6 performance cores with 2 threads each (cpu0-11), 8 efficiency cores (12-19).
    masks = [f"{1 << (c // 2):x}" for c in range(12)] + [f"{1 << c:x}" for c in range(12, 20)]
    root = sysfs(tmp_path, masks, atom="12-19")
    assert physical_cores(root) == 14
    assert math_threads(root, n_cpu=20, allowed=set(range(20))) == 6


def test_on_a_hybrid_cpu_that_llama_cpp_cannot_pin_to_it_takes_the_physical_cores(tmp_path):
    masks = [f"{1 << (c // 2):x}" for c in range(12)] + [f"{1 << c:x}" for c in range(12, 20)]
    root = sysfs(tmp_path, masks, atom="12-19")
    assert math_threads(root, n_cpu=20, allowed=set(range(4, 20))) == 14


def test_performance_cpus_skips_efficiency_cores_and_every_other_performance_cpu():
    assert performance_cpus(8, efficiency={4, 5, 6, 7}, allowed=set(range(8))) == 2
    assert performance_cpus(8, efficiency=set(), allowed=set(range(8))) == 4
    assert performance_cpus(8, efficiency=set(range(8)), allowed=set(range(8))) == 0


@pytest.mark.parametrize(("logical", "expected"), [(2, 2), (4, 4), (8, 4), (None, 4)])
def test_without_a_topology_it_is_the_logical_cpus_up_to_4_and_half_above(
    tmp_path, monkeypatch, logical, expected
):
    monkeypatch.setattr(os, "cpu_count", lambda: logical)
    assert math_threads(str(tmp_path)) == expected


def test_cpu_lists():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("") == set()


def test_on_this_machine_an_unset_thread_count_is_llama_cpps_choice_for_both_kinds():
    cores = math_threads()
    assert resolve_threads(0, 0) == (cores, cores)
    assert resolve_threads(3, 0) == (3, 3)
    assert resolve_threads(0, 5) == (cores, 5)
    # Without hyper-threads or efficiency cores, every CPU: 2 on a 2-core machine,
    # where llama-cpp-python's own default would be 1.
    masks = {
        p.read_text() for p in Path("/sys/devices/system/cpu").glob("cpu*/topology/thread_siblings")
    }
    if len(masks) == os.cpu_count() and not Path("/sys/devices/cpu_atom/cpus").exists():
        assert cores == os.cpu_count()
