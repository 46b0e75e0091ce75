"""Search in the browser: one local web page and its JSON API over a cots_jax.search index.

  python -m cots_jax.search serve --index=INDEX [--workdir=RUN | --export=DIR] [--step=N]
      [--encoder=online|momentum] [--host=127.0.0.1] [--port=8000]

  GET  /                                 the page (cots_jax/web/index.html)
  GET  /api/info                         {"kind", "size", "embed_dim", "model", "limits"}
  GET  /api/search?q=TEXT&k=K&offset=O   a text query
  POST /api/search_image                 multipart/form-data: file "image", fields k and offset
  GET  /api/similar?item=ROW&k=K&offset=O  "more like this": row ROW's indexed embedding
  GET  /thumb/ROW                        row ROW's image as a JPEG thumbnail (image index)

A search answers {"results": [{"row", "item", "score", "thumb"}], "total", "offset", "k"}: hits
offset .. offset + k - 1 of the exact ranking (retrieval.top_k_chunked) of all `total` rows;
"item" is the image path or caption, "thumb" the row's /thumb URL (null in a text index). Either
query kind searches either index kind. Bad input answers 400 {"error": message}, an upload over
MAX_UPLOAD_BYTES 413, an unknown URL or row 404, a server fault 500 (the traceback goes to the
server's log only). /thumb serves index items only, by row number, and only where the file's real
path (symlinks resolved) lies in the folder of the index's images. A server on a loopback address
answers requests for this machine's names only (Host header), so that no web page elsewhere
reaches it through DNS rebinding.

Starlette is the web framework and uvicorn its server. The blocking work runs in Starlette's
thread pool: the numpy top-k concurrently, the model one call at a time (`Searcher` holds a
lock: the towers are not assumed thread-safe, and a fast tokenizer shared by threads can fail).
"""

import importlib.resources
import io
import ipaddress
import os
import threading

import numpy as np
from PIL import Image
from starlette import applications
from starlette import concurrency
from starlette import datastructures
from starlette import exceptions
from starlette import middleware
from starlette import responses
from starlette import routing
from starlette.middleware import trustedhost
import uvicorn

from cots_jax import search
from cots_jax.data import transforms
from cots_jax.evaluators import retrieval

DEFAULT_K = 12
MAX_K = 100
MAX_QUERY_CHARS = 500
# The whole multipart request of an image query.
MAX_UPLOAD_BYTES = 8 * 2**20
THUMB_SIDE = 256
# The package file of the page.
PAGE = ("web", "index.html")
INTERNAL_ERROR = "internal server error (the server's log has the details)"


class BadRequest(ValueError):
  """Client input out of the API's range: answered 400 with its message."""


class Searcher:
  """An index loaded for serving, with the `search.Embedder` of its queries.

  Attributes:
    embeddings: float32 [n, E] unit rows of the index.
    items: its n image paths or captions.
    meta: its meta dict (kind, embed_dim, model).
    embedder: embeds the queries, one call at a time.
    image_root: the real path of the folder holding every image of an image index (the
      deepest common one), else None; /thumb serves files under it only.
  """

  def __init__(self, embeddings, items, meta, embedder):
    """Raises ValueError when the index's and the embedder's embeddings differ in width."""
    self.embeddings = np.asarray(embeddings, np.float32)
    search.check_embed_dim({**meta, "embed_dim": self.embeddings.shape[1]}, embedder)
    self.items, self.meta, self.embedder = list(items), meta, embedder
    self.image_root = _image_root(self.items) if meta["kind"] == "image" else None
    self._model_lock = threading.Lock()

  def embed_text(self, text):
    """The unit embedding float32 [E] of one caption."""
    with self._model_lock:
      return self.embedder.texts([text])[0]

  def embed_image(self, data):
    """The unit embedding float32 [E] of encoded image bytes.

    Raises:
      BadRequest naming the defect when the bytes do not decode as an image.
    """
    try:
      pixels = self.embedder.pixels(data, "the upload")
    except transforms.BadExampleError as error:
      raise BadRequest(f"the upload is no usable image: {error.reason}") from error
    with self._model_lock:
      return self.embedder.images(pixels[None])[0]

  def results(self, query, k, offset):
    """The response of a search: hits offset .. offset + k - 1 of the ranking of every row by
    dot product with `query` [E] (module docstring)."""
    scores, rows = retrieval.top_k_chunked(np.asarray(query, np.float32)[None], self.embeddings,
                                           offset + k)
    return {"results": [{"row": int(row), "item": self.items[row], "score": float(score),
                         "thumb": self.thumb_url(row)}
                        for row, score in zip(rows[0][offset:], scores[0][offset:])],
            "total": len(self.items), "offset": offset, "k": k}

  def thumb_url(self, row):
    """The /thumb URL of ROW's image, None in a text index."""
    return None if self.image_root is None else f"/thumb/{int(row)}"

  def image_file(self, row):
    """The real path of ROW's image file: an index item, in `image_root` (symlinks resolved).

    Raises:
      HTTPException 404 for a text index, a row out of range, a file gone or outside the folder.
    """
    if self.image_root is None:
      raise exceptions.HTTPException(404, "a text index has no images")
    if not 0 <= row < len(self.items):
      raise exceptions.HTTPException(404, f"no row {row}: the index has {len(self.items)} rows")
    path = os.path.realpath(self.items[row])
    if os.path.commonpath([path, self.image_root]) != self.image_root or not os.path.isfile(path):
      raise exceptions.HTTPException(404, f"row {row}'s image is not in the indexed folder")
    return path


def _image_root(paths):
  """The real path of the deepest folder that holds every one of PATHS (absolute files)."""
  return os.path.realpath(os.path.commonpath([os.path.dirname(path) for path in paths]))


def thumbnail_jpeg(path, side=THUMB_SIDE):
  """The image file PATH (any PIL mode, EXIF orientation applied) shrunk to fit side x side,
  aspect kept, as JPEG bytes.

  Raises:
    transforms.BadExampleError when it does not decode.
  """
  with open(path, "rb") as file:
    image = Image.fromarray(transforms.decode_image(file.read(), path))
  image.thumbnail((side, side))
  encoded = io.BytesIO()
  image.save(encoded, "JPEG", quality=85)
  return encoded.getvalue()


def int_param(value, name, default, low, high):
  """VALUE (a query or form string; None or "" -> `default`) as an int.

  Raises:
    BadRequest unless it is an integer in low .. high.
  """
  if value is None or value == "":
    return default
  try:
    number = int(value)
  except ValueError:
    raise BadRequest(f"{name} must be an integer, got {value!r:.40}") from None
  if not low <= number <= high:
    raise BadRequest(f"{name} must be in {low}..{high}, got {number}")
  return number


def query_text(value):
  """The text query VALUE, stripped.

  Raises:
    BadRequest when it is missing, blank or longer than MAX_QUERY_CHARS.
  """
  text = (value or "").strip()
  if not text:
    raise BadRequest("the query is empty: type a few words")
  if len(text) > MAX_QUERY_CHARS:
    raise BadRequest(f"the query has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
  return text


def _paging(searcher, params):
  """(k, offset) of a request's query or form PARAMS: k in 1..MAX_K, offset in 0..n."""
  return (int_param(params.get("k"), "k", DEFAULT_K, 1, MAX_K),
          int_param(params.get("offset"), "offset", 0, 0, len(searcher.items)))


def _check_upload_length(headers):
  """Checks the Content-Length of an upload before its body is read.

  Raises:
    HTTPException 411 without one, 413 over MAX_UPLOAD_BYTES.
  """
  length = headers.get("content-length", "")
  if not (length.isascii() and length.isdigit()):
    raise exceptions.HTTPException(411, "send the upload with a Content-Length header")
  if int(length) > MAX_UPLOAD_BYTES:
    raise exceptions.HTTPException(
        413, f"the upload has {int(length)} bytes; the limit is {MAX_UPLOAD_BYTES} "
        f"({MAX_UPLOAD_BYTES // 2**20} MiB)")


def _page(request):
  """GET /: the search page."""
  return responses.HTMLResponse(request.app.state.page)


def _info(request):
  """GET /api/info: what the page shows of the index and the model, and the limits."""
  searcher = request.app.state.searcher
  return responses.JSONResponse({
      "kind": searcher.meta["kind"], "size": len(searcher.items),
      "embed_dim": int(searcher.embeddings.shape[1]), "model": searcher.embedder.source,
      "limits": {"default_k": DEFAULT_K, "max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS,
                 "max_upload_bytes": MAX_UPLOAD_BYTES}})


def _search_text(request):
  """GET /api/search?q=TEXT&k=K&offset=O."""
  searcher = request.app.state.searcher
  text = query_text(request.query_params.get("q"))
  k, offset = _paging(searcher, request.query_params)
  return responses.JSONResponse(searcher.results(searcher.embed_text(text), k, offset))


def _similar(request):
  """GET /api/similar?item=ROW&k=K&offset=O: row ROW's indexed embedding is the query."""
  searcher = request.app.state.searcher
  row = int_param(request.query_params.get("item"), "item", None, 0, len(searcher.items) - 1)
  if row is None:
    raise BadRequest("give item=ROW, the row of the index to find more like")
  k, offset = _paging(searcher, request.query_params)
  return responses.JSONResponse(searcher.results(searcher.embeddings[row], k, offset))


async def _search_image(request):
  """POST /api/search_image: the uploaded file "image" is the query."""
  searcher = request.app.state.searcher
  _check_upload_length(request.headers)
  async with request.form(max_files=1, max_fields=2) as form:
    upload = form.get("image")
    if not isinstance(upload, datastructures.UploadFile):
      raise BadRequest("send the image as the file field 'image' of a multipart/form-data "
                       "request")
    k, offset = _paging(searcher, form)
    data = await upload.read()
  query = await concurrency.run_in_threadpool(searcher.embed_image, data)
  return responses.JSONResponse(
      await concurrency.run_in_threadpool(searcher.results, query, k, offset))


def _thumb(request):
  """GET /thumb/ROW: row ROW's image as a JPEG thumbnail (`Searcher.image_file` rules)."""
  path = request.app.state.searcher.image_file(request.path_params["row"])
  try:
    return responses.Response(thumbnail_jpeg(path), media_type="image/jpeg")
  except (OSError, transforms.BadExampleError) as error:
    raise exceptions.HTTPException(404, "the image no longer decodes") from error


def _error_json(status, message, headers=None):
  """The JSON error response {"error": message}."""
  return responses.JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request, error):
  """An HTTPException (an unknown URL among them) as JSON."""
  del request
  return _error_json(error.status_code, error.detail, error.headers)


async def _bad_request(request, error):
  """A BadRequest as 400 JSON."""
  del request
  return _error_json(400, str(error))


async def _internal_error(request, error):
  """Any other exception as 500 JSON without internals (uvicorn logs the traceback)."""
  del request, error
  return _error_json(500, INTERNAL_ERROR)


def read_page():
  """The page's HTML, shipped in the package."""
  return importlib.resources.files("cots_jax").joinpath(*PAGE).read_text(encoding="utf-8")


def allowed_hosts(host):
  """The Host header names answered by a server listening on HOST: this machine's own for a
  loopback address (DNS rebinding), any for another."""
  try:
    loopback = ipaddress.ip_address(host).is_loopback
  except ValueError:
    loopback = host == "localhost"
  if not loopback:
    return ["*"]
  return sorted({"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host})


def make_app(searcher, host="127.0.0.1"):
  """The Starlette app of the page and API over `searcher` (a `Searcher`), to listen on HOST."""
  app = applications.Starlette(
      routes=[routing.Route("/", _page), routing.Route("/api/info", _info),
              routing.Route("/api/search", _search_text),
              routing.Route("/api/search_image", _search_image, methods=["POST"]),
              routing.Route("/api/similar", _similar),
              routing.Route("/thumb/{row:int}", _thumb)],
      middleware=[middleware.Middleware(trustedhost.TrustedHostMiddleware,
                                        allowed_hosts=allowed_hosts(host))],
      exception_handlers={exceptions.HTTPException: _http_error, BadRequest: _bad_request,
                          Exception: _internal_error})
  app.state.searcher, app.state.page = searcher, read_page()
  return app


def make_server(searcher, host="127.0.0.1", port=8000):
  """The uvicorn.Server of `make_app(searcher)` on HOST:PORT (run() serves; warnings only)."""
  return uvicorn.Server(uvicorn.Config(make_app(searcher, host), host=host, port=port,
                                       log_level="warning", access_log=False))


def serve(searcher, host="127.0.0.1", port=8000):
  """Serves the page and API over `searcher` on HOST:PORT until interrupted (Ctrl-C)."""
  server = make_server(searcher, host, port)
  print(f"serving the {searcher.meta['kind']} index of {len(searcher.items)} items at "
        f"http://{host}:{port}/ (Ctrl-C stops)", flush=True)
  server.run()
