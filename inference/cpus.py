"""How many threads llama.cpp's own tools would use on this machine.

llama-server, llama-cli and llama-bench take their default thread count from
common_cpu_get_num_math (common/common.cpp in llama.cpp's source), for decoding and,
unless told otherwise, for prompt evaluation too. On Linux that is:

- on a hybrid Intel CPU (performance and efficiency cores), the performance cores:
  llama.cpp pins itself to each online CPU in turn, skips the efficiency cores
  ("efficiency cores harm lockstep threading") and counts every other performance
  CPU ("hyperthreading isn't useful for linear algebra"); if it cannot pin itself to
  one of them, it falls back to the next rule;
- otherwise the physical cores: the number of distinct
  /sys/devices/system/cpu/cpuN/topology/thread_siblings, read from cpu0 up to the
  first CPU without one;
- where that cannot be read, the logical CPUs if there are at most 4, else half.

llama-cpp-python's own default is different (half the logical CPUs: 1 on a 2-core
machine), which is why the engine never leaves the choice to it.

Here the efficiency cores are the CPUs the kernel lists in
/sys/devices/cpu_atom/cpus (its perf PMU of hybrid Intel parts), instead of asking
each core with CPUID as llama.cpp does; a kernel without that file gets the
physical cores.
"""

from __future__ import annotations

import itertools
import os

SYS_DEVICES = "/sys/devices"


def parse_cpu_list(text: str) -> set[int]:
    """The kernel's CPU list format: "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def performance_cpus(n_cpu: int, efficiency: set[int], allowed: set[int]) -> int:
    """common.cpp's cpu_count_math_cpus: 0 where llama.cpp would fall back to the
    physical cores (it could not pin itself to a CPU it meant to ask)."""
    result = 0
    cpu = 0
    while cpu < n_cpu:
        if cpu not in allowed:
            return 0
        if cpu in efficiency:
            cpu += 1
            continue
        result += 1
        cpu += 2
    return result


def physical_cores(sys_devices: str = SYS_DEVICES) -> int:
    """common_cpu_get_num_physical_cores on Linux."""
    siblings = set()
    for cpu in itertools.count():
        try:
            with open(f"{sys_devices}/system/cpu/cpu{cpu}/topology/thread_siblings") as f:
                siblings.add(f.readline().strip())
        except OSError:
            break
    if siblings:
        return len(siblings)
    logical = os.cpu_count() or 0
    if not logical:
        return 4
    return logical if logical <= 4 else logical // 2


def math_threads(
    sys_devices: str = SYS_DEVICES,
    n_cpu: int | None = None,
    allowed: set[int] | None = None,
) -> int:
    """common_cpu_get_num_math on Linux: the thread count llama.cpp's tools choose."""
    try:
        with open(f"{sys_devices}/cpu_atom/cpus") as f:
            efficiency = parse_cpu_list(f.read())
    except (OSError, ValueError):
        efficiency = set()
    if efficiency:  # a hybrid CPU
        if n_cpu is None:
            n_cpu = os.sysconf("SC_NPROCESSORS_ONLN")
        if allowed is None:
            allowed = os.sched_getaffinity(0)
        result = performance_cpus(n_cpu, efficiency, allowed)
        if result > 0:
            return result
    return physical_cores(sys_devices)
