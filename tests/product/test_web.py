"""`cbir serve`: the JSON API over HTTP, and the page driven in headless Chromium (Playwright with
the system's /usr/bin/chromium; no browser is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.product.helpers import corrupt_files, run_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory, image_folder_200, hash_model) -> Iterator[str]:
    """`cbir serve` on a free loopback port over a 200-image index; stopped afterwards."""
    index = tmp_path_factory.mktemp("web") / "web.index"
    run_cli("index", str(image_folder_200), "--model", str(hash_model), "-o", str(index), "--no-progress")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cbir_engine.cli", "serve", "--index", str(index),
                             "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "/api/info", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None:
                raise AssertionError(f"cbir serve exited: {proc.communicate()[0]!r}")
            if time.monotonic() > deadline:
                raise AssertionError("cbir serve did not answer within 60 s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def _upload(base: str, name: str, content: bytes, k: int = 5) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    body += content + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, raw, _ = _request(base + "/api/search", body, headers)
    return status, json.loads(raw)


def test_json_api(server, image_folder_200, tmp_path):
    status, raw, _ = _request(server + "/api/info")
    info = json.loads(raw)
    assert status == 200 and info["images"] == 200 and info["kind"] == "binary" and info["dim"] == 48

    query = sorted((image_folder_200 / "Sandal").iterdir())[0]
    status, data = _upload(server, query.name, query.read_bytes(), k=7)
    assert status == 200 and data["query"] == query.name and len(data["results"]) == 7
    assert [r["rank"] for r in data["results"]] == list(range(1, 8))
    dists = [r["distance"] for r in data["results"]]
    assert dists[0] == 0 and dists == sorted(dists)

    broken, text = corrupt_files(tmp_path)
    for bad in (broken, text):
        status, data = _upload(server, bad.name, bad.read_bytes())
        assert status == 422 and bad.name in data["error"] and "cannot decode image" in data["error"]
    status, data = _upload(server, "empty.png", b"")
    assert status == 422 and "empty" in data["error"]
    status, data = _upload(server, query.name, query.read_bytes(), k=0)
    assert status == 400 and "k must be" in data["error"]

    status, raw, _ = _request(server + "/api/images?offset=0&limit=5")
    listing = json.loads(raw)
    assert status == 200 and listing["total"] == 200 and len(listing["images"]) == 5
    first = listing["images"][0]
    status, raw, _ = _request(server + f"/api/search?id={first['id']}&k=3")
    by_id = json.loads(raw)
    assert status == 200 and by_id["query_id"] == first["id"] and by_id["results"][0]["distance"] == 0
    status, raw, ctype = _request(server + first["thumbnail"])
    assert status == 200 and ctype == "image/png" and raw[:8] == b"\x89PNG\r\n\x1a\n"
    status, raw, _ = _request(server + "/api/search?id=999999")
    assert status == 404 and "no image with id 999999" in json.loads(raw)["error"]
    status, raw, _ = _request(server + "/api/images/999999/thumbnail")
    assert status == 404


def _missing(what: str) -> None:
    # CI sets CBIR_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip.
    if os.environ.get("CBIR_REQUIRE_BROWSER") == "1":
        pytest.fail(what)
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        _missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        _missing("playwright is not installed (pip install playwright; it drives the system's chromium)")
    with sync_api.sync_playwright() as p:
        # launch() gives each browser a fresh temporary profile (user data dir).
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.browser
def test_page_upload_results_and_bad_upload(server, browser, image_folder_200, tmp_path):
    page = browser.new_page()  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('200 images')")

    # Upload an image: the top-k thumbnails appear, with distances, nearest first.
    query = sorted((image_folder_200 / "Trouser").iterdir())[0]
    page.fill("#k", "6")
    page.set_input_files("#file", str(query))
    page.click("#search")
    page.wait_for_selector("#results figure.result")
    results = page.locator("#results figure.result")
    assert results.count() == 6
    distances = [float(results.nth(i).get_attribute("data-distance")) for i in range(6)]
    assert distances[0] == 0 and distances == sorted(distances)
    captions = [results.nth(i).inner_text() for i in range(6)]
    assert all("d=" in c for c in captions) and sum("Trouser" in c for c in captions) >= 5
    # Every thumbnail loaded (naturalWidth > 0).
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    assert "query: " + query.name in page.inner_text("#query")
    assert page.inner_text("#error") == ""

    # An unreadable upload (a text file named .jpg) gets a clear message and no stale results.
    bad = tmp_path / "holiday.jpg"
    bad.write_text("not really a photo")
    page.set_input_files("#file", str(bad))
    page.click("#search")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    message = page.inner_text("#error")
    assert "holiday.jpg" in message and "cannot decode image" in message and "JPEG, PNG" in message
    assert page.locator("#results figure").count() == 0

    # Picking an indexed image searches with it.
    page.wait_for_selector("#picker figure")
    page.locator("#picker figure").first.click()
    page.wait_for_selector("#results figure.result")
    assert page.locator("#results figure.result").count() == 6
    assert page.inner_text("#error") == ""
    assert float(page.locator("#results figure.result").first.get_attribute("data-distance")) == 0

    # Searching with no file chosen says so.
    page.reload()
    page.click("#search")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "Choose an image file" in page.inner_text("#error")
    assert errors == []
    page.close()


def test_serve_refuses_a_broken_index(tmp_path, image_folder_200, hash_model):
    index = tmp_path / "b.index"
    run_cli("index", str(image_folder_200), "--model", str(hash_model), "-o", str(index), "--no-progress")
    (code,) = [p for p in index.iterdir() if p.name.startswith("codes.")]
    shutil.copyfile(code, code.with_name("x"))
    code.unlink()
    proc = run_cli("serve", "--index", str(index), "--port", str(_free_port()), check=False, timeout=60)
    assert proc.returncode == 1 and "is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_page_is_served(server):
    status, raw, ctype = _request(server + "/")
    assert status == 200 and ctype.startswith("text/html")
    html = raw.decode()
    assert 'id="file"' in html and "{{DEFAULT_K}}" not in html and 'value="10"' in html
