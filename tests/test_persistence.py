"""Reliability of saved indexes: crash safety, integrity, crafted files, races, bad input.

Each test injects the fault it names (a kill -9 during a save, a concurrent save under a
reader, a flipped bit, a crafted graph, a crafted header, a thread switch every
microsecond) and checks the documented guarantee: a saved index is the old or the new
version, never a mix; every malformed file is an IndexFormatError; queries never see a
half-published update.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from persona4rec import IndexFormatError, PersonaIndex, UnknownItemError
from persona4rec._core import MaxSimIndex, checksum64, checksum64_v1

FIXTURES = Path(__file__).parent / "index_fixtures"


def unit_rows(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def small_index(n_items=30, d=16, seed=0, ids="str", ann=False, max_p=4):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_p + 1, size=n_items)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    vectors = unit_rows(rng, int(offsets[-1]), d)
    item_ids = [f"it{i:04d}" for i in range(n_items)] if ids == "str" else list(range(100, 100 + n_items))
    personas = [{"name": f"persona {r}", "description": f"d{r}"} for r in range(int(offsets[-1]))]
    index = PersonaIndex.build(item_ids, vectors, offsets, personas=personas)
    if ann:
        index.build_ann(M=4, ef_construction=20, ef=16)
    return index, item_ids, vectors, offsets


# ------------------------------------------------------------- crafting files
def read_layout(path: Path) -> tuple[bytearray, dict, int]:
    data = bytearray(path.read_bytes())
    json_off, json_len = struct.unpack_from("<QQ", data, 16)
    meta = json.loads(bytes(data[json_off:json_off + json_len]))
    return data, meta, json_off


def rewrite(path: Path, data: bytearray, meta: dict, *, recompute: bool = True) -> None:
    """Write ``data`` with ``meta`` as its JSON header and, when asked, every checksum
    recomputed: what an attacker or a buggy tool would produce, passing every checksum."""
    json_off, json_len = struct.unpack_from("<QQ", data, 16)
    first = json.loads(bytes(data[json_off:json_off + json_len]))["sections"][0]["offset"]  # the original layout
    entries = meta.get("sections") if isinstance(meta.get("sections"), list) else []
    if recompute:
        for i, e in enumerate(entries):
            nxt = entries[i + 1] if i + 1 < len(entries) else None
            end = nxt.get("offset") if isinstance(nxt, dict) else len(data)
            if (isinstance(e, dict) and "checksum" in e and isinstance(e.get("offset"), int)
                    and isinstance(end, int) and 0 <= e["offset"] <= end <= len(data)):
                e["checksum"] = checksum64(bytes(data[e["offset"]:end]))
    js = json.dumps(meta, sort_keys=True).encode()
    budget = first - json_off
    assert len(js) <= budget, "crafted header outgrew the JSON budget"
    data[json_off:first] = js + b"\0" * (budget - len(js))
    struct.pack_into("<Q", data, 24, len(js))
    if recompute:
        struct.pack_into("<Q", data, 40, checksum64(bytes(data[json_off:first])))
        struct.pack_into("<Q", data, 56, checksum64(bytes(data[:56])))
    path.write_bytes(bytes(data))


def section(meta: dict, name: str) -> dict:
    return next(e for e in meta["sections"] if e["name"] == name)


def fingerprint(index: PersonaIndex, users: np.ndarray, approx: bool = False) -> tuple:
    ids, scores = index.search_approx(users, k=5) if approx else index.search(users, k=5)
    return tuple(map(tuple, ids.tolist())), scores.tobytes()


# -------------------------------------------------------------- format 1 files
def test_format_1_file_and_its_graph_still_load():
    inputs = np.load(FIXTURES / "v1_small_inputs.npz")
    old = PersonaIndex.load(FIXTURES / "v1_small.p4r")
    fresh = PersonaIndex.build(list(inputs["ids"]), inputs["vectors"], inputs["offsets"])
    users = inputs["vectors"][:6]
    assert fingerprint(old, users) == fingerprint(fresh, users)
    approx_ids, approx_scores = old.search_approx(users, k=5)
    for u in range(len(users)):  # the format-1 graph went through the same validation and works
        assert approx_ids[u][0] == old.search(users[u], k=1)[0][0]
    assert old._snap.ann is not None


def test_saving_a_format_1_index_writes_one_format_2_file(tmp_path):
    for name in ("v1_small.p4r", "v1_small.p4r.hnsw"):
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    index = PersonaIndex.load(tmp_path / "v1_small.p4r")
    index.save(tmp_path / "v1_small.p4r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1_small.p4r"]
    assert struct.unpack_from("<I", (tmp_path / "v1_small.p4r").read_bytes(), 8)[0] == 2
    users = np.load(FIXTURES / "v1_small_inputs.npz")["vectors"][:4]
    again = PersonaIndex.load(tmp_path / "v1_small.p4r")
    assert fingerprint(again, users, approx=True) == fingerprint(index, users, approx=True)


def test_format_1_graph_file_faults_are_named(tmp_path):
    for name in ("v1_small.p4r", "v1_small.p4r.hnsw"):
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    graph = tmp_path / "v1_small.p4r.hnsw"
    data = graph.read_bytes()
    graph.write_bytes(data[:-10])
    with pytest.raises(IndexFormatError, match="truncated"):
        PersonaIndex.load(tmp_path / "v1_small.p4r")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 4
    graph.write_bytes(bytes(flipped))
    with pytest.raises(IndexFormatError, match="corrupted"):
        PersonaIndex.load(tmp_path / "v1_small.p4r")
    graph.unlink()
    with pytest.raises(IndexFormatError, match="missing"):
        PersonaIndex.load(tmp_path / "v1_small.p4r")


# -------------------------------------------------------------------- D2
def test_checksum_has_no_top_bit_blind_spot():
    rng = np.random.default_rng(1)
    buf = bytearray(rng.bytes(4096))
    base_v1, base = checksum64_v1(bytes(buf)), checksum64(bytes(buf))
    missed_v1 = missed = 0
    for off in range(0, 4096 - 64, 8):
        x = bytearray(buf)
        x[off + 7] ^= 0x80
        x[off + 64 + 7] ^= 0x80
        missed_v1 += checksum64_v1(bytes(x)) == base_v1
        missed += checksum64(bytes(x)) == base
    assert missed_v1 == 504  # the format-1 blind spot, kept only to read old files
    assert missed == 0


def test_checksum_catches_every_two_bit_flip_in_one_lane():
    buf = bytearray(np.random.default_rng(2).bytes(512))
    base = checksum64(bytes(buf))
    missed = 0
    for w1 in (0, 5):
        for w2 in (w1 + 8, w1 + 16, w1 + 24):  # words that share a lane
            for b1 in range(64):
                for b2 in range(64):
                    x = bytearray(buf)
                    x[w1 * 8 + b1 // 8] ^= 1 << (b1 % 8)
                    x[w2 * 8 + b2 // 8] ^= 1 << (b2 % 8)
                    missed += checksum64(bytes(x)) == base
    assert missed == 0


def test_two_flips_in_the_codes_are_caught_on_load(tmp_path):
    index, *_ = small_index(n_items=40, d=64)
    path = tmp_path / "i.p4r"
    index.save(path)
    data, meta, _ = read_layout(path)
    codes = section(meta, "codes")
    data[codes["offset"] + 7] ^= 0x80
    data[codes["offset"] + 64 + 7] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="'codes'.*corrupted"):
        PersonaIndex.load(path)


def test_2000_random_bit_flips_are_detected(tmp_path):
    index, *_ = small_index(n_items=8, d=8, ann=True)
    path = tmp_path / "i.p4r"
    index.save(path)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    bad = tmp_path / "flip.p4r"
    for pos, bit in zip(rng.integers(0, len(data), size=2000), rng.integers(0, 8, size=2000)):
        flipped = bytearray(data)
        flipped[int(pos)] ^= 1 << int(bit)
        bad.write_bytes(bytes(flipped))
        with pytest.raises(IndexFormatError):
            PersonaIndex.load(bad, mmap=bool(pos % 2))


def test_every_truncation_of_an_index_with_a_graph_is_refused(tmp_path):
    index, *_ = small_index(n_items=5, d=4, ann=True, max_p=2)
    path = tmp_path / "i.p4r"
    index.save(path)
    data = path.read_bytes()
    bad = tmp_path / "cut.p4r"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        with pytest.raises(IndexFormatError, match="truncated|empty"):
            PersonaIndex.load(bad, mmap=n % 2 == 0)


# ---------------------------------------------------------- D1 / D5: kill -9
_SAVER = textwrap.dedent("""
    import sys, numpy as np
    from persona4rec import PersonaIndex
    path, seed_a, seed_b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def make(seed):
        rng = np.random.default_rng(seed)
        v = rng.standard_normal((1200, 24)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        index = PersonaIndex.build([f"i{j}" for j in range(400)], v, np.arange(0, 1201, 3))
        index.build_ann(M=8, ef_construction=40, ef=32)
        return index
    versions = [make(seed_a), make(seed_b)]
    print("ready", flush=True)
    k = 0
    while True:
        versions[k % 2].save(path)
        k += 1
""")


def _version(seed: int) -> PersonaIndex:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((1200, 24)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    index = PersonaIndex.build([f"i{j}" for j in range(400)], v, np.arange(0, 1201, 3))
    index.build_ann(M=8, ef_construction=40, ef=32)
    return index


@pytest.mark.slow
def test_kill_9_during_saves_leaves_the_old_or_the_new_version(tmp_path):
    path = tmp_path / "index.p4r"
    users = unit_rows(np.random.default_rng(9), 8, 24)
    a, b = _version(11), _version(12)
    expected = {fingerprint(v, users) + fingerprint(v, users, approx=True) for v in (a, b)}
    a.save(path)
    rng = np.random.default_rng(5)
    seen_temp = 0
    for trial in range(24):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), "11", "12"], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(float(rng.uniform(0.0, 0.25)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
        loaded = PersonaIndex.load(path)
        assert fingerprint(loaded, users) + fingerprint(loaded, users, approx=True) in expected, f"trial {trial}"
        seen_temp += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    # Leftovers of killed writers are swept by the next save.
    a.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.p4r"]
    assert seen_temp >= 1, "no kill landed inside a save: the test would prove nothing"


def test_a_save_sweeps_leftover_temp_files_of_dead_writers(tmp_path):
    index, *_ = small_index()
    path = tmp_path / "x.p4r"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = [f".x.p4r.{dead.pid}.abcd1234.tmp", ".x.p4r.hnsw.q1w2e3.tmp", "x.p4r.hnsw.raw.tmp"]
    live = f".x.p4r.{os.getpid()}.zzzz9999.tmp"  # a concurrent writer in this process: kept
    for name in leftovers + [live]:
        (tmp_path / name).write_bytes(b"x" * 100)
    index.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, "x.p4r"])


# ------------------------------------------------------- D1: readers during saves
@pytest.mark.slow
def test_readers_during_saves_never_fail_and_never_mix_versions(tmp_path):
    path = tmp_path / "index.p4r"
    users = unit_rows(np.random.default_rng(9), 4, 24)
    a, b = _version(21), _version(22)
    expected = {fingerprint(v, users) + fingerprint(v, users, approx=True) for v in (a, b)}
    a.save(path)
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), "21", "22"], stdout=subprocess.PIPE, text=True)
    failures, loads = [], 0
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline and loads < 300:
            try:
                loaded = PersonaIndex.load(path, mmap=loads % 2 == 0)
                got = fingerprint(loaded, users) + fingerprint(loaded, users, approx=True)
                if got not in expected:
                    failures.append("mixed versions")
            except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                failures.append(repr(e))
            loads += 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert loads >= 20 and failures == []


# ------------------------------------------------------------- D4: crafted graphs
def _crafted_graph(tmp_path, mutate) -> Path:
    index, *_ = small_index(n_items=40, d=8, ann=True)
    path = tmp_path / "g.p4r"
    index.save(path)
    data, meta, _ = read_layout(path)
    mutate(data, meta)
    rewrite(path, data, meta)
    return path


def _level0_words(data, meta):
    e = section(meta, "ann.data_level0")
    params = meta["ann"]["hnswlib"]
    return e["offset"], params["size_data_per_element"], params


def _set_level0_neighbour(value):
    def mutate(data, meta):
        off, size, _ = _level0_words(data, meta)
        struct.pack_into("<I", data, off + 0, 1)          # element 0: one neighbour ...
        struct.pack_into("<I", data, off + 4, value)      # ... with this id
    return mutate


def _set_level0_count(value):
    def mutate(data, meta):
        off, _, _ = _level0_words(data, meta)
        struct.pack_into("<I", data, off, value)
    return mutate


def _set_param(name, value):
    def mutate(data, meta):
        meta["ann"]["hnswlib"][name] = value
    return mutate


def _upper_link_to_a_lower_element(data, meta):
    levels_e = section(meta, "ann.element_levels")
    levels = np.frombuffer(bytes(data[levels_e["offset"]:levels_e["offset"] + levels_e["nbytes"]]), dtype="<i4")
    params = meta["ann"]["hnswlib"]
    low = int(np.flatnonzero(levels == 0)[0])
    links = section(meta, "ann.link_lists")
    struct.pack_into("<II", data, links["offset"], 1, low)  # first upper list: one link to a level-0 element


def _duplicate_labels(data, meta):
    off, size, params = _level0_words(data, meta)
    label_off = params["label_offset"]
    label0 = struct.unpack_from("<Q", data, off + label_off)[0]
    struct.pack_into("<Q", data, off + size + label_off, label0)


@pytest.mark.parametrize("mutate, message", [
    (_set_level0_neighbour(10_000_000), "outside the graph"),
    (_set_level0_neighbour(2**32 - 1), "outside the graph"),
    (_set_level0_count(60_000), "neighbour count|malformed level-0"),
    (_set_level0_count(1 << 16), "deleted|malformed level-0"),
    (_upper_link_to_a_lower_element, "level that element does not reach"),
    (_duplicate_labels, "permutation"),
    (_set_param("enterpoint_node", 10_000), "entry point"),
    (_set_param("max_M0", 10_000), "disagrees"),
    (_set_param("size_data_per_element", 8), "disagrees"),
    (_set_param("max_level", 40), "top level"),
    (_set_param("M", "sixteen"), "malformed"),
    (_set_param("mult", 3.0), "mult"),
])
def test_crafted_graphs_are_refused_before_hnswlib_reads_them(tmp_path, mutate, message):
    path = _crafted_graph(tmp_path, mutate)
    # In a child process: were the check missing, hnswlib would crash, not raise.
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from persona4rec import PersonaIndex, IndexFormatError
        try:
            index = PersonaIndex.load({str(path)!r})
            index.search_approx(np.ones(8, dtype=np.float32) / np.sqrt(8), k=5)
        except IndexFormatError as e:
            print("IndexFormatError:", e)
            sys.exit(0)
        print("loaded")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.startswith("IndexFormatError:"), out.stdout
    import re

    assert re.search(message, out.stdout), out.stdout


def test_crafted_graph_arrays_of_the_wrong_size_are_refused(tmp_path):
    def mutate(data, meta):
        e = section(meta, "ann.data_level0")  # a section followed by others: only the graph check can tell
        e["shape"] = [e["shape"][0] - 8]
        e["nbytes"] -= 8
    path = _crafted_graph(tmp_path, mutate)
    with pytest.raises(IndexFormatError, match="data_level0"):
        PersonaIndex.load(path)


# ------------------------------------------------------------- D6: crafted files
def test_duplicate_item_ids_are_refused(tmp_path):
    index, *_ = small_index(ids="int")
    path = tmp_path / "d.p4r"
    index.save(path)
    data, meta, _ = read_layout(path)
    e = section(meta, "ids")
    struct.pack_into("<q", data, e["offset"] + 8, struct.unpack_from("<q", data, e["offset"])[0])
    rewrite(path, data, meta)
    with pytest.raises(IndexFormatError, match="'ids'.*twice"):
        PersonaIndex.load(path)


@pytest.mark.parametrize("verify", [True, False])
def test_a_minus_128_code_is_refused_even_without_verification(tmp_path, verify):
    index, *_ = small_index(d=16)
    path = tmp_path / "c.p4r"
    index.save(path)
    data, meta, _ = read_layout(path)
    e = section(meta, "codes")
    data[e["offset"] + 16 * 3 + 5] = 0x80  # row 3
    rewrite(path, data, meta)
    with pytest.raises(IndexFormatError, match="section 'codes': codes row 3 holds -128"):
        PersonaIndex.load(path, verify=verify)


@pytest.mark.parametrize("name", ["ids.data", "text.name.data"])
def test_invalid_utf8_is_refused_at_load_not_at_query_time(tmp_path, name):
    index, *_ = small_index()
    path = tmp_path / "u.p4r"
    index.save(path)
    data, meta, _ = read_layout(path)
    e = section(meta, name)
    data[e["offset"] + 1] = 0xFF
    rewrite(path, data, meta)
    with pytest.raises(IndexFormatError, match=f"'{name}'.*UTF-8"):
        PersonaIndex.load(path)


def test_a_string_offset_inside_a_character_is_refused(tmp_path):
    index, *_ = small_index(n_items=3, ids="str")
    index = PersonaIndex.build(["é1", "é2", "é3"], index._snap.codes.astype(np.float32)[:3] / 127,
                               np.arange(4))
    path = tmp_path / "s.p4r"
    index.save(path)
    data, meta, _ = read_layout(path)
    e = section(meta, "ids.offsets")
    struct.pack_into("<q", data, e["offset"] + 8, 1)  # splits the two bytes of "é"
    rewrite(path, data, meta)
    with pytest.raises(IndexFormatError, match="splits a UTF-8 character"):
        PersonaIndex.load(path)


_HEADER_CRAFTS = [
    ("sections as strings", lambda m: m.update(sections=["codes"] * len(m["sections"]))),
    ("shape as text", lambda m: m["sections"][0].update(shape="big")),
    ("offset as float", lambda m: m["sections"][1].update(offset=1.5)),
    ("huge offset", lambda m: m["sections"][1].update(offset=2**70)),
    ("huge count", lambda m: m.update(n_personas=2**62)),
    ("negative dim", lambda m: m.update(dim=-3)),
    ("dtype object", lambda m: m["sections"][0].update(dtype="|O")),
    ("dtype nonsense", lambda m: m["sections"][0].update(dtype="<q9")),
    ("big-endian dtype", lambda m: m["sections"][1].update(dtype=">f4")),
    ("missing checksum", lambda m: m["sections"][0].pop("checksum")),
    ("id kind", lambda m: m.update(id_kind="float")),
    ("ann entry a list", lambda m: m.update(ann=[1, 2])),
    ("ann params missing", lambda m: m.update(ann={"M": 4})),
    ("texts claimed", lambda m: m.update(has_texts=True) if not m.get("has_texts") else m["sections"].pop()),
    ("duplicate section", lambda m: m["sections"].__setitem__(1, dict(m["sections"][0]))),
    ("three-dimensional", lambda m: m["sections"][0].update(shape=[1, 2, 3])),
]


@pytest.mark.parametrize("label, craft", _HEADER_CRAFTS, ids=[c[0] for c in _HEADER_CRAFTS])
def test_crafted_headers_raise_only_index_format_errors(tmp_path, label, craft):
    index, *_ = small_index(n_items=6, d=8, ann=True)
    path = tmp_path / "h.p4r"
    index.save(path)
    data, meta, _ = read_layout(path)
    craft(meta)
    rewrite(path, data, meta)
    with pytest.raises(IndexFormatError):
        PersonaIndex.load(path)


def test_deeply_nested_json_header_is_an_index_format_error(tmp_path):
    index, *_ = small_index(n_items=6, d=8)
    path = tmp_path / "n.p4r"
    index.save(path)
    data, meta, json_off = read_layout(path)
    first = meta["sections"][0]["offset"]
    nested = b"[" * (first - json_off - 2) + b"]"
    data[json_off:first] = nested + b"\0" * (first - json_off - len(nested))
    struct.pack_into("<Q", data, 24, len(nested))
    struct.pack_into("<Q", data, 40, checksum64(bytes(data[json_off:first])))
    struct.pack_into("<Q", data, 56, checksum64(bytes(data[:56])))
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError):
        PersonaIndex.load(path)


# ------------------------------------------------------------- D3: id map race
def test_ids_added_while_others_query_them_never_raise():
    rng = np.random.default_rng(4)
    n_start, n_add, d = 50, 400, 16
    vectors = unit_rows(rng, n_start + n_add, d)
    ids = [f"id{i}" for i in range(n_start + n_add)]
    reference = PersonaIndex.build(ids, vectors, np.arange(n_start + n_add + 1))
    index = PersonaIndex.build(ids[:n_start], vectors[:n_start], np.arange(n_start + 1))
    user = unit_rows(rng, 1, d)[0]
    published: list[str] = list(ids[:n_start])
    errors: list[str] = []
    mismatches: list[str] = []
    done = threading.Event()

    def writer():
        for j in range(n_start, n_start + n_add):
            index.add_items([ids[j]], vectors[j:j + 1], [0, 1])
            published.append(ids[j])
        done.set()

    def reader(seed):
        r = np.random.default_rng(seed)
        while not done.is_set():
            n = len(published)
            newest = published[n - 1]
            # Ids being added right now: unknown to the snapshot a query reads, or known, never half-known.
            coming = ids[n:n + 2]
            pick = [published[int(i)] for i in r.integers(0, n, size=3)] + [newest] + coming
            try:
                # base_scores take the Python path (string ids alone take the native one)
                got = index.rerank(user, pick, base_scores=np.zeros(len(pick)), alpha=1.0, unknown="skip")
                present = [x for x in pick if x in set(got.ids)]
                if not set(pick[:4]) <= set(got.ids):
                    mismatches.append(f"published ids missing from {got.ids}")
                want = reference.rerank(user, present, base_scores=np.zeros(len(present)), alpha=1.0)
                if got.ids != want.ids or not np.array_equal(got.scores, want.scores):
                    mismatches.append(repr(pick))
                if newest not in index or index.explain(user, newest)[0].score != reference.explain(user, newest)[0].score:
                    mismatches.append(f"explain {newest}")
            except Exception as e:  # noqa: BLE001 - any exception is a failure of this test
                errors.append(repr(e))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(old)
    assert errors == [] and mismatches == []
    assert index.n_items == n_start + n_add


def test_int_ids_added_while_others_query_them_never_raise():
    rng = np.random.default_rng(5)
    n_start, n_add, d = 20, 1500, 4
    vectors = unit_rows(rng, n_start + n_add, d)
    index = PersonaIndex.build(list(range(n_start)), vectors[:n_start], np.arange(n_start + 1))
    user = unit_rows(rng, 1, d)[0]
    top = [0]
    errors: list[str] = []
    done = threading.Event()

    def writer():
        for j in range(n_start, n_start + n_add):
            index.add_items([j], vectors[j:j + 1], [0, 1])
            top[0] = j
        done.set()

    def reader():
        while not done.is_set():
            j = top[0]
            try:
                res = index.rerank(user, np.array([j, j // 2, j + 1, j + 2], dtype=np.int64), unknown="skip")
                assert {j, j // 2} <= set(res.ids)
                index.search(user, k=3, allow=[j, j + 1], unknown="skip")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader) for _ in range(2)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(old)
    assert errors == []


# --------------------------------------------------------- D7: silent inputs
def test_inputs_that_used_to_be_accepted_silently_raise_typed_errors():
    index, ids, vectors, offsets = small_index(n_items=10, d=8)
    user = vectors[0]
    with pytest.raises(TypeError, match="not a string"):
        index.search(user, k=3, exclude="it0001")
    with pytest.raises(TypeError, match="one list of item ids per user"):
        index.search(vectors[:2], k=3, exclude=["it0001", "it0002"])
    with pytest.raises(TypeError, match="not a string"):
        index.rerank(user, "it0001")
    with pytest.raises(ValueError, match="overflow"):
        index.search(user * np.float32(1e30), k=3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(8, np.nan, dtype=np.float32), k=3)
    with pytest.raises(ValueError, match="overflow"):
        index.rerank(user * np.float32(1e30), ["it0002"])
    with pytest.raises(ValueError, match="overflow"):
        index.explain(user * np.float32(1e30), "it0002")
    with pytest.raises(ValueError, match="missing must be 'error' or 'ignore'"):
        index.remove_items(["it0001"], missing="bogus")
    with pytest.raises(TypeError, match="not a string"):
        index.remove_items("it0001")
    assert index.remove_items(["it0001", "it0001"]) == 1
    with pytest.raises(ValueError, match="overflow"):
        PersonaIndex.build(["a"], np.full((1, 8), 1e30, dtype=np.float32), [0, 1])


def test_uint64_candidates_beyond_int64_are_unknown_not_wrapped():
    index = PersonaIndex.build(list(range(-3, 5)), unit_rows(np.random.default_rng(0), 8, 4), np.arange(9))
    user = unit_rows(np.random.default_rng(1), 1, 4)[0]
    huge = np.array([2**64 - 1], dtype=np.uint64)  # would wrap to -1, a real item here
    with pytest.raises(UnknownItemError):
        index.rerank(user, huge)
    assert index.rerank(user, np.array([2**64 - 1, 3], dtype=np.uint64), unknown="skip").ids == [3]


def test_a_candidate_without_personas_is_named_not_explained_with_garbage():
    rng = np.random.default_rng(0)
    index = PersonaIndex.build(["a", "empty", "b"], unit_rows(rng, 2, 4), [0, 1, 1, 2])
    user = unit_rows(rng, 1, 4)[0]
    with pytest.raises(UnknownItemError, match="no personas"):
        index.rerank(user, ["a", "empty", "b"])
    res = index.rerank(user, ["a", "empty", "b"], unknown="skip")
    assert sorted(res.ids) == ["a", "b"] and all(p.endswith(("_P1",)) for p in res.persona_ids)
    with pytest.raises(UnknownItemError, match="no personas"):
        index.rerank(user, ["a", "empty"], base_scores=[1.0, 2.0], alpha=0.5)


def test_maxsim_refuses_minus_128_codes():
    codes = np.zeros((3, 8), dtype=np.int8)
    codes[2, 5] = -128
    with pytest.raises(ValueError, match="row 2 holds -128"):
        MaxSimIndex(codes, np.ones(3, dtype=np.float32), np.array([0, 3], dtype=np.int64))


def test_a_published_snapshot_never_sees_ids_added_after_it():
    # The structural fact behind the race-free map: a mutation publishes a new map; the
    # map a query already holds is never written to (before: one shared, append-only map
    # whose new entries were visible before its bound was raised).
    for ids in (["a", "b"], [10, 11]):
        index = PersonaIndex.build(ids, unit_rows(np.random.default_rng(0), 2, 4), [0, 1, 2])
        before = index._snap
        before.id_to_index.mapping()  # built, as after the first query
        new_id = "c" if isinstance(ids[0], str) else 12
        index.add_items([new_id], unit_rows(np.random.default_rng(1), 1, 4), [0, 1])
        assert before.id_to_index.lookup_many([new_id])[0] == -1
        assert new_id not in before.id_to_index.mapping()
        assert index._snap.id_to_index.lookup_many([new_id])[0] == 2


def test_duplicate_string_ids_are_refused_but_a_re_added_removed_id_loads(tmp_path):
    from persona4rec._core import find_duplicate_int, find_duplicate_string
    from persona4rec._persist import StringColumn

    col = StringColumn.from_list(["a", "bb", "c", "bb", "a"])
    assert find_duplicate_string(col.data, col.offsets) == 3
    assert find_duplicate_string(col.data, col.offsets, np.array([0, 1, 0, 0, 0], np.uint8)) == 4
    assert find_duplicate_string(col.data, col.offsets, np.array([0, 1, 0, 0, 1], np.uint8)) == -1
    assert find_duplicate_int(np.array([5, 1, 2, 1, 5], np.int64)) == 3

    rng = np.random.default_rng(0)
    index = PersonaIndex.build(["a", "b"], unit_rows(rng, 2, 4), [0, 1, 2])
    index.remove_items(["a"])
    again = unit_rows(rng, 1, 4)
    index.add_items(["a"], again, [0, 1])
    path = tmp_path / "readd.p4r"
    index.save(path)
    loaded = PersonaIndex.load(path)
    assert loaded.item_ids == ["b", "a"] and loaded.explain(again[0], "a")[0].row == 2

    data, meta, _ = read_layout(path)
    e = section(meta, "removed")
    data[e["offset"]] = 0  # the old "a" is live again: two live items named "a"
    rewrite(path, data, meta)
    with pytest.raises(IndexFormatError, match="'ids' holds the live item id 'a' twice"):
        PersonaIndex.load(path)


def test_adding_no_items_is_a_no_op_for_either_id_kind():
    for ids in (["a", "b"], [1, 2]):
        index = PersonaIndex.build(ids, unit_rows(np.random.default_rng(0), 2, 4), [0, 1, 2])
        index.add_items([], np.zeros((0, 4), np.float32), [0])
        assert index.item_ids == ids
        with pytest.raises(ValueError, match="offsets"):
            index.add_items([], np.zeros((1, 4), np.float32), [0])
