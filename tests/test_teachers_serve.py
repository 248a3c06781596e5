"""Teacher servers on a real local Ray Serve: handle path, batching, REST, scaling, auth, metrics, CLI."""

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TEST_TOKEN, TEST_TOKEN_ENV
from danceopd.config import ConfigError
from danceopd.contracts import VelocityQuery
from danceopd.suite import world
from services.teachers.app import deploy_teachers, render_serve_config, serve_config
from services.teachers.client import TeacherClient
from services.teachers.config import load_teachers_config
from services.teachers.fields import build_field

ROOT = Path(__file__).resolve().parents[1]


def teachers_dict(student_dir: Path, auth: bool = False, max_payload_mb: float = 1.0) -> dict:
    fast = {"num_cpus": 0.25}
    return {
        "teachers": [
            # A long batch wait on t2i so that concurrent callers reliably land in one batch.
            {"name": "t2i", "field": {"kind": "suite", "capability": "t2i"}, "ray_actor_options": fast,
             "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.2}},
            # Small model calls on local_edit: larger queries are answered in chunks.
            {"name": "local_edit", "field": {"kind": "suite", "capability": "local_edit"}, "ray_actor_options": fast,
             "batching": {"max_batch_size": 4}},
            {"name": "global_edit", "field": {"kind": "suite", "capability": "global_edit"}, "ray_actor_options": fast,
             "batching": {"enabled": False}},
            {"name": "t2i_cfg", "field": {"kind": "cfg", "base": "t2i", "alpha": 3.0}, "ray_actor_options": fast},
            {"name": "student", "field": {"kind": "diffusers", "path": str(student_dir)}, "device": "cpu", "dtype": "float32",
             "ray_actor_options": fast},
        ],
        "gateway": {"max_payload_mb": max_payload_mb, "request_timeout_s": 20, "num_cpus": 0.1,
                    **({"auth_token_env": TEST_TOKEN_ENV} if auth else {})},
    }


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from danceopd.student import StudentConfig, build_student

    student_dir = tmp_path_factory.mktemp("teacher-models") / "student"
    build_student(StudentConfig(num_layers=1, seed=11)).save_pretrained(student_dir)
    cfg = load_teachers_config(teachers_dict(student_dir))
    deploy_teachers(cfg, gateway_route_prefix="/open")
    auth_cfg = load_teachers_config(teachers_dict(student_dir, auth=True))
    deploy_teachers(auth_cfg, only=[], gateway_app_name="teacher-gateway-auth", gateway_route_prefix="/secure")
    local = {t.name: build_field(t, cfg) for t in cfg.teachers}
    return {"cfg": cfg, "local": local, "url": ray_cluster.http + "/open", "secure": ray_cluster.http + "/secure",
            "student_dir": student_dir, "metrics_port": ray_cluster.metrics_port}


def sample_inputs(name: str, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    bucket = {"t2i": "t2i", "t2i_cfg": "t2i", "student": "local_edit", "local_edit": "local_edit", "global_edit": "global_edit"}[name]
    from danceopd.suite import CapabilitySuite

    cond = CapabilitySuite("basic").bucket(bucket).sample(b, seed)
    return x, sigma, cond


@pytest.mark.parametrize("name", ["t2i", "local_edit", "global_edit", "t2i_cfg", "student"])
def test_handle_path_equals_in_process_field(served, name):
    client = TeacherClient(name)
    x, sigma, cond = sample_inputs(name, 6)
    got = client.velocity(x, sigma, cond)
    with torch.no_grad():
        want = served["local"][name].velocity(x, sigma, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert client.info.sample_shape == (3, 16, 16)


def test_batching_merges_concurrent_callers_and_splits_exactly(served):
    client = TeacherClient("t2i")
    inputs = [sample_inputs("t2i", 4, seed=s) for s in range(8)]

    async def all_at_once():
        return await asyncio.gather(*(client.velocity_async(*inp) for inp in inputs))

    outs = asyncio.run(all_at_once())
    for (x, sigma, cond), got in zip(inputs, outs):
        torch.testing.assert_close(got, served["local"]["t2i"].velocity(x, sigma, cond), rtol=1e-5, atol=1e-5)
    calls = TeacherClient("t2i")._call(lambda h: h.describe.remote(), 0)["recent_model_calls"]
    assert max(calls[-8:]) >= 16, calls  # 8 callers x 4 samples arrived within one 0.2 s window
    assert sum(calls[-8:]) >= 32


def test_a_query_larger_than_max_batch_size_is_answered_in_chunks(served):
    """A dense-K query on a real model can be many times what one model call fits: the replica answers it in
    consecutive calls of max_batch_size samples (4 on local_edit here), the rows in order, as if computed at once."""
    client = TeacherClient("local_edit")
    x, sigma, cond = sample_inputs("local_edit", 10, seed=3)
    got = client.velocity(x, sigma, cond)
    torch.testing.assert_close(got, served["local"]["local_edit"].velocity(x, sigma, cond), rtol=1e-5, atol=1e-5)
    assert client.describe()["recent_model_calls"][-3:] == [4, 4, 2]


def test_submit_sends_now_and_waits_later_and_a_simulated_device_teacher_sleeps_without_a_core(served):
    """TeacherClient.submit returns as soon as the query is sent; the result waits. A teacher with simulated_call_s
    (benchmarks: a teacher on its own device) answers the exact velocity no sooner than that, its replica idle."""
    from ray import serve

    cfg = load_teachers_config({"app_prefix": "slow-", "teachers": [
        {"name": "global_edit", "field": {"kind": "suite", "capability": "global_edit"}, "ray_actor_options": {"num_cpus": 0.1},
         "simulated_call_s": 0.8}]})
    deploy_teachers(cfg, gateway=False)
    slow = TeacherClient("global_edit", app_prefix="slow-")
    describe = lambda: slow._call(lambda h: h.describe.remote(), 0)  # noqa: E731
    x, sigma, cond = sample_inputs("global_edit", 4)
    cpu_before = describe()["cpu_s"]
    t0 = time.perf_counter()
    pending = slow.submit(x, sigma, cond)
    sent = time.perf_counter() - t0
    v = pending.result()
    waited = time.perf_counter() - t0
    cpu = describe()["cpu_s"] - cpu_before
    serve.delete("slow-global_edit")
    assert sent < 0.2 and waited >= 0.8, (sent, waited)
    assert cpu < 0.3, cpu  # the 0.8 s were a sleep, not a busy core
    torch.testing.assert_close(v, served["local"]["global_edit"].velocity(x, sigma, cond))
    assert pending.result() is v  # answered once, kept


def test_a_failing_teacher_opens_its_circuit_and_a_good_answer_closes_it(served):
    """A teacher slower than the caller's timeout: each attempt times out (and is cancelled); after 2 failed attempts
    the circuit opens, naming the teacher; calls then fail at once without being sent, for the pause; once the pause
    is over a call is let through, and its answer (a caller with time to wait) closes the circuit."""
    from ray import serve

    from danceopd.remote import CircuitBreaker, ServiceUnavailable

    cfg = load_teachers_config({"app_prefix": "sick-", "teachers": [
        {"name": "global_edit", "field": {"kind": "suite", "capability": "global_edit"}, "ray_actor_options": {"num_cpus": 0.1},
         "simulated_call_s": 1.0}]})
    deploy_teachers(cfg, gateway=False)
    events = []
    breaker = CircuitBreaker("teacher 'sick-global_edit'", threshold=2, cooldown_s=2.0, on_change=lambda *e: events.append(e))
    impatient = TeacherClient("global_edit", app_prefix="sick-", timeout_s=0.3, retries=1, backoff_s=0.05, breaker=breaker)
    x, sigma, cond = sample_inputs("global_edit", 2)
    with pytest.raises(ServiceUnavailable, match="failed after 2 attempts"):
        impatient.velocity(x, sigma, cond)
    assert breaker.is_open and len(events) == 1 and events[0][1] is True
    assert "teacher 'sick-global_edit' is failing: 2 failed attempts in a row (last: TimeoutError" in events[0][2]
    t0 = time.perf_counter()
    with pytest.raises(ServiceUnavailable, match="is failing .* not called for another"):
        impatient.velocity(x, sigma, cond)  # not sent: fails at once
    assert time.perf_counter() - t0 < 0.5
    time.sleep(breaker.wait_s())
    patient = TeacherClient("global_edit", app_prefix="sick-", timeout_s=10.0, retries=0, breaker=breaker)
    v = patient.velocity(x, sigma, cond)  # let through after the pause; it answers
    torch.testing.assert_close(v, served["local"]["global_edit"].velocity(x, sigma, cond))
    assert not breaker.is_open and events[-1] == ("teacher 'sick-global_edit'", False, "teacher 'sick-global_edit' answers again")
    serve.delete("sick-global_edit")


def test_rest_a_teacher_replica_that_dies_mid_request_is_a_503_with_the_json_body(served, ray_cluster):
    """The replica computing a REST query dies (killed here; out of memory or a node loss alike): the gateway answers
    503 naming the teacher, with the documented JSON error body (before: a bare 500), and a retry succeeds once Serve
    has replaced the replica."""
    import ray
    from ray import serve

    cfg = load_teachers_config({"app_prefix": "dying-", "gateway": {"request_timeout_s": 30, "num_cpus": 0.1}, "teachers": [
        {"name": "global_edit", "field": {"kind": "suite", "capability": "global_edit"}, "ray_actor_options": {"num_cpus": 0.1},
         "simulated_call_s": 3.0}]})
    deploy_teachers(cfg, gateway_app_name="dying-gateway", gateway_route_prefix="/dying")
    x, sigma, cond = sample_inputs("global_edit", 1)
    body = {"x": b64(x.numpy()), "sigma": float(sigma[0]), "prompt": cond.prompts[0], "source": b64(cond.source.numpy())}
    url = ray_cluster.http + "/dying/v1/fields/global_edit/velocity"
    replica = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::dying-global_edit#TeacherServer#"))
    killer = threading.Timer(1.0, lambda: ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True))
    killer.start()
    status, reply = post(url, body, timeout=60)
    killer.join()
    assert status == 503 and reply["error"]["field"] == "teacher", (status, reply)
    assert "'global_edit' is unavailable" in reply["error"]["message"]
    deadline = time.time() + 120
    while (answer := post(url, body, timeout=60))[0] != 200:  # Serve replaces the replica; then it answers again
        assert answer[0] == 503 and time.time() < deadline, answer
        time.sleep(1)
    serve.delete("dying-global_edit")
    serve.delete("dying-gateway")


def test_handle_path_rejects_bad_input_without_retrying(served):
    client = TeacherClient("t2i", retries=3, backoff_s=2.0)
    q = VelocityQuery(np.zeros((2, 3, 16, 16), np.float32), np.array([0.5, 1.5], np.float32), ["a red circle"] * 2)
    start = time.perf_counter()
    with pytest.raises(Exception, match="sigma"):
        client.query(q)
    assert time.perf_counter() - start < 2.0  # no backoff: bad input is not retried


def post(url: str, body: dict | bytes, token: str | None = None, timeout: float = 30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, token: str | None = None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, "<f4")
    return {"b64": base64.b64encode(a.tobytes()).decode(), "shape": list(a.shape)}


def npy_b64(a: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, a)
    return {"npy_b64": base64.b64encode(buf.getvalue()).decode()}


def decode(v: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(v["b64"]), "<f4").reshape(v["shape"])


def test_rest_lists_fields_health_and_docs(served, ray_cluster):
    status, body = get(served["url"] + "/v1/fields")
    assert status == 200
    fields = {f["name"]: f for f in body["fields"]}
    assert set(fields) == {"t2i", "local_edit", "global_edit", "t2i_cfg", "student"}
    assert fields["local_edit"]["takes_source"] and fields["local_edit"]["requires_source"]
    assert fields["t2i_cfg"]["guidance"] == 3.0 and fields["t2i"]["sample_shape"] == [3, 16, 16]
    assert get(served["url"] + "/healthz")[0] == 200
    with urllib.request.urlopen(served["url"] + "/openapi.json", timeout=30) as r:
        assert "/v1/fields/{name}/velocity" in json.loads(r.read())["paths"]


@pytest.mark.parametrize("encoding", [b64, npy_b64])
def test_rest_velocity_matches_in_process(served, encoding):
    x, sigma, cond = sample_inputs("local_edit", 3, seed=5)
    body = {"x": encoding(x.numpy()), "sigma": sigma.tolist(), "prompt": cond.prompts, "source": encoding(cond.source.numpy()),
            "return_x0_png": True}
    status, reply = post(served["url"] + "/v1/fields/local_edit/velocity", body)
    assert status == 200, reply
    want = served["local"]["local_edit"].velocity(x, sigma, cond).numpy()
    np.testing.assert_allclose(decode(reply["velocity"]), want, rtol=1e-5, atol=1e-5)
    png = Image.open(io.BytesIO(base64.b64decode(reply["x0_png_b64"])))
    assert png.size == (64, 64)


def _bad_cases():
    ok_x = np.zeros((2, 3, 16, 16), np.float32)
    nan_x = ok_x.copy()
    nan_x[0, 0, 0, 0] = np.nan
    return [
        ("t2i", {"x": b64(np.zeros((2, 3, 8, 8), np.float32)), "sigma": 0.5, "prompt": "a red circle"}, 422, "x"),
        ("t2i", {"x": {**b64(ok_x), "dtype": "float64"}, "sigma": 0.5}, 422, "x"),
        ("t2i", {"x": npy_b64(ok_x.astype(np.float64)), "sigma": 0.5}, 422, "x"),
        ("t2i", {"x": b64(nan_x), "sigma": 0.5}, 422, "x"),
        ("t2i", {"x": b64(ok_x), "sigma": 1.5}, 422, "sigma"),
        ("t2i", {"x": b64(ok_x), "sigma": [0.5, -0.1]}, 422, "sigma"),
        ("t2i", {"x": b64(ok_x), "sigma": 0.5, "prompt": ["a", "b", "c"]}, 422, "prompt"),
        ("t2i", {"x": {"b64": "!!notbase64!!", "shape": [1, 3, 16, 16]}, "sigma": 0.5}, 422, "x"),
        ("t2i", {"x": {"b64": b64(ok_x)["b64"], "shape": [1, 3, 16, 16]}, "sigma": 0.5}, 422, "x"),
        ("t2i", {"sigma": 0.5}, 422, "x"),
        ("local_edit", {"x": b64(ok_x), "sigma": 0.5, "prompt": "make the circle blue"}, 422, "source"),
        ("nope", {"x": b64(ok_x), "sigma": 0.5}, 404, "name"),
        # Each of these answered 500 (or was silently coerced) before the codec refused them by name.
        ("t2i", b'{"x": {"b64": "", "shape": [1e400]}, "sigma": 0.5}', 422, "x"),  # OverflowError
        ("t2i", {"x": {"b64": b64(ok_x[:1])["b64"], "shape": [1.9, 3, 16, 16]}, "sigma": 0.5}, 422, "x"),  # was read as 1
        ("t2i", {"x": {"npy_b64": ""}, "sigma": 0.5}, 422, "x"),  # EOFError
        ("t2i", {"x": {"npy_b64": _npy_claiming((10**6, 10**6))}, "sigma": 0.5}, 422, "x"),  # a 4 TB allocation
        ("t2i", {"x": {"npy_b64": _npy_claiming((2, 3, 16, 16))}, "sigma": 0.5}, 422, "x"),  # fits, but the bytes are not there
        ("t2i", {"x": b64(ok_x), "sigma": "0.5"}, 422, "sigma"),  # was coerced
        ("t2i", json.dumps({"x": b64(ok_x), "sigma": float("nan")}).encode(), 422, "sigma"),  # NaN, as Python writes it
        ("t2i", json.dumps({"x": b64(ok_x), "sigma": [0.5, float("inf")]}).encode(), 422, "sigma"),
        ("t2i", {"x": b64(ok_x), "sigma": 0.5, "prompt": "p" * 2**20}, 413, "body"),  # a 1 MB prompt over the 1 MiB limit
        ("t2i", {"x": b64(ok_x), "sigma": 0.5, "prompt": ["p"] * 10_000}, 422, "prompt"),
    ]


def _npy_claiming(shape) -> str:
    """An .npy header claiming `shape` followed by 16 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return base64.b64encode(buf.getvalue() + bytes(16)).decode()


@pytest.mark.parametrize("name,body,status,field", _bad_cases())
def test_rest_bad_input_is_a_4xx_naming_the_field(served, name, body, status, field):
    got, reply = post(served["url"] + f"/v1/fields/{name}/velocity", body)
    assert got == status, reply
    assert reply["error"]["field"] == field and reply["error"]["message"]


def test_rest_rejects_oversize_payload_and_bad_json(served):
    big = np.zeros((700, 3, 16, 16), np.float32)  # 2.1 MiB of float32, base64 ~2.9 MiB > 1 MiB limit
    status, reply = post(served["url"] + "/v1/fields/t2i/velocity", {"x": b64(big), "sigma": 0.5})
    assert status == 413 and reply["error"]["field"] == "body"
    status, reply = post(served["url"] + "/v1/fields/t2i/velocity", b"{not json")
    assert status == 422


def _raw_post(url: str, body, headers: dict, timeout: float = 30) -> tuple[int, dict, float]:
    """POST with exactly these headers (a false content-length, a chunked body): status, JSON reply, seconds."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.putrequest("POST", u.path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        try:
            for piece in body:
                conn.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered (and closed) before the rest was sent
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}, time.perf_counter() - start
    finally:
        conn.close()


def test_rest_enforces_the_size_limit_while_reading(served):
    url = served["url"] + "/v1/fields/t2i/velocity"
    # A claimed size that is never sent: refused at once (it used to wait for the bytes, forever).
    status, reply, took = _raw_post(url, [b"{}"], {"content-type": "application/json", "content-length": "999999999999"})
    assert status == 413 and reply["error"]["field"] == "body" and took < 10
    # A malformed length never reaches the gateway: Serve's HTTP proxy answers 400 itself (plain text).
    status, reply, _ = _raw_post(url, [b"{}"], {"content-type": "application/json", "content-length": "12abc"})
    assert status == 400

    # A chunked body has no length to check up front: 200 MB in 1 MiB chunks, cut off past the 1 MiB limit.
    def chunked(total_mb: int):
        piece = b"x" * 2**20
        for _ in range(total_mb):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    status, reply, took = _raw_post(url, chunked(200), {"content-type": "application/json", "transfer-encoding": "chunked"})
    assert status == 413 and reply["error"]["field"] == "body" and took < 30


def test_rest_fifty_concurrent_requests_all_answer(served):
    from concurrent.futures import ThreadPoolExecutor

    x = np.zeros((1, 3, 16, 16), np.float32)
    good = {"x": b64(x), "sigma": 0.5, "prompt": "a red circle"}
    bad = {"x": b64(x), "sigma": 2.0}
    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(lambda i: post(served["url"] + "/v1/fields/t2i/velocity", good if i % 2 else bad, timeout=60)[0],
                            range(50)))
    assert sorted(got) == [200] * 25 + [422] * 25


def test_rest_openapi_documents_the_velocity_body_and_every_status(served):
    with urllib.request.urlopen(served["url"] + "/openapi.json", timeout=30) as r:
        op = json.loads(r.read())["paths"]["/v1/fields/{name}/velocity"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert {"x", "sigma"} <= set(body["required"]) and "prompt" in body["properties"]
    assert {"200", "401", "404", "413", "422", "503", "504"} <= set(op["responses"])


def test_rest_fuzzing_finds_no_server_error_no_undocumented_status_and_no_hang(served):
    """schemathesis, from the gateway's own OpenAPI: valid and invalid cases for every operation."""
    from fuzz import fuzz_openapi

    timeout = served["cfg"].gateway.request_timeout_s
    out = fuzz_openapi(served["url"], examples=100, timeout_s=timeout)
    print(f"gateway fuzz: {out['cases']} cases, by status class {dict(sorted(out['by_class'].items()))}")
    assert out["cases"] >= 150 and out["by_class"]["4xx"] > 0 and out["by_class"]["2xx"] > 0
    assert out["server_errors"] == [] and out["undocumented"] == [] and out["slow"] == []


def test_rest_auth_on_and_off(served):
    x = np.zeros((1, 3, 16, 16), np.float32)
    body = {"x": b64(x), "sigma": 0.5, "prompt": "a red circle"}
    assert post(served["secure"] + "/v1/fields/t2i/velocity", body)[0] == 401
    assert post(served["secure"] + "/v1/fields/t2i/velocity", body, token="wrong")[0] == 401
    assert get(served["secure"] + "/v1/fields")[0] == 401
    assert post(served["secure"] + "/v1/fields/t2i/velocity", body, token=TEST_TOKEN)[0] == 200
    assert get(served["secure"] + "/healthz")[0] == 200  # liveness stays open
    assert post(served["url"] + "/v1/fields/t2i/velocity", body)[0] == 200  # the open gateway needs none


def _replicas(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["TeacherServer"]
    return dep.replica_states.get("RUNNING", 0)


def test_scaling_one_teacher_leaves_the_others_untouched(served):
    cfg = served["cfg"]
    names = ("t2i", "local_edit", "t2i_cfg", "student")
    before = {n: TeacherClient(n)._call(lambda h: h.describe.remote(), 0)["replica_id"] for n in names}
    data = cfg.model_dump(mode="json")
    data["teachers"][2]["num_replicas"] = 2  # global_edit: 1 -> 2
    scaled = load_teachers_config(data)
    deploy_teachers(scaled, only=["global_edit"], gateway=False)
    assert _replicas("teacher-global_edit") == 2
    after = {n: TeacherClient(n)._call(lambda h: h.describe.remote(), 0)["replica_id"] for n in names}
    assert after == before
    ids = {TeacherClient("global_edit", by_value=False)._call(lambda h: h.describe.remote(), 0)["replica_id"] for _ in range(30)}
    assert len(ids) == 2  # both replicas serve
    x, sigma, cond = sample_inputs("global_edit", 4)
    torch.testing.assert_close(TeacherClient("global_edit").velocity(x, sigma, cond), served["local"]["global_edit"].velocity(x, sigma, cond))
    deploy_teachers(cfg, only=["global_edit"], gateway=False)
    assert _replicas("teacher-global_edit") == 1


def test_metrics_are_exported_per_teacher(served):
    client = TeacherClient("local_edit")
    client.velocity(*sample_inputs("local_edit", 4))
    with pytest.raises(Exception):
        client.query(VelocityQuery(np.zeros((1, 3, 16, 16), np.float32), np.array([2.0], np.float32), ["x"]))
    url = f"http://127.0.0.1:{served['metrics_port']}/metrics"
    wanted = ["ray_danceopd_teacher_queries_total", "ray_danceopd_teacher_samples_total",
              "ray_danceopd_teacher_latency_seconds_bucket", "ray_danceopd_teacher_batch_samples_bucket",
              "ray_danceopd_teacher_errors_total"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        lines = [ln for ln in text.splitlines() if 'teacher="local_edit"' in ln]
        if all(any(ln.startswith(w) for ln in lines) for w in wanted):
            break
        time.sleep(2)
    lines = [ln for ln in text.splitlines() if 'teacher="local_edit"' in ln]
    missing = [w for w in wanted if not any(ln.startswith(w) for ln in lines)]
    assert not missing, missing
    assert any(ln.startswith("ray_danceopd_teacher_errors_total") and 'kind="bad_sigma"' in ln for ln in lines)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "danceopd_cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_query_cli_saves_velocity_and_preview(served, tmp_path):
    proc = run_cli("query", "t2i", "--prompt", "a red circle", "--sigma", "0.3", "--url", served["url"], "--out", str(tmp_path / "q"))
    assert proc.returncode == 0, proc.stderr
    v = np.load(tmp_path / "q" / "velocity.npy")
    assert v.shape == (1, 3, 16, 16) and np.isfinite(v).all()
    assert Image.open(tmp_path / "q" / "x0.png").size == (64, 64)
    src = world.render(world.Scene((world.SceneObject("green", "square", 8, 8, 4),)), 16)
    Image.fromarray(((src.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(tmp_path / "src.png")
    proc = run_cli("query", "local_edit", "--prompt", "make the square red", "--sigma", "0.0001", "--source", str(tmp_path / "src.png"),
                   "--url", served["url"], "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr
    x0 = np.asarray(Image.open(tmp_path / "e" / "x0.png").convert("RGB"))[::4, ::4] / 127.5 - 1  # x0_hat at sigma ~ 0: the edit
    assert np.abs(x0[8, 8] - np.array(world.PALETTE["red"]) * 2 + 1).max() < 0.05
    bad = run_cli("query", "t2i", "--sigma", "2", "--url", served["url"])
    assert bad.returncode == 2 and "--sigma" in bad.stderr
    unknown = run_cli("query", "nope", "--sigma", "0.5", "--url", served["url"])
    assert unknown.returncode == 2 and "unknown teacher" in unknown.stderr
    denied = run_cli("query", "t2i", "--sigma", "0.5", "--url", served["secure"], "--token", "wrong")
    assert denied.returncode == 2 and "401" in denied.stderr


def test_shipped_serve_config_is_generated_and_valid():
    from ray.serve.schema import ServeDeploySchema

    cfg = load_teachers_config(ROOT / "configs/teachers.yaml")
    shipped = (ROOT / "deploy/serve-teachers.yaml").read_text()
    assert shipped == render_serve_config(cfg, "configs/teachers.yaml"), "regenerate: danceopd serve-config configs/teachers.yaml > deploy/serve-teachers.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(shipped))
    assert [a.name for a in schema.applications] == [f"teacher-{t.name}" for t in cfg.teachers] + ["teacher-gateway", "router"]
    assert serve_config(cfg)["applications"][-2]["route_prefix"] == "/"
    # what `serve deploy` runs: the builders named by import_path, on the args in the file
    from ray.serve import Application

    from services.teachers.app import gateway_app, teacher_app

    from router.deployment import router_app

    for app in schema.applications:
        builder = {"gateway_app": gateway_app, "teacher_app": teacher_app, "router_app": router_app}[app.import_path.split(":")[1]]
        assert isinstance(builder(app.args), Application)
    assert teacher_app({"config": str(ROOT / "configs/teachers.yaml"), "teacher": "t2i_cfg"}) is not None


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["teachers"][0].update(replicas=2), "teachers.0.replicas"),
    (lambda d: d["teachers"][3]["field"].update(base="nope"), "field.base 'nope'"),
    (lambda d: d["teachers"][0].update(autoscaling_config={"max_replicas": 2}), "not both"),
    (lambda d: d["teachers"][0].update(device="cuda"), "ray_actor_options.num_gpus"),
    (lambda d: d["teachers"][0]["field"].update(capability="inpaint"), "capability"),
    (lambda d: d["teachers"][1].update(name="t2i"), "unique"),
    (lambda d: d["teachers"][0].update(field={"kind": "diffusers", "path": "/no/such/model"}), "/no/such/model"),
    (lambda d: d["teachers"][0].update(field={"kind": "cfg", "base": "t2i_cfg", "alpha": 2}), "cycle"),
])
def test_bad_teachers_config_names_the_key(mutate, needle):
    data = yaml.safe_load((ROOT / "configs/teachers.yaml").read_text())
    mutate(data)
    with pytest.raises(ConfigError) as e:
        load_teachers_config(data)
    assert needle in str(e.value)


def test_conditions_roundtrip_through_query():
    x, sigma, cond = sample_inputs("local_edit", 3)
    q = VelocityQuery.from_torch(x, sigma, cond)
    back = q.conditions()
    assert back.prompts == cond.prompts and torch.equal(back.source, cond.source)
    assert isinstance(q.x, np.ndarray) and q.x.dtype == np.float32
