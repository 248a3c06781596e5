"""The router: determinism, idempotent retries, restarts (router and Redis), policy frequencies, adaptive
weights, bad input, and the Serve deployment with its REST endpoints. Against a real redis-server."""

import json
import math
import time
import urllib.error
import urllib.request
import uuid

import pytest

from router.config import RoutingConfig
from router.core import Router, RouterError, adaptive_weights
from router.store import MemoryStore, RedisStore

ROUTES = {"t2i": {"teacher": "t2i", "bucket": "t2i", "weight": 2.0},
          "local_edit": {"teacher": "local_edit", "bucket": "local_edit", "weight": 1.0},
          "global_edit": {"teacher": "global_edit", "bucket": "global_edit", "weight": 1.0}}


def cfg(**kw) -> dict:
    return {"routes": ROUTES, "seed": 7, "world_size": 2, "micro_batches": 2, "batch_size": 8, **kw}


def run_id() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


def grid(router, rid, steps, cfgd):
    return [router.assign(rid, s, r, m) for s in range(steps) for r in range(cfgd["world_size"]) for m in range(cfgd["micro_batches"])]


@pytest.mark.parametrize("policy", ["hard", "per_sample", "soft", "adaptive"])
def test_same_requests_same_assignments_across_router_restarts(redis_server, policy):
    rid, c = run_id(), cfg(policy=policy)
    first = Router(RedisStore(redis_server.url))
    first.register_run(rid, c)
    a = grid(first, rid, 20, c)
    del first  # "kill" the router: a new process sees only Redis
    second = Router(RedisStore(redis_server.url))
    assert grid(second, rid, 20, c) == a
    if policy != "adaptive":  # pure functions of the seed: even a fresh in-memory router agrees
        mem = Router(MemoryStore())
        mem.register_run(rid, c)
        assert grid(mem, rid, 20, c) == a


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_recent_assignments_means_the_last_n_and_zero_means_none(redis_server, backend):
    router = Router(RedisStore(redis_server.url) if backend == "redis" else MemoryStore())
    rid = run_id()
    router.register_run(rid, cfg(policy="hard"))
    a = grid(router, rid, 3, cfg())
    assert router.summary(rid, recent=0)["recent"] == []  # [-0:] and lrange(-0, -1) were the whole log
    assert router.summary(rid, recent=2)["recent"] == a[-2:]


def test_hard_policy_matches_the_reference_trainer_routing():
    from danceopd.routing import HardRouter

    c = cfg(policy="hard")
    r = Router()
    r.register_run("x", c)
    ref = HardRouter({n: v["weight"] for n, v in ROUTES.items()}, seed=7)
    for step in range(50):
        routes = {r.assign("x", step, rank, micro)["route"] for rank in range(2) for micro in range(2)}
        assert routes == {ref.route(step)}  # one route per update, for every rank and micro-batch


def test_retries_are_idempotent_even_after_adaptive_weights_move(redis_server):
    rid, c = run_id(), cfg(policy="adaptive")
    router = Router(RedisStore(redis_server.url))
    router.register_run(rid, c)
    before = [router.assign(rid, s) for s in range(10)]
    for i in range(20):  # t2i's loss stays high, the others fall: the weights move
        router.report_loss(rid, i, "t2i", 1.0)
        router.report_loss(rid, i, "local_edit", 1.0 / (i + 1))
        router.report_loss(rid, i, "global_edit", 1.0 / (i + 1))
    assert router.weights(rid) != before[0]["weights"]
    assert [router.assign(rid, s) for s in range(10)] == before  # a retried step gets what it got before
    counts = router.store.route_counts(rid)
    assert sum(counts.values()) == 10 * c["batch_size"]  # retries are not counted twice


def test_redis_restart_with_aof_keeps_the_run(redis_server, tmp_path):
    from conftest import RedisProcess, free_port

    server = RedisProcess(tmp_path, free_port()).start()
    try:
        rid, c = run_id(), cfg(policy="adaptive")
        router = Router(RedisStore(server.url))
        router.register_run(rid, c)
        for i in range(5):
            router.report_loss(rid, i, "t2i", 2.0)
        a = [router.assign(rid, s, 1, 1) for s in range(15)]
        summary = router.summary(rid)
        server.kill()  # SIGKILL: no clean shutdown; the append-only file is all that survives
        server.start()
        again = Router(RedisStore(server.url))
        assert [again.assign(rid, s, 1, 1) for s in range(15)] == a
        after = again.summary(rid)
        assert after["counts"] == summary["counts"] and after["losses"] == summary["losses"]
        assert again.assign(rid, 15, 1, 1)["step"] == 15  # and it goes on
    finally:
        server.stop()


def _freq_ok(observed: int, n: int, p: float) -> bool:
    return abs(observed - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def test_every_policy_follows_its_weights():
    r = Router()
    probs = {"t2i": 0.5, "local_edit": 0.25, "global_edit": 0.25}
    # hard (and adaptive with no loss reports): one route per step, by weight
    for policy in ("hard", "adaptive"):
        r.register_run(policy, cfg(policy=policy, world_size=1, micro_batches=1))
        steps = [r.assign(policy, s)["route"] for s in range(3000)]
        for name, p in probs.items():
            assert _freq_ok(steps.count(name), 3000, p), (policy, name, steps.count(name))
    # per_sample: each sample has exactly one route; a batch mixes routes
    r.register_run("ps", cfg(policy="per_sample", world_size=1, micro_batches=1, batch_size=16))
    samples = [x for s in range(400) for x in r.assign("ps", s)["sample_routes"]]
    for name, p in probs.items():
        assert _freq_ok(samples.count(name), len(samples), p)
    assert any(len(set(r.assign("ps", s)["sample_routes"])) > 1 for s in range(5))
    # groups (the toolkit's accumulation groups): every rank runs each listed route for micro_batches micro-batches
    r.register_run("g", cfg(policy="groups", groups=["t2i", "local_edit", "global_edit"]))
    for s in range(20):
        for rank in range(2):
            got = [r.assign("g", s, rank, micro)["route"] for micro in range(6)]
            assert got == ["t2i", "t2i", "local_edit", "local_edit", "global_edit", "global_edit"]
    with pytest.raises(RouterError, match=r"must be in \[0, 6\)"):
        r.assign("g", 0, 0, 6)
    assert len(r.assign_steps("g", 0, 1, 1)[0]) == 6
    # soft: every field, with the normalised weights, on a bucket drawn by weight
    r.register_run("soft", cfg(policy="soft"))
    a = r.assign("soft", 3)
    assert a["soft_weights"] == pytest.approx(probs) and set(a["teachers"]) == set(ROUTES)


def test_adaptive_weights_follow_loss_and_respect_the_floor():
    c = RoutingConfig.model_validate(cfg(policy="adaptive", adaptive={"temperature": 0.25, "floor": 0.05, "ema": 0.5}))
    r = Router()
    r.register_run("ad", c)
    prior = r.weights("ad")
    assert prior == pytest.approx({"t2i": 0.5, "local_edit": 0.25, "global_edit": 0.25}, abs=1e-9)
    step = 0
    for _ in range(3):  # every route starts at its own scale
        for route in ROUTES:
            r.report_loss("ad", step, route, 1.0)
        step += 1
    for _ in range(20):  # local_edit's loss held at its starting level; the others learn
        r.report_loss("ad", step, "local_edit", 1.0)
        r.report_loss("ad", step, "t2i", 0.05)
        r.report_loss("ad", step, "global_edit", 0.05)
        step += 1
    held = r.weights("ad")
    assert held["local_edit"] > 0.6 > prior["local_edit"]
    assert min(held.values()) >= 0.05 - 1e-12  # nothing starves below the floor
    routes = [r.assign("ad", s)["route"] for s in range(200)]
    assert routes.count("local_edit") > 100  # the assignments follow the weights
    for _ in range(20):  # now local_edit learns too
        r.report_loss("ad", step, "local_edit", 0.05)
        step += 1
    back = r.weights("ad")
    assert back["local_edit"] < 0.35 and back["t2i"] > back["local_edit"]
    extreme = adaptive_weights(c, {"t2i": {"count": 9, "ema": 100.0, "scale": 1.0}})
    assert min(extreme.values()) >= 0.05 - 1e-12 and extreme["t2i"] <= 0.9 + 1e-12


@pytest.mark.parametrize("call,field", [
    (lambda r: r.assign("nope", 0), "run"),
    (lambda r: r.assign("bad", -1), "step"),
    (lambda r: r.assign("bad", 0, rank=2), "rank"),
    (lambda r: r.assign("bad", 0, micro=5), "micro"),
    (lambda r: r.report_loss("bad", 0, "inpaint", 1.0), "route"),
    (lambda r: r.report_loss("bad", 0, "t2i", float("nan")), "loss"),
    (lambda r: r.register_run("bad", cfg(seed=99)), "config"),
    (lambda r: r.assign_steps("bad", 0, 0, 1), "count"),
    (lambda r: r.assign_steps("bad", -2, 4, 1), "step"),
    (lambda r: r.report_losses("bad", [(0, "t2i")]), "reports"),
    (lambda r: r.report_losses("bad", [(0, "t2i", -1.0)]), "loss"),
])
def test_bad_requests_name_the_field(call, field):
    r = Router()
    r.register_run("bad", cfg())
    with pytest.raises(RouterError) as e:
        call(r)
    assert e.value.field == field and e.value.message


@pytest.mark.parametrize("policy", ["hard", "per_sample", "groups"])
def test_a_block_of_steps_is_what_one_step_at_a_time_gives(policy):
    """What trainers ask ahead (assign_steps) is logged and answered exactly as step-by-step requests are."""
    extra = {"groups": ["t2i", "local_edit"]} if policy == "groups" else {}
    one, block = Router(), Router()
    for r in (one, block):
        r.register_run("x", cfg(policy=policy, **extra))
    want = [[one.assign("x", s, 1, m) for m in range(4 if policy == "groups" else 2)] for s in range(3, 13)]
    assert block.assign_steps("x", 3, 10, 1) == want
    assert block.store.route_counts("x") == one.store.route_counts("x")
    assert block.assign_steps("x", 5, 2, 1) == want[2:4]  # asked again (a retry, a resume): the logged answers


def test_adaptive_routing_is_asked_one_step_at_a_time_and_batched_reports_equal_single_ones():
    a, b = Router(), Router()
    for r in (a, b):
        r.register_run("ad", cfg(policy="adaptive"))
    with pytest.raises(RouterError) as e:
        a.assign_steps("ad", 0, 2, 0)
    assert e.value.field == "count" and "one step at a time" in e.value.message
    assert a.assign_steps("ad", 0, 1, 0) == [[b.assign("ad", 0, 0, m) for m in range(2)]]
    reports = [(s, ["t2i", "local_edit"][s % 2], 1.0 / (s + 1)) for s in range(12)]
    a.report_losses("ad", reports)
    for rep in reports:
        b.report_loss("ad", *rep)
    assert a.store.get_loss_stats("ad") == b.store.get_loss_stats("ad")
    assert a.weights("ad") == b.weights("ad")


@pytest.mark.parametrize("bad,needle", [
    ({"groups": ["t2i", "inpaint", "t2i", "t2i"], "policy": "groups"}, "unknown routes ['inpaint']"),
    ({"policy": "groups"}, "needs groups"),
    ({"policy": "adaptive", "adaptive": {"floor": 0.4}}, "lower the floor"),
    ({"policy": "sticky"}, "policy"),
    ({"routes": {}}, "routes is empty"),
])
def test_bad_routing_config_is_refused(bad, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        RoutingConfig.model_validate(cfg(**bad))
    assert needle in str(e.value)


def test_router_on_serve_with_redis_and_rest(ray_cluster, redis_server):
    from ray import serve

    from router.client import RouterClient
    from router.deployment import router_app

    serve.run(router_app({"redis_url": redis_server.url}), name="router", route_prefix="/router")
    client = RouterClient()
    rid = run_id()
    client.register_run(rid, cfg(policy="hard"))
    direct = Router(RedisStore(redis_server.url))
    a = [client.assign(rid, s, 1, 0) for s in range(6)]
    assert a == [direct.assign(rid, s, 1, 0) for s in range(6)]  # the service and the library agree
    assert [s[0] for s in client.send("assign_steps", rid, 0, 6, 1).result()] == a  # a block: the same answers
    client.report_loss(rid, 4, a[4]["route"], 0.7)
    client.send("report_losses", rid, [(5, a[5]["route"], 0.5)]).result()
    with pytest.raises(Exception, match="rank"):
        client.assign(rid, 0, 7, 0)
    with urllib.request.urlopen(ray_cluster.http + "/router/v1/runs", timeout=30) as resp:
        runs = json.loads(resp.read())
    assert rid in [x["run"] for x in runs["runs"]] and runs["backend"] == "redis"
    with urllib.request.urlopen(ray_cluster.http + f"/router/v1/runs/{rid}/routing?recent=3", timeout=30) as resp:
        routing = json.loads(resp.read())
    assert sum(routing["counts"].values()) == 6 * 2 * 8 and len(routing["recent"]) == 3  # the block logged both micro-batches
    assert routing["losses"][a[5]["route"]]["last"] == 0.5
    with urllib.request.urlopen(ray_cluster.http + f"/router/v1/runs/{rid}/routing?recent=0", timeout=30) as resp:
        assert json.loads(resp.read())["recent"] == []  # was the whole log
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(ray_cluster.http + "/router/v1/runs/nope/routing", timeout=30)
    assert e.value.code == 404 and json.loads(e.value.read())["error"]["field"] == "run"

    # Kill the router replica mid-run: Serve starts a new one, the client retries, nothing changes.
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "RouterServer" in a["name"]]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    patient = RouterClient(retries=8, backoff_s=0.5)
    assert [patient.assign(rid, s, 1, 0) for s in range(8)] == a + [direct.assign(rid, s, 1, 0) for s in (6, 7)]
    new_names = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True) if "RouterServer" in x["name"]]
    assert new_names and new_names != names

    # Metrics: assignments per route, weights and reported losses, labelled by run and route.
    wanted = ["ray_danceopd_router_assignments_total", "ray_danceopd_router_route_weight", "ray_danceopd_router_reported_loss"]
    deadline, lines = time.time() + 60, []
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10) as resp:
            lines = [ln for ln in resp.read().decode().splitlines() if f'run="{rid}"' in ln]
        if all(any(ln.startswith(w) for ln in lines) for w in wanted):
            break
        time.sleep(2)
    assert all(any(ln.startswith(w) for ln in lines) for w in wanted), lines[:5]
    serve.delete("router")


def test_a_restarted_in_memory_router_gets_the_run_registered_again(ray_cluster, monkeypatch):
    """A router with `store: memory` (the default before the Ray key-value store): a new replica has forgotten every
    run. Before, every worker then met "unknown run" (a 404, never retried) and the run was lost; a client that knows
    its run re-registers it, and hard routes, a pure function of the seed and step, come back unchanged."""
    import ray
    from ray import serve

    from router.client import RouterClient
    from router.deployment import router_app

    monkeypatch.delenv("DANCEOPD_REDIS_URL", raising=False)
    serve.run(router_app({"store": "memory"}), name="router-mem", route_prefix="/router-mem")
    rid, c = run_id(), cfg(policy="hard")
    client = RouterClient("router-mem", retries=8, backoff_s=0.5, run=(rid, c))
    client.register_run(rid, c)
    before = [client.assign(rid, s, 1, 0) for s in range(4)]
    assert client.send("summary", rid, 10).result()["recent"]  # the log is in the replica's memory

    names = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True) if "router-mem" in x["name"] and "RouterServer" in x["name"]]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

    forgetful = RouterClient("router-mem", retries=8, backoff_s=0.5)  # knows no run: the 404 is final
    with pytest.raises(Exception, match="unknown run"):
        forgetful.assign(rid, 4, 1, 0)
    assert [client.assign(rid, s, 1, 0) for s in range(6)] == before + [grid_at(rid, c, s) for s in (4, 5)]
    assert forgetful.assign(rid, 6, 1, 0)["route"] in ROUTES  # registered again, for every client
    serve.delete("router-mem")


def test_the_default_router_store_survives_a_router_restart(ray_cluster, monkeypatch):
    """Without Redis the router keeps its runs in the cluster's key-value store (no setup): a killed replica's
    successor answers every run as before, with nothing re-registered: the registration, the assignment log (the
    answers of adaptive steps, whose weights depend on the reports), the loss statistics and the frozen weights."""
    import ray
    from ray import serve

    from router.client import RouterClient
    from router.deployment import router_app

    monkeypatch.delenv("DANCEOPD_REDIS_URL", raising=False)
    serve.run(router_app({}), name="router-kv", route_prefix="/router-kv")
    rid, c = run_id(), cfg(policy="adaptive")
    client = RouterClient("router-kv", retries=8, backoff_s=0.5)  # knows no run: only the store can keep it
    client.register_run(rid, c)
    before = []
    for s in range(8):
        a = client.assign(rid, s, 0, 0)
        client.report_loss(rid, s, a["route"], 1.0 / (1 + s) if a["route"] == "t2i" else 1.0)
        before.append(a)
    summary = client.summary(rid, recent=100)
    assert client.send("store").result() == {"kind": "ray"}

    names = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True) if "router-kv" in x["name"] and "RouterServer" in x["name"]]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    assert [client.assign(rid, s, 0, 0) for s in range(8)] == before  # answered from the log, not recomputed
    assert client.summary(rid, recent=100) == summary  # counts, weights, loss statistics, log: all kept
    nxt = client.assign(rid, 8, 0, 0)
    direct = Router(MemoryStore())  # what a router that never restarted answers for step 8
    direct.register_run(rid, c)
    for s, a in enumerate(before):
        assert direct.assign(rid, s, 0, 0) == a
        direct.report_loss(rid, s, a["route"], 1.0 / (1 + s) if a["route"] == "t2i" else 1.0)
    assert nxt == direct.assign(rid, 8, 0, 0)
    serve.delete("router-kv")


def grid_at(rid: str, c: dict, step: int) -> dict:
    """What a fresh in-memory router answers for (step, rank 1, micro 0) of this run."""
    r = Router(MemoryStore())
    r.register_run(rid, c)
    return r.assign(rid, step, 1, 0)


def test_the_router_api_requires_a_token_beyond_loopback(ray_cluster, tmp_path):
    """Listening beyond loopback (auth: auto), the REST API answers 401 with the JSON error body without the bearer
    token from its token file, and the data with it; a router with no token to require refuses to start."""
    from ray import serve

    from danceopd.auth import AuthOptions, resolve_token
    from router.deployment import router_app

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    serve.run(router_app({"auth_token_file": str(token_file), "listen_host": "0.0.0.0"}), name="router-auth",
              route_prefix="/router-auth")
    url = ray_cluster.http + "/router-auth/v1/runs"
    for header in (None, "Bearer wrong", "s3cret-token"):
        req = urllib.request.Request(url, headers={"Authorization": header} if header else {})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 401 and json.loads(e.value.read())["error"]["field"] == "authorization"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer s3cret-token"}), timeout=30) as resp:
        assert json.loads(resp.read())["backend"] == "ray"  # the default store
    serve.delete("router-auth")
    with pytest.raises(ValueError, match=r"requires a bearer token \(it listens on 0.0.0.0\) but \$DANCEOPD_API_TOKEN is unset"):
        resolve_token(AuthOptions(), "0.0.0.0", "router API", "router")


def test_router_rest_fuzzing_finds_no_server_error_no_undocumented_status_and_no_hang(ray_cluster):
    """schemathesis against the router's OpenAPI (one run registered, so that some cases find it)."""
    from ray import serve

    from fuzz import fuzz_openapi
    from router.client import RouterClient
    from router.deployment import router_app

    serve.run(router_app({}), name="router-fuzz", route_prefix="/router-fuzz")
    RouterClient("router-fuzz").register_run("fuzz", cfg(policy="hard"))
    out = fuzz_openapi(ray_cluster.http + "/router-fuzz", examples=100, timeout_s=10.0)
    serve.delete("router-fuzz")
    print(f"router fuzz: {out['cases']} cases, by status class {dict(sorted(out['by_class'].items()))}")
    assert out["cases"] >= 150 and out["by_class"]["2xx"] > 0
    assert out["server_errors"] == [] and out["undocumented"] == [] and out["slow"] == []


@pytest.mark.parametrize("opts, host, env, want", [
    ({}, None, {}, None), ({}, "127.0.0.1", {}, None), ({}, "::1", {}, None), ({}, "localhost", {}, None),  # loopback: open
    ({}, "0.0.0.0", {"DANCEOPD_API_TOKEN": "t1"}, "t1"),  # beyond loopback: the default variable
    ({"auth_token_env": "MY_TOKEN"}, "127.0.0.1", {"MY_TOKEN": "t2"}, "t2"),  # a configured source turns auth on anywhere
    ({"auth": "off"}, "0.0.0.0", {}, None),  # a trusted network, said explicitly
    ({"auth": "on"}, "127.0.0.1", {}, ValueError), ({}, "10.0.0.5", {}, ValueError), ({}, "head.example", {}, ValueError),
])
def test_auth_is_on_beyond_loopback_unless_turned_off(opts, host, env, want, monkeypatch):
    from danceopd.auth import AuthOptions, authorized, resolve_token

    monkeypatch.delenv("DANCEOPD_API_TOKEN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if want is ValueError:
        with pytest.raises(ValueError, match="auth"):
            resolve_token(AuthOptions(**opts), host, "REST gateway", "gateway")
        return
    token = resolve_token(AuthOptions(**opts), host, "REST gateway", "gateway")
    assert token == want
    assert authorized(token, f"Bearer {want}") and authorized(token, None) == (want is None)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_finished_run_expires_from_the_store_and_a_resumed_one_is_kept(redis_server, backend):
    """Runs leave 'running': finish_run marks them and sets TTLs on every key of the run (Redis), so the store does not
    grow forever; the listing drops them once expired; re-registering (a resume) makes the run 'running' and durable."""
    import redis as redis_lib

    store = RedisStore(redis_server.url, prefix=f"ttl-{uuid.uuid4().hex[:6]}") if backend == "redis" else MemoryStore()
    router = Router(store)
    rid, other = run_id(), run_id()
    for r in (rid, other):
        router.register_run(r, cfg(policy="adaptive"))
        router.assign(r, 0, 0, 0)
        router.report_loss(r, 0, router.assign(r, 0, 0, 0)["route"], 0.5)
    with pytest.raises(RouterError) as e:
        router.finish_run(rid, "done", 60)
    assert e.value.field == "status"
    assert router.finish_run(rid, "finished", 60)["status"] == "finished"
    assert {x: store.get_run(x)["status"] for x in (rid, other)} == {rid: "finished", other: "running"}
    if backend == "redis":
        r = redis_lib.Redis.from_url(redis_server.url)
        ttls = {what: r.ttl(store._k(rid, what)) for what in store.RUN_KEYS}
        assert all(0 < t <= 60 for t in ttls.values()), ttls  # every key of the run expires
        assert r.ttl(store._k(other, "assign")) == -1  # a running run's keys never do
        router.register_run(rid, cfg(policy="adaptive"))  # resumed
        assert store.get_run(rid)["status"] == "running" and "expires" not in store.get_run(rid)
        assert r.ttl(store._k(rid, "assign")) == -1
    router.finish_run(other, "failed", 1e-3)
    time.sleep(0.01)
    assert other not in store.list_runs() and rid in store.list_runs()  # the expired one is gone from the listing


def test_a_stalled_redis_does_not_block_the_router_replica(ray_cluster, redis_server):
    """Redis stops answering (SIGSTOP) while a trainer's call waits on it: the replica still answers other calls at
    once (before, its async handlers called Redis on the event loop, so every caller waited); when Redis comes back
    the waiting call completes."""
    import os
    import signal

    from ray import serve

    from router.client import RouterClient
    from router.deployment import router_app

    serve.run(router_app({"redis_url": redis_server.url}), name="router-stall", route_prefix="/router-stall")
    client = RouterClient("router-stall", timeout_s=60, retries=0)
    rid = run_id()
    client.register_run(rid, cfg(policy="hard"))
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        stalled = client.send("assign", rid, 0, 0, 0)  # waits on Redis
        time.sleep(0.5)
        t0 = time.perf_counter()
        assert client.send("store").result() == {"kind": "redis", "url": f"redis://127.0.0.1:{redis_server.port}/0"}
        answered_in = time.perf_counter() - t0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert answered_in < 1.0, answered_in
    assert stalled.result()["step"] == 0  # Redis is back: the waiting call went through (redis-py retried it)
    serve.delete("router-stall")
