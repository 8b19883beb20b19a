"""A real GCS JSON-API server on loopback (the PyPI package gcp-storage-emulator), for gs:// tests.

The clients reach it through their emulator settings, which `environment(url)` returns:
gcsfs (the fsspec GCS client behind etils.epath, so behind our path layer, orbax's metadata
and TFDS) reads STORAGE_EMULATOR_HOST; TensorStore (orbax's array storage) reads
TENSORSTORE_GCS_HTTP_URL and takes a fixed bearer token instead of Google credentials.

Run as a script, this file is the server: the emulator with one gap closed. Real GCS sends an
object's generation as the `x-goog-generation` header of every media download; the emulator
(2026.7.19) leaves it out, and TensorStore then records a malformed generation and fails the
next conditional read ("Malformed StorageGeneration"), which OCDBT checkpoints written by
several processes always make.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "bucket"


def environment(url: str) -> dict[str, str]:
  return {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "GOOGLE_CLOUD_PROJECT": "emulator",
    "EPATH_USE_TF": "false",
    # The emulator serves the JSON API, not the storage-control API that gcsfs asks (and,
    # failing, asks again on every call) whether a bucket has a hierarchical namespace.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


@contextlib.contextmanager
def running(log_path: str):
  """Starts the server with an empty in-memory bucket BUCKET; yields its URL; stops it."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "w") as log:
    server = subprocess.Popen(
      [
        sys.executable,
        os.path.abspath(__file__),
        "start",
        "--host=127.0.0.1",
        f"--port={port}",
        "--in-memory",
        f"--default-bucket={BUCKET}",
      ],
      stdout=log,
      stderr=subprocess.STDOUT,
    )
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).close()
        break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"The GCS emulator did not start; see {log_path}.") from None
        time.sleep(0.2)
    yield url
  finally:
    server.terminate()
    server.wait(timeout=10)


def set_environment(url: str) -> dict[str, str]:
  """Points this process's clients at the server; returns the previous values to restore."""
  previous = {}
  for key, value in environment(url).items():
    previous[key] = os.environ.get(key)
    os.environ[key] = value
  return previous


def _serve(argv: list[str]) -> None:
  """The emulator's command line, its media downloads carrying the object's generation."""
  from gcp_storage_emulator.handlers import objects

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  objects.download = download_with_generation  # before the server module binds its routes
  from gcp_storage_emulator import __main__ as emulator

  emulator.main(argv)


if __name__ == "__main__":
  _serve(sys.argv[1:])
