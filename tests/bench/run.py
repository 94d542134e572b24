"""`make bench`: run every benchmark module and print its table.

Each module in tests/bench/ with a main() is run in turn. `make bench ONLY=NAME` runs
the module NAME_bench alone when there is one (ONLY=stream: stream_bench; ONLY=
single-stream: single_stream_bench), else the ones whose name contains NAME. Figures
go to docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback

import django


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
    django.setup()
    only = os.environ.get("ONLY", "").replace("-", "_")
    import tests.bench as package

    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    names = [name for name in names if name.endswith("_bench")]
    if f"{only}_bench" in names:
        names = [f"{only}_bench"]
    else:
        names = [name for name in names if only in name]
    failures = 0
    for name in names:
        module = importlib.import_module(f"tests.bench.{name}")
        print(f"\n=== {name} ===", flush=True)
        try:
            module.main()
        except Exception:  # noqa: BLE001 - one failed benchmark must not hide the others
            traceback.print_exc()
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
