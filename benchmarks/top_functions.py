"""Summarise a py-spy ``--format raw`` (collapsed stacks) file: the functions
where samples end (self time) and the ones on the stack (total time).

    python benchmarks/top_functions.py raw.txt [N]
"""

from __future__ import annotations

import sys
from collections import Counter


def main() -> int:
    path = sys.argv[1]
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(path, encoding="utf-8", errors="replace") as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            samples += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
    print(f"{samples} samples")
    print(f"\nself time (top {limit}):")
    for frame, n in own.most_common(limit):
        print(f"{100 * n / samples:6.1f}%  {frame}")
    print(f"\ntotal time, frame on the stack (top {limit}):")
    for frame, n in total.most_common(limit):
        print(f"{100 * n / samples:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
