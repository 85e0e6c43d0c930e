"""``python -m text_generation_server.kernels [build]``: compile the native CPU kernels now.

Run by ``make install`` and the container build so the first shard does not
compile them. Prints where the library is, or why it cannot run here and
exits 1.
"""

from __future__ import annotations

import sys

from text_generation_server.kernels import _host_reason, build


def main(argv: list[str]) -> int:
    if argv not in ([], ["build"]):
        print("usage: python -m text_generation_server.kernels [build]", file=sys.stderr)
        return 2
    why = _host_reason()
    if why is not None:
        print(f"native CPU kernels not built: {why}", file=sys.stderr)
        return 1
    try:
        path = build()
    except Exception as err:  # the compiler's own message is the useful part
        print(f"native CPU kernels not built: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
