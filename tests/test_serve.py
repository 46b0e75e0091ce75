"""cots_jax.serve: the JSON API over a real server (answers known by construction: an image's own
row ranks first), its limits and file rules, concurrent queries, the `serve` command, and the
page in a real browser (Debian's Chromium through its chromedriver)."""

import concurrent.futures
import contextlib
import dataclasses
import http.client
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cots_jax import export
from cots_jax import search
from cots_jax import serve
from support import REPO, free_port, subprocess_env

# Sixteen distinct images, named by their tint: the noise and stripes of each differ, so each
# image's nearest index row is its own.
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220),
           "yellow": (230, 220, 40), "purple": (140, 50, 170), "orange": (250, 140, 30),
           "cyan": (40, 210, 210), "gray": (128, 128, 128), "black": (15, 15, 15),
           "white": (245, 245, 245), "pink": (250, 160, 200), "brown": (120, 70, 30),
           "navy": (20, 30, 110), "olive": (110, 120, 30), "teal": (20, 120, 120),
           "maroon": (120, 20, 40)}
CAPTIONS = ["a red square", "two green circles", "a blue triangle", "yellow stripes",
            "a purple star", "an orange sunset"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@dataclasses.dataclass(frozen=True)
class Gallery:
  """The test's image index: its folder, file, rows and the row of a symlink out of the folder."""
  folder: pathlib.Path
  index: pathlib.Path
  embeddings: np.ndarray
  items: list
  escape_row: int

  def row(self, name):
    """The row of the image file NAME."""
    return [os.path.basename(item) for item in self.items].index(name)


def _write_images(folder):
  """Writes the COLOURS images (tinted noise with stripes, of several sizes) into FOLDER, a text
  file, and escape.png: a symlink to an image outside FOLDER."""
  rng = np.random.default_rng(7)
  for number, (name, tint) in enumerate(COLOURS.items()):
    height, width = 32 + 4 * (number % 3), 40 + 3 * number
    pixels = rng.integers(0, 90, (height, width, 3)) + np.array(tint) * 0.6
    pixels[:, ::4 + number % 5] = np.array(tint) * 0.3
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}.png")
  (folder / "notes.txt").write_text("not an image\n")
  outside = folder.parent / "outside"
  outside.mkdir()
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(outside / "secret.png")
  os.symlink(outside / "secret.png", folder / "escape.png")


@pytest.fixture(scope="module")
def embedder(exported_run):
  return search.export_embedder(export.load(exported_run), exported_run)


@pytest.fixture(scope="module")
def gallery(embedder, tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  folder = root / "images"
  folder.mkdir()
  _write_images(folder)
  with contextlib.redirect_stderr(io.StringIO()):
    embeddings, items, _ = search.build_image_index(embedder, folder)
  index = root / "images.safetensors"
  search.save_index(index, embeddings, items,
                    {"kind": "image", **embedder.source, "embed_dim": embedder.embed_dim})
  names = [os.path.basename(item) for item in items]
  assert len(items) == len(COLOURS) + 1 and "notes.txt" not in names
  return Gallery(folder, index, embeddings, items, names.index("escape.png"))


@contextlib.contextmanager
def _running(searcher):
  """A real uvicorn server of `searcher` on a free port of 127.0.0.1, in a thread: its URL."""
  port = free_port()
  server = serve.make_server(searcher, "127.0.0.1", port)
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def searcher(gallery, embedder):
  return serve.Searcher(*search.load_index(gallery.index), embedder)


@pytest.fixture(scope="module")
def url(searcher):
  with _running(searcher) as base:
    yield base


@pytest.fixture(scope="module")
def text_url(embedder):
  meta = {"kind": "text", **embedder.source, "embed_dim": embedder.embed_dim}
  with _running(serve.Searcher(embedder.texts(CAPTIONS), CAPTIONS, meta, embedder)) as base:
    yield base


def _fetch(address, data=None, headers=None):
  """(status, content type, body bytes) of one request (a POST with DATA); error statuses too."""
  request = urllib.request.Request(address, data=data, headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, response.headers["content-type"], response.read()
  except urllib.error.HTTPError as error:
    return error.code, error.headers["content-type"], error.read()


def _json(address, **kwargs):
  """(status, the JSON answer) of one request."""
  status, content_type, body = _fetch(address, **kwargs)
  assert content_type == "application/json", (status, content_type, body[:200])
  return status, json.loads(body)


def _multipart(data, **fields):
  """(body, headers) of a multipart/form-data request: file "image" and the text FIELDS."""
  boundary = "cotsjaxtestboundary"
  parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
           .encode() for name, value in fields.items()]
  parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename='
               '"query.png"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode() + data +
               f"\r\n--{boundary}--\r\n".encode())
  return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _upload(base, data, **fields):
  """(status, JSON answer) of POST /api/search_image with DATA as the image."""
  body, headers = _multipart(data, **fields)
  return _json(f"{base}/api/search_image", data=body, headers=headers)


def test_info_and_page(url, gallery, exported_run):
  status, info = _json(f"{url}/api/info")
  assert status == 200
  assert info == {"kind": "image", "size": len(gallery.items), "embed_dim": 16,
                  "model": {"export": str(exported_run)},
                  "limits": {"default_k": 12, "max_k": 100, "max_query_chars": 500,
                             "max_upload_bytes": 8 * 2**20}}
  status, content_type, page = _fetch(f"{url}/")
  assert status == 200 and content_type.startswith("text/html")
  assert page.decode() == serve.read_page() and "<title>cots_jax search</title>" in page.decode()


def test_text_query_ranks_like_the_search_module(url, gallery, embedder):
  status, answer = _json(f"{url}/api/search?q=a+red+square&k=5")
  expected = search.search(gallery.embeddings, gallery.items,
                           search.embed_query(embedder, text="a red square"), k=5)
  assert status == 200 and answer["total"] == len(gallery.items)
  assert answer["k"] == 5 and answer["offset"] == 0
  assert [hit["item"] for hit in answer["results"]] == [item for item, _ in expected]
  np.testing.assert_allclose([hit["score"] for hit in answer["results"]],
                             [score for _, score in expected], atol=1e-5)
  for hit in answer["results"]:
    assert gallery.items[hit["row"]] == hit["item"] and hit["thumb"] == f"/thumb/{hit['row']}"


def test_pages_split_one_ranking(url, gallery):
  whole = _json(f"{url}/api/search?q=stripes&k=17")[1]["results"]
  pages = [_json(f"{url}/api/search?q=stripes&k=5&offset={offset}")[1]
           for offset in (0, 5, 10, 15)]
  assert [len(page["results"]) for page in pages] == [5, 5, 5, 2]
  assert [hit["row"] for page in pages for hit in page["results"]] == [
      hit["row"] for hit in whole]
  assert pages[2]["offset"] == 10
  status, past = _json(f"{url}/api/search?q=stripes&offset={len(gallery.items)}")
  assert status == 200 and past["results"] == []


def test_more_like_this_ranks_the_row_itself_first(url, gallery):
  for row in range(len(gallery.items)):
    status, answer = _json(f"{url}/api/similar?item={row}&k=3")
    assert status == 200
    assert answer["results"][0]["row"] == row
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert answer["results"][1]["score"] < 0.9999
  second = _json(f"{url}/api/similar?item=3&k=2&offset=1")[1]["results"]
  assert [hit["row"] for hit in second] == [
      hit["row"] for hit in _json(f"{url}/api/similar?item=3&k=3")[1]["results"]][1:]


def test_an_uploaded_image_finds_itself(url, gallery):
  status, answer = _upload(url, (gallery.folder / "blue.png").read_bytes(), k="4", offset="0")
  assert status == 200 and len(answer["results"]) == 4
  top = answer["results"][0]
  assert top["row"] == gallery.row("blue.png") and top["score"] == pytest.approx(1.0, abs=1e-4)
  assert _upload(url, (gallery.folder / "blue.png").read_bytes(), k="2", offset="1")[1][
      "results"][0]["row"] == answer["results"][1]["row"]


def test_thumbnails(url, gallery):
  status, content_type, body = _fetch(f"{url}/thumb/{gallery.row('red.png')}")
  assert status == 200 and content_type == "image/jpeg"
  thumb = Image.open(io.BytesIO(body))
  original = Image.open(gallery.folder / "red.png")
  assert thumb.format == "JPEG" and thumb.size == original.size  # small images stay as they are
  large = gallery.folder.parent / "large.png"
  Image.new("RGBA", (600, 300), (10, 20, 30, 128)).save(large)
  assert Image.open(io.BytesIO(serve.thumbnail_jpeg(large))).size == (256, 128)


@pytest.mark.parametrize("path, message", [
    ("/api/search?q=dog&k=0", "k must be in 1..100, got 0"),
    ("/api/search?q=dog&k=1000000000", "k must be in 1..100, got 1000000000"),
    ("/api/search?q=dog&k=ten", "k must be an integer, got 'ten'"),
    ("/api/search?q=dog&offset=-1", "offset must be in 0..17, got -1"),
    ("/api/search?q=", "the query is empty: type a few words"),
    ("/api/search?q=+++", "the query is empty"),
    ("/api/search", "the query is empty"),
    ("/api/search?q=" + "a" * 501, "the query has 501 characters; the limit is 500"),
    ("/api/similar?k=3", "give item=ROW"),
    ("/api/similar?item=17", "item must be in 0..16, got 17"),
    ("/api/similar?item=x", "item must be an integer"),
])
def test_bad_queries_are_400_with_a_message(url, path, message):
  status, answer = _json(url + path)
  assert status == 400 and message in answer["error"]


def test_bad_uploads_are_400_with_a_message(url, gallery):
  png = (gallery.folder / "red.png").read_bytes()
  cases = [(b"plain text, no image", "the upload is no usable image: not an image"),
           (png[:100], "the upload is no usable image: truncated or corrupt"),
           (b"", "the upload is no usable image: empty file")]
  for data, message in cases:
    status, answer = _upload(url, data)
    assert status == 400 and answer["error"].startswith(message), answer
  assert _upload(url, png, k="0") == (400, {"error": "k must be in 1..100, got 0"})
  status, answer = _json(f"{url}/api/search_image", data=b"k=3",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
  assert status == 400 and "file field 'image'" in answer["error"]
  body, headers = _multipart(png)
  status, answer = _json(f"{url}/api/search_image", data=body,
                         headers={**headers, "Content-Length": str(serve.MAX_UPLOAD_BYTES + 1)})
  assert status == 413 and "the limit is 8388608 (8 MiB)" in answer["error"]
  assert _json(f"{url}/api/search_image")[0] == 405
  assert _chunked_upload(url, png) == (411, {"error": "send the upload with a Content-Length "
                                                      "header"})


def _chunked_upload(base, data):
  """(status, JSON answer) of an image upload sent chunked, without a Content-Length."""
  body, headers = _multipart(data)
  connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
  try:
    connection.request("POST", "/api/search_image", body=iter([body]),
                       headers={**headers, "Transfer-Encoding": "chunked"}, encode_chunked=True)
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


@pytest.mark.parametrize("path", [
    "/thumb/../../etc/passwd", "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb//etc/passwd",
    "/thumb/%2Fetc%2Fpasswd", "/etc/passwd", "/images/red.png", "/thumb/red.png", "/thumb/-1",
    "/thumb/17", "/thumb/100000000000000000000", "/web/index.html", "/../cots_jax/serve.py",
])
def test_only_index_rows_are_served(url, path):
  status, answer = _json(url + path)
  assert status == 404 and answer["error"]


def test_a_symlink_out_of_the_folder_is_not_served(url, gallery):
  assert os.path.islink(gallery.items[gallery.escape_row])
  status, answer = _json(f"{url}/thumb/{gallery.escape_row}")
  assert (status, answer) == (404, {"error": f"row {gallery.escape_row}'s image is not in the "
                                             "indexed folder"})


def test_a_loopback_server_answers_its_own_names_only(url):
  for name in ("127.0.0.1", "localhost"):
    assert _fetch(f"{url}/api/info", headers={"Host": f"{name}:8000"})[0] == 200
  assert _fetch(f"{url}/api/info", headers={"Host": "rebound.example:8000"})[0] == 400
  assert serve.allowed_hosts("127.0.0.1") == ["127.0.0.1", "[::1]", "localhost"]
  assert serve.allowed_hosts("::1") == ["127.0.0.1", "[::1]", "localhost"]
  assert serve.allowed_hosts("localhost") == ["127.0.0.1", "[::1]", "localhost"]
  assert serve.allowed_hosts("127.0.0.2") == ["127.0.0.1", "127.0.0.2", "[::1]", "localhost"]
  assert serve.allowed_hosts("0.0.0.0") == ["*"]


def test_a_fault_answers_500_without_internals(url, searcher, monkeypatch):
  def broken(captions):
    raise RuntimeError(f"secret detail of {captions}")

  monkeypatch.setattr(searcher, "embedder", dataclasses.replace(searcher.embedder, texts=broken))
  status, answer = _json(f"{url}/api/search?q=dog")
  assert (status, answer) == (500, {"error": serve.INTERNAL_ERROR})


def test_a_caption_index(text_url, embedder, gallery):
  embeddings = embedder.texts(CAPTIONS)
  status, info = _json(f"{text_url}/api/info")
  assert status == 200 and (info["kind"], info["size"]) == ("text", len(CAPTIONS))
  answer = _upload(text_url, (gallery.folder / "green.png").read_bytes(), k="3")[1]
  expected = search.search(embeddings, CAPTIONS,
                           search.embed_query(embedder, image=gallery.folder / "green.png"), k=3)
  assert [(hit["item"], hit["thumb"]) for hit in answer["results"]] == [
      (caption, None) for caption, _ in expected]
  np.testing.assert_allclose([hit["score"] for hit in answer["results"]],
                             [score for _, score in expected], atol=1e-5)
  texts = _json(f"{text_url}/api/search?q=a+blue+triangle&k=2")[1]["results"]
  assert [hit["item"] for hit in texts] == [caption for caption, _ in search.search(
      embeddings, CAPTIONS, search.embed_query(embedder, text="a blue triangle"), k=2)]
  similar = _json(f"{text_url}/api/similar?item=4&k=1")[1]["results"]
  assert similar[0]["item"] == CAPTIONS[4] and similar[0]["score"] == pytest.approx(1, abs=1e-4)
  assert _json(f"{text_url}/thumb/0") == (404, {"error": "a text index has no images"})


def _command_line(*args):
  """Runs `python -m cots_jax.search ARGS` in this process: its flags parsed, then its main."""
  search.FLAGS.unparse_flags()
  search.main(search.FLAGS(["cots_jax.search", *args]))


def test_an_embedding_width_mismatch_is_refused(embedder, exported_run, trained_run, tmp_path):
  with pytest.raises(ValueError, match="the index holds 24-dim embeddings, the model"):
    serve.Searcher(np.eye(24)[:2], ["a", "b"], {"kind": "text"}, embedder)
  wide = tmp_path / "wide.npz"
  search.save_index(wide, np.eye(24)[:2], ["a", "b"],
                    {"kind": "text", "export": str(exported_run), "embed_dim": 24})
  with pytest.raises(SystemExit, match=re.escape(
      "cots_jax.search serve: error: the index holds 24-dim embeddings, the model {'export': "
      f"'{exported_run}'}} embeds in 16 dims: query it with the index's own model")):
    _command_line("serve", f"--index={wide}", f"--port={free_port()}")
  with pytest.raises(SystemExit, match="serve: error: --step and --encoder pick a run's"):
    _command_line("serve", f"--index={wide}", f"--export={exported_run}", "--step=6")
  with pytest.raises(SystemExit, match="serve: error: give at most one of --workdir and --export"):
    _command_line("serve", f"--index={wide}", f"--export={exported_run}",
                  f"--workdir={trained_run}")


def test_the_serve_command_answers(gallery, exported_run, tmp_path):
  """`python -m cots_jax.search serve` with the index's own model, until it is stopped."""
  port = free_port()
  with open(tmp_path / "serve.log", "w+", encoding="utf-8") as log:
    child = subprocess.Popen(
        [sys.executable, "-m", "cots_jax.search", "serve", f"--index={gallery.index}",
         f"--port={port}"], cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
      info = _wait_for_info(f"http://127.0.0.1:{port}", child, log)
      assert info["model"] == {"export": str(exported_run)} and info["size"] == len(gallery.items)
      answer = _json(f"http://127.0.0.1:{port}/api/similar?item=2&k=1")[1]
      assert answer["results"][0]["row"] == 2
    finally:
      child.terminate()
      child.wait(timeout=30)
    log.seek(0)
    assert (f"serving the image index of {len(gallery.items)} items at "
            f"http://127.0.0.1:{port}/ (Ctrl-C stops)") in log.read()


def _wait_for_info(base, child, log, timeout=240):
  """The /api/info answer of the server starting in CHILD (its output in LOG), once it answers."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if child.poll() is not None:
      log.seek(0)
      pytest.fail(f"the server exited with {child.returncode}:\n{log.read()[-3000:]}")
    try:
      return _json(f"{base}/api/info")[1]
    except urllib.error.URLError:
      time.sleep(0.2)
  pytest.fail(f"the server did not answer in {timeout} s")


def test_concurrent_queries_all_answer(url, searcher, gallery, monkeypatch):
  """200 queries (text, "more like this", image upload) from 8 threads against the running
  server: every one answers 200, and the model is never called by two threads at once."""
  active, most = [0], [0]
  guard = threading.Lock()

  def one_at_a_time(function):
    def counted(*args):
      with guard:
        active[0] += 1
        most[0] = max(most[0], active[0])
      try:
        return function(*args)
      finally:
        with guard:
          active[0] -= 1
    return counted

  monkeypatch.setattr(searcher, "embedder", dataclasses.replace(
      searcher.embedder, texts=one_at_a_time(searcher.embedder.texts),
      images=one_at_a_time(searcher.embedder.images)))
  png = (gallery.folder / "cyan.png").read_bytes()

  def query(number):
    start = time.perf_counter()
    if number % 3 == 0:
      status = _json(f"{url}/api/search?q=query+number+{number}&k=10")[0]
    elif number % 3 == 1:
      status = _json(f"{url}/api/similar?item={number % len(gallery.items)}&k=10")[0]
    else:
      status = _upload(url, png, k="10")[0]
    return status, time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(query, range(200)))
  assert [status for status, _ in answers] == [200] * 200
  assert most[0] == 1
  latencies = np.array([seconds for _, seconds in answers]) * 1000
  print(f"200 queries from 8 threads: p50 {np.percentile(latencies, 50):.0f} ms, "
        f"p95 {np.percentile(latencies, 95):.0f} ms, max {latencies.max():.0f} ms")


def _browser():
  """Headless Chromium driven by Debian's chromedriver (explicit paths: nothing is fetched).

  Fails, naming the packages, when they are not installed (.ci/run installs them).
  """
  missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
  if missing:
    pytest.fail(f"{', '.join(missing)} missing: the browser test needs Debian's chromium and "
                "chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does)")
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome import service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--window-size=1200,1000", "--disable-dev-shm-usage",
                   "--disable-gpu"):
    options.add_argument(argument)
  if os.geteuid() == 0:
    options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
  return webdriver.Chrome(service=service.Service(executable_path=CHROMEDRIVER), options=options)


def _texts(driver, selector):
  """The text of every element of the CSS SELECTOR, read in one script (the page may replace
  them between two WebDriver calls)."""
  return driver.execute_script(
      "return [...document.querySelectorAll(arguments[0])].map((found) => found.textContent)",
      selector)


def _wait_for_status(wait, driver, status):
  """Waits until the page's status line reads STATUS: the answer is shown."""
  wait.until(lambda _: _texts(driver, "#status") == [status])


def test_the_page_in_a_browser(url, gallery, tmp_path):
  """Types a query, pages, clicks "more like this" and uploads an image, as a person would."""
  from selenium.webdriver.support import ui  # pylint: disable=g-import-not-at-top
  driver = _browser()
  try:
    wait = ui.WebDriverWait(driver, 60)
    driver.get(url)
    wait.until(lambda _: driver.find_element("id", "query").is_enabled())
    assert "17 images, 16-dim embeddings" in _texts(driver, "#info")[0]
    driver.find_element("id", "search").click()
    wait.until(lambda _: _texts(driver, "#error") == ["the query is empty: type a few words"])
    driver.find_element("id", "query").send_keys("a red square\n")
    _wait_for_status(wait, driver, "results 1–12 of 17 for “a red square”")
    assert len(_texts(driver, "#results .result")) == 12
    wait.until(lambda _: driver.execute_script(
        "return [...document.images].every((image) => image.complete && "
        "(image.naturalWidth > 0 || image.alt === 'escape.png'))"))
    driver.find_element("id", "next").click()
    _wait_for_status(wait, driver, "results 13–17 of 17 for “a red square”")
    assert not driver.find_element("id", "next").is_enabled()
    name = _texts(driver, "#results .name")[1]
    driver.find_elements("css selector", "#results .more")[1].click()
    _wait_for_status(wait, driver, f"results 1–12 of 17 for more like “{name}”")
    assert _texts(driver, "#results .name")[0] == name
    assert float(_texts(driver, "#results .score")[0]) == pytest.approx(1.0, abs=1e-3)
    driver.save_screenshot(str(tmp_path / "serve.png"))
    driver.find_element("id", "upload").send_keys(str(gallery.folder / "green.png"))
    _wait_for_status(wait, driver, "results 1–12 of 17 for the image green.png")
    assert _texts(driver, "#results .name")[0] == "green.png"
  finally:
    driver.quit()
  assert Image.open(tmp_path / "serve.png").format == "PNG"
