"""`make bench`: run every benchmark module and print its table.

Each module in tests/bench/ with a main() is run in turn; `make bench ONLY=stream`
runs the ones whose name contains "stream". Figures go to docs/benchmarks.md.
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
    only = os.environ.get("ONLY", "")
    import tests.bench as package

    failures = 0
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.endswith("_bench") or only not in info.name:
            continue
        module = importlib.import_module(f"tests.bench.{info.name}")
        print(f"\n=== {info.name} ===", flush=True)
        try:
            module.main()
        except Exception:  # noqa: BLE001 - one failed benchmark must not hide the others
            traceback.print_exc()
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
