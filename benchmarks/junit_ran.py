"""Exit non-zero unless a pytest JUnit report shows at least one test that ran (not skipped).

    python benchmarks/junit_ran.py REPORT.xml [--min N]

``gpu_check.sh`` uses it after ``pytest -m gpu``: a session in which every test skipped exits 0 in
pytest but has checked nothing.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET


def count(path: str) -> tuple[int, int]:
    """(tests collected, tests skipped) over every <testsuite> of the report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--min", type=int, default=1, help="tests that must have run (default 1)")
    args = ap.parse_args(argv)
    try:
        total, skipped = count(args.report)
    except (OSError, ET.ParseError) as e:
        print(f"no readable JUnit report {args.report}: {e}")
        return 1
    ran = total - skipped
    print(f"{args.report}: {total} collected, {skipped} skipped, {ran} ran")
    return 0 if ran >= args.min else 1


if __name__ == "__main__":
    sys.exit(main())
