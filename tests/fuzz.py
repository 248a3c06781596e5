"""REST fuzzing with schemathesis against a served OpenAPI document: every operation, valid and invalid inputs."""

import json
import time
import urllib.request
from collections import Counter


def fuzz_openapi(base: str, examples: int, timeout_s: float, headers: dict | None = None) -> dict:
    """Generate `examples` positive and `examples` negative cases per operation of `base`/openapi.json and send them.
    Returns counts by status class, the 5xx answers, statuses the document does not list, and answers slower than
    `timeout_s` (a timeout counts as slow)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as resp:
        schema = schemathesis.openapi.from_dict(json.loads(resp.read()))
    out = {"by_class": Counter(), "cases": 0, "server_errors": [], "undocumented": [], "slow": []}
    session = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        documented = set(op.definition.raw.get("responses", {}))
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def send(case):
                t0 = time.perf_counter()
                try:
                    r = case.call(base_url=base, session=session, headers=headers, timeout=timeout_s)
                except requests.Timeout:
                    out["slow"].append((op.label, "timeout"))
                    return
                took = time.perf_counter() - t0
                out["cases"] += 1
                out["by_class"][f"{r.status_code // 100}xx"] += 1
                if r.status_code >= 500:
                    out["server_errors"].append((op.label, r.status_code, r.text[:200]))
                if str(r.status_code) not in documented:
                    out["undocumented"].append((op.label, r.status_code))
                if took > timeout_s:
                    out["slow"].append((op.label, round(took, 2)))

            try:
                send()
            except Unsatisfiable:  # an operation without inputs has no invalid case to make
                if mode != schemathesis.GenerationMode.NEGATIVE:
                    raise
    return out
