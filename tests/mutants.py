"""`make mutants`' summary: the kill rate per module from `mutmut results --all true` (read on stdin).

A mutant counts as killed when a test failed or timed out on it; survivors and mutants no selected test reaches
count against the rate; skipped ones (mutmut could not run them) are left out, and those not yet run (a run
narrowed to some mutants, or stopped) are counted apart."""

import re
import sys
from collections import Counter

KILLED, MISSED, NOT_RUN = {"killed", "timeout"}, {"survived", "no tests"}, "not checked"
# rapidin.gradients.loss.x_collate__mutmut_3, rapidin.gradients.loss.xǁBatchǁto__mutmut_2: the module is what
# comes before the mangled function (x_ for a function, xǁClassǁ for a method)
NAME = re.compile(r"\s*(rapidin(?:\.\w+)+?)\.x(?:_|ǁ)[^.]*__mutmut_\d+: (.+)$")


def main() -> None:
    counts: Counter = Counter()
    for line in sys.stdin:
        match = NAME.match(line)
        if match and match[2] in KILLED | MISSED | {NOT_RUN}:
            counts[match[1], "not run" if match[2] == NOT_RUN else match[2] in KILLED] += 1
    modules = sorted({module for module, _ in counts})
    for module in [*modules, "total"]:
        killed, missed, not_run = (
            sum(n for (m, kind), n in counts.items() if kind == want and module in (m, "total"))
            for want in (True, False, "not run")
        )
        total = killed + missed
        rate = f"{100 * killed / total:.1f} %" if total else "-"
        print(f"{module:28} {killed:5} of {total:5} killed ({rate}); {not_run} not run")


if __name__ == "__main__":
    main()
