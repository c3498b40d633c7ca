"""The real process against its own OpenAPI document, with schemathesis.

``payments serve`` runs on a database and emulator of its own (the run creates,
cancels and posts events at random ids, which must not touch other tests' payments),
and schemathesis generates requests for every operation from ``GET /openapi.json``:
the examples and coverage phases (boundaries, missing and wrong-typed fields), then
fuzzing, with a fixed seed and a bounded number of examples, valid and invalid data
alike, and a valid API key. It fails on any server error and on any answer the
document does not describe (status, content type, headers, body schema).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.harness import ORDERS_KEY, Isolated
from payments.api.openapi import build_document

SEED = 20261129
MAX_EXAMPLES = 12
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
# The whole run; it takes about 20-40 s on 2 busy cores.
RUN_TIMEOUT_SECONDS = 180

pytestmark = pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 90)


def test_the_service_keeps_its_openapi_document(isolated: Isolated, tmp_path: Path) -> None:
    service = isolated.spawn()
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{service.http_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "15",
        "--header",
        f"X-API-Key: {ORDERS_KEY}",
        "--no-color",
        "--report",
        "junit,har",
        "--report-dir",
        str(tmp_path),
    ]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"schemathesis found problems:\n{output[-12000:]}"
    # It did test every operation of the document, and every case passed.
    # (schemathesis leaves out GET /openapi.json, the document it was given)
    operations = sum(len(methods) for methods in build_document()["paths"].values())
    assert f"Tested: {operations - 1}" in output, output[-4000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases is not None and cases[1] == cases[2], output[-4000:]
    errors = [e for e in service.log_entries() if e.get("level") in ("error", "critical")]
    assert errors == [], "the service logged errors during the run"
