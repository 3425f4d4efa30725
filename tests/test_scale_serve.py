"""The sharded index on Ray Serve, on a real local multi-node Ray cluster (127.0.0.1 only):
answers equal one PersonaIndex, shards land on the nodes their resources name, bad input gets
clear errors, and a killed shard replica gives retried answers or a clear 503, never a partial
top-k, and comes back. Plus the `persona4rec serve` command with an embedded local Ray."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from scale_helpers import catalog as _catalog  # noqa: E402
from scale_helpers import free_port as _free_port  # noqa: E402
from scale_helpers import loopback_ray  # noqa: E402
from scale_helpers import users as _users  # noqa: E402

from persona4rec import PersonaIndex, ShardedPersonaIndex, UnknownItemError  # noqa: E402
from persona4rec.scale.client import IndexClient, ShardUnavailableError  # noqa: E402

ray = loopback_ray()
pytestmark = pytest.mark.slow
NODE_RESOURCES = ["p4r-node-a", "p4r-node-b"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """3 shards on a 2-node local cluster (shards 0 and 2 on node a, shard 1 on node b)."""
    from ray.cluster_utils import Cluster
    from ray import serve

    from persona4rec.scale import serve as served_app

    ids, vecs, offsets, personas = _catalog()
    index_dir = tmp_path_factory.mktemp("sharded")
    ShardedPersonaIndex.build(ids, vecs, offsets, personas, n_shards=3, path=index_dir)
    single = PersonaIndex.build(ids, vecs, offsets, personas)
    store = 150 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {NODE_RESOURCES[0]: 1}, "object_store_memory": store,
        "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, resources={NODE_RESOURCES[1]: 1}, object_store_memory=store)
        cluster.wait_for_nodes()
        assert cluster.address.startswith("127.0.0.1:")
        ray.init(address=cluster.address, log_to_driver=False)
        url = served_app.start(index_dir, port=_free_port(), shard_resources=NODE_RESOURCES,
                               retry_deadline_s=30.0, health_check_period_s=1.0)
        with IndexClient(url, timeout=120) as client:
            yield client, single, cluster
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def test_shards_are_placed_on_the_nodes_their_resources_name(served):
    client, single, cluster = served
    health = client.health()
    assert health["status"] == "ok" and health["n_shards"] == 3
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    for info in health["shards"]:
        want = NODE_RESOURCES[info["shard"] % 2]
        assert want in nodes[info["node_id"]], (info, nodes[info["node_id"]])
    assert len({info["node_id"] for info in health["shards"]}) == 2
    assert sum(info["n_items"] for info in health["shards"]) == single.n_items


def test_served_answers_equal_one_index(served):
    client, single, _ = served
    q = _users(6)
    for k in (1, 10, 37):
        a = single.search(q, k, return_personas=True)
        b = client.search(q, k, return_personas=True)
        assert a[0].tolist() == b[0].tolist()
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2].tolist() == b[2].tolist()
    seen = [[f"item-{i}" for i in range(u, 200, 7)] + ["not-an-item"] for u in range(6)]
    a, b = single.search(q, 12, exclude=seen), client.search(q, 12, exclude=seen)
    assert a[0].tolist() == b[0].tolist()
    np.testing.assert_array_equal(a[1], b[1])
    a, b = single.search(q[0], 500, exclude=seen[0]), client.search(q[0], 500, exclude=seen[0])  # k > catalog
    assert a[0].tolist() == b[0].tolist()
    np.testing.assert_array_equal(a[1], b[1])
    allow = [f"item-{i}" for i in range(0, 400, 3)]
    a, b = single.search(q[1], 8, allow=allow), client.search(q[1], 8, allow=allow)
    assert a[0].tolist() == b[0].tolist()
    cand = [f"item-{i}" for i in range(50, 90)] + ["item-55"]
    base = np.linspace(0, 1, len(cand)).astype(np.float32)
    a, b = single.rerank(q[2], cand, base, alpha=0.4), client.rerank(q[2], cand, base, alpha=0.4)
    assert list(a.ids) == b.ids and a.persona_ids == b.persona_ids
    np.testing.assert_array_equal(a.scores, b.scores)
    a, b = single.explain(q[3], "item-17"), client.explain(q[3], "item-17")
    assert [(m.persona_id, m.score, m.name) for m in a] == [(m.persona_id, m.score, m.name) for m in b]


def test_bad_requests_get_clear_errors(served):
    client, _, _ = served
    with pytest.raises(ValueError, match="dimension 3 does not match the index dimension 16"):
        client.search(np.ones(3, np.float32))
    with pytest.raises(UnknownItemError, match="not in the index"):
        client.explain(_users(1)[0], "no-such-item")
    with pytest.raises(UnknownItemError, match="unknown='skip'"):
        client.rerank(_users(1)[0], ["item-1", "no-such-item"])
    with pytest.raises(UnknownItemError, match="allow ids"):
        client.search(_users(1)[0], 3, allow=["item-1", "no-such-item"])
    r = httpx.post(client.base_url + "/search", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = httpx.get(client.base_url + "/nothing-here", timeout=60)
    assert r.status_code == 404 and "/search" in r.json()["error"]


def test_killed_shard_replica_never_yields_a_partial_top_k(served):
    """kill -9 one shard's replica during traffic: each answer is complete and exact, or a 503
    that says so; the replica is restarted and answers again."""
    client, single, _ = served
    q = _users(8, seed=5)
    expected = [single.search(q[u], 10) for u in range(len(q))]
    victim = next(info for info in client.health()["shards"] if info["shard"] == 1)
    outcomes: list[tuple[str, str]] = []
    stop = threading.Event()
    traffic_client = IndexClient(client.base_url, timeout=120)

    def traffic():
        u = 0
        while not stop.is_set() and len(outcomes) < 2000:
            try:
                ids, scores = traffic_client.search(q[u % len(q)], 10)
                ok = ids.tolist() == expected[u % len(q)][0].tolist() and np.array_equal(scores, expected[u % len(q)][1])
                outcomes.append(("ok" if ok else "WRONG", ""))
            except ShardUnavailableError as e:
                outcomes.append(("unavailable", str(e)))
            u += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for o in outcomes if o[0] == "ok") < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = len(outcomes)
        # An impatient client (0.5 s) gets a clear 503 while the replica is down, not a partial answer.
        with IndexClient(client.base_url, timeout=60, deadline_s=0.5) as impatient:
            with pytest.raises(ShardUnavailableError, match=r"shard 1 did not answer within 0.5 s.*no partial"):
                impatient.search(q[0], 10)
        new_pid = None
        while time.monotonic() < deadline + 60:  # bounded wait for the controller to restart it
            time.sleep(0.5)
            try:
                info = next(i for i in client.health()["shards"] if i["shard"] == 1)
            except ShardUnavailableError:
                continue
            if info["pid"] != victim["pid"]:
                new_pid = info["pid"]
                break
        assert new_pid is not None, "the killed replica was not restarted"
        after = len(outcomes)
        while len(outcomes) < after + 5 and time.monotonic() < deadline + 90:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=180)
        traffic_client.close()
    assert not thread.is_alive()
    kinds = [o[0] for o in outcomes]
    print(f"after the kill: {len(outcomes) - killed_at} answers, " + ", ".join(
        f"{kind}: {kinds[killed_at:].count(kind)}" for kind in ("ok", "unavailable", "WRONG")))
    assert "WRONG" not in kinds, "a wrong or partial top-k was presented as complete"
    assert kinds[-5:] == ["ok"] * 5, outcomes[-5:]
    assert len(outcomes) > killed_at
    for kind, message in outcomes:
        if kind == "unavailable":
            assert "shard 1" in message and "no partial result" in message
