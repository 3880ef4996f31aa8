"""The on-disk index: folders with broken files, incremental runs, the two parts checked against
each other, the float index file, and search with unreadable queries."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time

import numpy as np
import pytest

from cbir_engine.errors import ImageDecodeError, IndexConsistencyError, IndexFileError
from cbir_engine.store import Collection, FloatIndex
from cbir_engine.store.images import load_pixels
from cbir_engine.store.model_info import read_model_info
from tests.product.helpers import corrupt_files, run_cli


def _code_file(index_path):
    (f,) = [p for p in index_path.iterdir() if p.name.startswith(("codes.", "vectors."))]
    return f


def test_folder_with_corrupt_jpeg_and_text_named_jpg(tmp_path, image_folder, hash_model):
    broken, text = corrupt_files(image_folder)
    out = tmp_path / "my.index"
    proc = run_cli("index", str(image_folder), "--model", str(hash_model), "-o", str(out), "--no-progress")
    assert "202 image files: 200 added, 0 updated, 0 unchanged, 2 unreadable (skipped)" in proc.stdout
    # Each bad file is named in a warning with the reason; no traceback.
    assert f"skipped unreadable {broken}" in proc.stderr and "truncated" in proc.stderr
    assert f"skipped unreadable {text}" in proc.stderr and "not an image file" in proc.stderr
    assert "Traceback" not in proc.stderr
    with Collection.open(out) as c:
        assert len(c) == 200
        paths = {r.path for r in c.rows().values()}
        assert str(broken) not in paths and str(text) not in paths
        classes = {"Ankle boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker",
                   "T-shirt-top", "Trouser"}
        assert {r.label for r in c.rows().values()} <= classes


def test_rerun_adds_only_new_and_changed_files(tmp_path, image_folder, hash_model, fashion):
    out = tmp_path / "my.index"
    with Collection.create(out, hash_model, threads=1) as c:
        first = c.update(image_folder)
        assert (first.added, first.unchanged) == (200, 0)
        before = {r.path: (r.id, c_code) for r, c_code in zip(
            [c.rows()[i] for i in c.index.ids], np.asarray(c.index.codes).tolist(), strict=True)}
    # Three new images, one changed file (other content, so other size / mtime).
    x, _, _ = fashion
    from PIL import Image

    new_dir = image_folder / "New"
    new_dir.mkdir()
    for i in range(3):
        Image.fromarray(x[500 + i]).save(new_dir / f"n{i}.png")
    changed = sorted((image_folder / "Bag").iterdir())[0]
    old_mtime = changed.stat().st_mtime_ns
    Image.fromarray(x[900]).save(changed)
    os.utime(changed, ns=(old_mtime + 10**9, old_mtime + 10**9))
    with Collection.open(out, writable=True, threads=1) as c:
        second = c.update(image_folder)
        assert (second.added, second.updated, second.unchanged) == (3, 1, 199)
        rows = c.rows()
        assert len(c) == 203 and len(rows) == 203
        # Unchanged files keep their ids and codes; the changed one got a new id and new code.
        stored = np.asarray(c.index.codes).tolist()
        codes = {int(i): code for i, code in zip(c.index.ids, stored, strict=True)}
        for r in rows.values():
            if r.path in before and r.path != str(changed):
                assert before[r.path] == (r.id, codes[r.id])
        changed_row = next(r for r in rows.values() if r.path == str(changed))
        assert changed_row.id >= 200 and changed_row.label == "Bag"
        third = c.update(image_folder)
        assert (third.added, third.updated, third.unchanged) == (0, 0, 203)
        # prune drops what is gone from the folder
        shutil.rmtree(new_dir)
        fourth = c.update(image_folder, prune=True)
        assert fourth.removed == 3 and len(c) == 200 and len(c.rows()) == 200


def test_disagreeing_parts_are_refused(tmp_path, image_folder, hash_model):
    a, b = tmp_path / "a.index", tmp_path / "b.index"
    with Collection.create(a, hash_model, threads=1) as c:
        c.update(image_folder)
    # b: the same model over fewer images; its code file is a valid file of another index.
    for p in list((image_folder / "Bag").iterdir()):
        p.unlink()
    with Collection.create(b, hash_model, threads=1) as c:
        c.update(image_folder)
    shutil.copyfile(_code_file(b), _code_file(a))
    with pytest.raises(IndexConsistencyError, match="not the one the metadata recorded"):
        Collection.open(a)
    coat = sorted((image_folder / "Coat").iterdir())[0]
    proc = run_cli("search", str(coat), "--index", str(a), check=False)
    assert proc.returncode == 1 and "parts disagree" in proc.stderr and "Traceback" not in proc.stderr

    # Rows deleted from SQLite behind the index's back (the code file untouched).
    db = sqlite3.connect(b / "meta.sqlite")
    db.execute("DELETE FROM images WHERE id IN (SELECT id FROM images LIMIT 2)")
    db.commit()
    db.close()
    with pytest.raises(IndexConsistencyError, match=r"lists \d+ images but the code file holds \d+ codes"):
        Collection.open(b)

    # The code file gone.
    _code_file(b).unlink()
    with pytest.raises(IndexConsistencyError, match="is missing"):
        Collection.open(b)


def test_crash_leftovers_are_ignored_then_cleared(tmp_path, image_folder, hash_model):
    out = tmp_path / "my.index"
    with Collection.create(out, hash_model, threads=1) as c:
        c.update(image_folder)
        n, gen = len(c), c._generation
    good = _code_file(out)
    # A crash after writing the next generation's file but before the SQLite commit.
    orphan = out / good.name.replace(f"{gen:08d}", f"{gen + 1:08d}")
    shutil.copyfile(good, orphan)
    with Collection.open(out) as c:  # readers ignore it
        assert len(c) == n
    assert orphan.exists()
    with Collection.open(out, writable=True) as c:  # the next writer clears it
        assert len(c) == n
    assert not orphan.exists() and good.exists()


def test_truncated_code_file_is_refused(tmp_path, image_folder, hash_model):
    out = tmp_path / "my.index"
    with Collection.create(out, hash_model, threads=1) as c:
        c.update(image_folder)
    f = _code_file(out)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(IndexFileError):
        Collection.open(out)


def test_second_writer_is_refused(tmp_path, image_folder, hash_model):
    from cbir_engine.store import CollectionBusyError

    out = tmp_path / "my.index"
    with Collection.create(out, hash_model, threads=1):
        with pytest.raises(CollectionBusyError):
            Collection.open(out, writable=True)
        with Collection.open(out) as reader:  # readers need no lock
            assert len(reader) == 0


def test_query_with_unreadable_image(tmp_path, image_folder_200, hash_model):
    out = tmp_path / "my.index"
    run_cli("index", str(image_folder_200), "--model", str(hash_model), "-o", str(out), "--no-progress")
    broken, text = corrupt_files(tmp_path)
    with Collection.open(out) as c:
        for bad in (broken, text):
            with pytest.raises(ImageDecodeError, match=str(bad.name)):
                c.search_image(bad)
        with pytest.raises(ImageDecodeError, match="empty"):
            c.search_image(b"")
    good = sorted((image_folder_200 / "Sneaker").iterdir())[0]
    proc = run_cli("search", str(text), str(good), "--index", str(out), "-k", "3", check=False)
    # The good query still runs; the bad one is named with the reason; the exit status says so.
    assert proc.returncode == 1
    assert f"cannot search with {text}" in proc.stderr and "not an image file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"query: {good}" in proc.stdout and proc.stdout.count("Sneaker") >= 3


def test_search_table_and_html(tmp_path, image_folder_200, hash_model):
    out = tmp_path / "my.index"
    run_cli("index", str(image_folder_200), "--model", str(hash_model), "-o", str(out), "--no-progress")
    query = sorted((image_folder_200 / "Trouser").iterdir())[0]
    page = tmp_path / "out.html"
    proc = run_cli("search", str(query), "--index", str(out), "-k", "5", "--html", str(page))
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 5
    distances = [int(ln[1]) for ln in lines]
    assert distances[0] == 0 and distances == sorted(distances)
    assert all(ln[3] == "Trouser" for ln in lines)  # rank, distance, id, label, path
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 6  # the query and five results
    assert "d=0" in html
    # JSON output; the query itself is among the codes at distance 0 (ties come in id order).
    proc = run_cli("search", str(query), "--index", str(out), "-k", "200", "--json")
    (result,) = json.loads(proc.stdout)
    zero = [h["path"] for h in result["results"] if h["distance"] == 0]
    assert str(query) in zero
    ids = [h["id"] for h in result["results"] if h["distance"] == 0]
    assert ids == sorted(ids)


def test_eval_reports_map(tmp_path, image_folder_200, hash_model):
    out = tmp_path / "my.index"
    run_cli("index", str(image_folder_200), "--model", str(hash_model), "-o", str(out), "--no-progress")
    proc = run_cli("eval", "--index", str(out), "--queries", "200")
    m_ap = float(proc.stdout.split("mAP@all")[1].split()[0])
    # The trained model separates the classes well above chance (~0.1 for 10 classes).
    assert 0.5 < m_ap <= 1.0


def test_float_descriptor_index(tmp_path, image_folder_200, gem_model):
    info = read_model_info(gem_model)
    assert info.output == "float" and (info.channels, info.height) == (1, 28)
    out = tmp_path / "gem.index"
    proc = run_cli("index", str(image_folder_200), "--model", str(gem_model), "-o", str(out), "--no-progress")
    assert "200 added" in proc.stdout
    assert any(p.name.endswith(".fidx") for p in out.iterdir())
    with Collection.open(out) as c:
        assert c.kind == "float" and c.dim == 128
        query = sorted((image_folder_200 / "Dress").iterdir())[0]
        hits = c.search_image(query, k=5)
        assert hits[0].path == str(query) and hits[0].distance == pytest.approx(0.0, abs=1e-5)
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_float_index_file_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 16)).astype(np.float32)
    idx = FloatIndex(16, "l2")
    idx.add(v, np.arange(100, 150))
    idx.add(v[:2], [7, 8])  # duplicates of ids 100, 101: ties broken by the smaller id
    d, i = idx.search(v[:1], 3)
    assert i[0].tolist() == [7, 100, 133] or i[0][:2].tolist() == [7, 100]
    assert d[0][0] == d[0][1] == 0.0
    path = tmp_path / "v.fidx"
    idx.save(path)
    back = FloatIndex.load(path)
    assert back.metric == "l2" and np.array_equal(back.ids, idx.ids)
    assert np.array_equal(back.vectors, idx.vectors)
    d2, i2 = back.search(v[:5], 4)
    assert np.array_equal(i2, idx.search(v[:5], 4)[1])
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="data checksum"):
        FloatIndex.load(path)
    path.write_bytes(b"CBIRHAMI" + bytes(56))
    with pytest.raises(IndexFileError, match="bad magic"):
        FloatIndex.load(path)
    cos = FloatIndex(16)
    cos.add(v, np.arange(50))
    d, i = cos.search(v[3:4] * 5.0, 1)  # scale does not matter for cosine
    assert i[0, 0] == 3 and abs(d[0, 0]) < 1e-6


def test_pixels_match_the_training_normalisation(image_folder_200, hash_model, fashion):
    from cbir_engine.data import to_float
    from cbir_engine.store.images import normalise

    x, _, _ = fashion
    info = read_model_info(hash_model)
    px = load_pixels(sorted(image_folder_200.rglob("00000.png"))[0], info)
    assert np.array_equal(px[:, :, 0], x[0])
    assert np.array_equal(normalise(px[None], info), to_float(x[:1]))


def test_index_into_existing_with_other_model_is_refused(tmp_path, image_folder_200, hash_model, gem_model):
    out = tmp_path / "my.index"
    run_cli("index", str(image_folder_200), "--model", str(hash_model), "-o", str(out), "--no-progress")
    proc = run_cli("index", str(image_folder_200), "--model", str(gem_model), "-o", str(out), check=False)
    assert proc.returncode == 1 and "built with another model" in proc.stderr
    t0 = time.perf_counter()
    proc = run_cli("index", str(image_folder_200), "-o", str(out), "--no-progress")
    assert "0 added, 0 updated, 200 unchanged" in proc.stdout
    assert time.perf_counter() - t0 < 60


def test_reader_sees_what_a_writer_commits(tmp_path, image_folder, hash_model):
    out = tmp_path / "my.index"
    bag = image_folder / "Bag"
    moved = tmp_path / "later"
    shutil.move(bag, moved)  # index everything but the bags first
    with Collection.create(out, hash_model, threads=1) as writer:
        writer.update(image_folder)
        reader = Collection.open(out)
        n = len(reader)
        assert reader.refresh() is False
        shutil.move(moved, bag)
        added = writer.update(image_folder).added
        assert added > 0
        assert reader.refresh() is True and len(reader) == n + added
        query = sorted(bag.iterdir())[0]
        assert any(h.path == str(query) for h in reader.search_image(query, k=50))
        reader.close()
