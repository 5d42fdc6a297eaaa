"""Fails CI when a reference-parity or 8-device test was skipped or did not run at all.

    python3 .ci/check_skips.py JUNIT_XML [MODULE_PATTERN ...]

`JUNIT_XML` is pytest's `--junitxml` report of the whole suite (`.ci/run` asks for it through
`PYTEST_ADDOPTS`). A test module in `GUARDED` must have run at least one test and skipped
none (a missing reference package, e.g. `pytest.importorskip("torch")`, is a CI failure, not a
pass); any skip anywhere whose reason mentions host devices fails too (the 8-device sharding
tests). With MODULE_PATTERNs, those modules are the guarded ones instead (the Beam run of
`.ci/run`, whose own environment must run tests/test_beam_prepare.py). Standard library only.
"""

from __future__ import annotations

import fnmatch
import sys
import xml.etree.ElementTree as ET

# Module names (fnmatch patterns): reference parity and multi-device tests.
GUARDED = (
    "test_convert_*",  # HF Mamba / RecurrentGemma converters against their references
    "test_nn_griffin",  # RecurrentGemma parity
    "test_nn_mamba",
    "test_hubert",
    "test_train_sharding",  # 8 host devices
    "test_multihost",  # 2 processes x 4 devices
    "test_gcs_workdir",  # gs:// end to end against the local GCS emulator
)


def _module(case: ET.Element) -> str:
    """`test_x` for a testcase of tests/test_x.py (collection skips carry it in `name`)."""
    where = case.get("classname") or case.get("name") or ""
    parts = where.split(".")
    return next((p for p in parts if p.startswith("test_")), where)


def problems(junit_xml: str, guarded_modules: tuple[str, ...] = GUARDED) -> list[str]:
    """What is wrong with the run in `junit_xml`, one line each (empty when all is well)."""
    root = ET.parse(junit_xml).getroot()
    ran: dict[str, int] = {}
    out = []
    for case in root.iter("testcase"):
        module = _module(case)
        guarded = any(fnmatch.fnmatch(module, pattern) for pattern in guarded_modules)
        skipped = case.find("skipped")
        if skipped is None:
            ran[module] = ran.get(module, 0) + 1
            continue
        reason = skipped.get("message", "") + " " + (skipped.text or "")
        if guarded or "host devices" in reason:
            label = ".".join(x for x in (case.get("classname"), case.get("name")) if x)
            out.append(f"skipped: {label}: {reason.strip()}")
    for pattern in guarded_modules:
        if not any(fnmatch.fnmatch(m, pattern) for m in ran):
            out.append(f"no test ran from tests/{pattern}.py")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    found = problems(argv[1], tuple(argv[2:]) or GUARDED)
    for line in found:
        print(f"check_skips: {line}", file=sys.stderr)
    if found:
        print(
            "check_skips: reference parity and 8-device tests must run in CI (install the "
            "test extra; tests/conftest.py forces 8 CPU devices)",
            file=sys.stderr,
        )
        return 1
    print("check_skips: every parity and 8-device test ran")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
