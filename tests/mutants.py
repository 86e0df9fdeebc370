"""`make mutants`' summary: the kill rate per module from `mutmut results --all true` (read on stdin).

A mutant counts as killed when a test failed or timed out on it; survivors and mutants no selected test reaches
count against the rate; skipped ones (mutmut could not run them) are left out."""

import re
import sys
from collections import Counter

KILLED, MISSED = {"killed", "timeout"}, {"survived", "no tests"}


def main() -> None:
    counts: Counter = Counter()
    for line in sys.stdin:
        match = re.match(r"\s*(rapidin\.\w+)\..*__mutmut_\d+: (.+)$", line)
        if match and match[2] in KILLED | MISSED:
            counts[match[1], match[2] in KILLED] += 1
    modules = sorted({module for module, _ in counts})
    for module in [*modules, "total"]:
        killed = sum(n for (m, k), n in counts.items() if k and module in (m, "total"))
        total = sum(n for (m, _), n in counts.items() if module in (m, "total"))
        print(f"{module:24} {killed:5} of {total:5} killed ({100 * killed / max(total, 1):.1f} %)")


if __name__ == "__main__":
    main()
