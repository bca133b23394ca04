"""How fast the data layer's offline failures answer, against their time bounds.

The test suite checks that these failures do no needless work (one reachability probe with
a timeout, no download, no tokenizer or corpus loaded: ``tests/test_vision_data.py`` and
``tests/test_text_data.py``) and never how long they take, since a loaded machine stretches
any wall-clock. The seconds live here, each against the bound the tests used to assert:

* ``cifar10_offline``: ``cifar10(download=True)`` when the CIFAR host does not answer (the
  download URL pointed at 192.0.2.1, a TEST-NET-1 address that is never routed, so nothing
  is downloaded even on a machine with network); bound 10 s.
* ``tokenizer_name``: ``text(file, tokenizer="gpt2")``, a hub name where a local tokenizer
  directory is required; bound 2 s.
* ``hub_closed_port``: a hub dataset with the hub address at a closed local port (refused
  at once); bound 10 s.
* ``hub_unrouted``: a hub dataset with the hub address at 192.0.2.1 (no answer: the probe
  waits for its whole timeout); bound 10 s.

Run: ``python -m speedup.benchmarks.fail_fast [--repeats 3]``. Prints the median seconds of
each case with its bound; the last line is machine-readable: ``<case>_s=<float> ...
within_bounds=<0|1>``. Exit status 1 when a case exceeded its bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["BOUNDS_S", "main", "seconds_to_error"]

#: The bound of each case, in seconds.
BOUNDS_S: dict[str, float] = {
    "cifar10_offline": 10.0,
    "tokenizer_name": 2.0,
    "hub_closed_port": 10.0,
    "hub_unrouted": 10.0,
}
_UNROUTED = "192.0.2.1"  # RFC 5737 TEST-NET-1: reserved for documentation, never routed


def seconds_to_error(call: Callable[[], object], expected: type[BaseException]) -> float:
    """Wall-clock seconds until ``call`` raises ``expected``; anything else is an error."""
    started = time.perf_counter()
    try:
        call()
    except expected:
        return time.perf_counter() - started
    raise RuntimeError(f"{call!r} did not raise {expected.__name__}")


def _cases(folder: Path) -> dict[str, Callable[[], float]]:
    import speedup.data.text as text
    import speedup.data.vision as vision
    from speedup.errors import DataPathError

    corpus = folder / "a.txt"
    corpus.write_text("hello world\n")

    def cifar10_offline() -> float:
        url = vision.CIFAR10_URL
        vision.CIFAR10_URL = f"https://{_UNROUTED}/cifar-10-python.tar.gz"
        root = tempfile.mkdtemp(dir=folder)
        try:
            return seconds_to_error(lambda: vision.cifar10(root=root, download=True), DataPathError)
        finally:
            vision.CIFAR10_URL = url

    def tokenizer_name() -> float:
        return seconds_to_error(
            lambda: text.text(str(corpus), tokenizer="gpt2", cache=False), DataPathError
        )

    def hub(address: tuple[str, int]) -> Callable[[], float]:
        def case() -> float:
            saved = text.HUB_ADDRESS
            text.HUB_ADDRESS = address
            try:
                return seconds_to_error(
                    lambda: text.text(
                        "allenai/c4", subset="en", max_train_tokens=1000, cache=False
                    ),
                    DataPathError,
                )
            finally:
                text.HUB_ADDRESS = saved

        return case

    return {
        "cifar10_offline": cifar10_offline,
        "tokenizer_name": tokenizer_name,
        "hub_closed_port": hub(("127.0.0.1", 9)),
        "hub_unrouted": hub((_UNROUTED, 443)),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    # Offline mode would skip the probe and ask `datasets` instead: measure the probe.
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.pop(flag, None)
    results: dict[str, float] = {}
    within = True
    with tempfile.TemporaryDirectory(prefix="fail-fast-") as folder:
        os.environ["SPEEDUP_CACHE"] = str(Path(folder) / "cache")
        for name, case in _cases(Path(folder)).items():
            seconds = statistics.median(case() for _ in range(args.repeats))
            ok = seconds <= BOUNDS_S[name]
            within = within and ok
            results[f"{name}_s"] = seconds
            print(
                f"{name}: {seconds:.3f} s to the error (median of {args.repeats}); bound "
                f"{BOUNDS_S[name]:.0f} s: {'within' if ok else 'EXCEEDED'}"
            )
    results["within_bounds"] = float(within)
    print(" ".join(f"{k}={v:.4g}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["within_bounds"] else 1)
