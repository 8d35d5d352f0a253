"""Records per second through the grain loader (decode, patches, tokenize, pad, batch) by workers.

python bench/loader_throughput.py [--data DIR] [--episodes 24 --image_size 224 --batch_size 8
    --epochs 2 --workers 0 2 --read_threads 1]

Without --data, writes a synthetic demo tree (the data tests' episode builder) to a temporary folder
and extracts it at --image_size. For each worker count, prints the start-up time (iterator creation
to the first batch: worker spawn, imports, tokenizer) and the steady records/s over the remaining
batches. The loop only touches the batches, so this is the loader's ceiling, not a training rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import tempfile
import time

from absl import flags
import grain

from robot_r1_jax.data import extract, loader, records

from machine import cpu_model

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _synthetic_data(folder: pathlib.Path, episodes: int, image_size: int) -> pathlib.Path:
  """Synthetic pick-like episodes of two tasks, extracted at `image_size`."""
  # The demo builder lives with the data tests; load it by path rather than copy it.
  spec = importlib.util.spec_from_file_location("data_test_helpers",
                                                _REPO / "tests" / "data" / "conftest.py")
  helpers = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(helpers)
  for k in range(episodes):
    helpers.write_episode(folder / "demos", ("task_a", "task_b")[k % 2], k // 2, seed=k)
  extract.extract(folder / "demos", folder / "out",
                  extract.ExtractConfig(image_size=image_size, val_fraction=0.0, progress=False))
  return folder / "out"


def _measure(data_dir: pathlib.Path, config: loader.LoaderConfig) -> tuple[float, float, int]:
  """(seconds to the first batch, records/s after it, records timed)."""
  data = loader.make_loader(data_dir, "train", config, shard=grain.sharding.NoSharding())
  start = time.perf_counter()
  it = iter(data)
  next(it)
  first = time.perf_counter()
  steps = sum(1 for _ in it)
  end = time.perf_counter()
  it.close()
  timed = steps * config.batch_size
  return first - start, timed / (end - first), timed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", type=pathlib.Path, help="An extractor output folder.")
  parser.add_argument("--episodes", type=int, default=24)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--read_threads", type=int, default=1)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; this script uses argparse.

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data or _synthetic_data(pathlib.Path(tmp), args.episodes, args.image_size)
    manifest = records.Manifest.load(data_dir)
    print(f"{data_dir}: {manifest.splits['train'].num_records} train records, image_size "
          f"{manifest.config['image_size']}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.read_threads} read thread(s), CPU: {cpu_model()}")
    for workers in args.workers:
      config = loader.LoaderConfig(batch_size=args.batch_size, num_epochs=args.epochs,
                                   worker_count=workers, read_threads=args.read_threads)
      startup, rate, timed = _measure(data_dir, config)
      print(f"workers={workers}: first batch after {startup:.1f} s, then {rate:.0f} records/s "
            f"({timed} records)")


if __name__ == "__main__":  # grain spawns its workers: without this guard they hang.
  main()
