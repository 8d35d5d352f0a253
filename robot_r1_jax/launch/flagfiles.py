"""Flagfile recipes that build on one another, read before absl parses the command line.

absl reads a nested `--flagfile=PATH` relative to the working directory, so a recipe that includes
the paper recipe would only work from one folder, and an unknown flag in a file is reported without
the file. `expand` inlines every flagfile itself instead:

- PATH is tried relative to the file that names it (the working directory on the command line),
  then inside the packaged `configs/` folder, so `--flagfile=ablations/rloo.cfg` works from anywhere;
- later lines override earlier ones, as absl's own flagfiles do, so a recipe is a delta on what it
  includes;
- a missing file, an include cycle, a line that is not a flag, or an unknown flag fails naming the
  file and line (`FlagfileError`).

Lines are absl's flagfile syntax: one `--name=value` (or `--name`, `--noname`) per line; blank lines
and lines starting with `#` or `//` are skipped.
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Sequence

from absl import flags

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


class FlagfileError(ValueError):
  """A flagfile is missing, includes itself, or holds a line that is not a known flag."""


def expand(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """`argv` with every `--flagfile` replaced by its flags (recursively); the rest kept as given."""
  out, args = [argv[0]], list(argv[1:])
  while args:
    arg = args.pop(0)
    if arg == "--":  # Everything after it is positional.
      out += [arg, *args]
      break
    if arg in ("--flagfile", "-flagfile"):
      if not args:
        raise FlagfileError("--flagfile needs a path")
      arg = f"--flagfile={args.pop(0)}"
    name = _flagfile(arg)
    if name is None:
      out.append(arg)
    else:
      out += _read(_resolve(name, pathlib.Path.cwd(), "the command line"), flag_values, ())
  return out


def _flagfile(arg: str) -> str | None:
  for prefix in ("--flagfile=", "-flagfile="):
    if arg.startswith(prefix):
      return arg[len(prefix):]
  return None


def _resolve(name: str, base: pathlib.Path, origin: str) -> pathlib.Path:
  path = pathlib.Path(name).expanduser()
  candidates = [path] if path.is_absolute() else [base / path, CONFIGS / path]
  for candidate in candidates:
    if candidate.is_file():
      return candidate.resolve()
  raise FlagfileError(f"flagfile {name} (named in {origin}) not found; looked at "
                      f"{', '.join(str(c) for c in candidates)}")


def _read(path: pathlib.Path, flag_values: flags.FlagValues,
          including: tuple[pathlib.Path, ...]) -> list[str]:
  if path in including:
    chain = " → ".join(str(p) for p in (*including, path))
    raise FlagfileError(f"flagfile {path} includes itself: {chain}")
  out = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    line = line.strip()
    if not line or line.startswith(("#", "//")):
      continue
    where = f"{path}:{number}"
    name = _flagfile(line)
    if name is not None:
      out += _read(_resolve(name, path.parent, where), flag_values, (*including, path))
      continue
    if not line.startswith("-"):
      raise FlagfileError(f"{where}: {line!r} is not a flag (expected --name=value)")
    _check_known(line, flag_values, where)
    out.append(line)
  return out


def _check_known(line: str, flag_values: flags.FlagValues, where: str) -> None:
  name = line.lstrip("-").split("=", 1)[0]
  if name in flag_values:
    return
  if name.startswith("no") and name[2:] in flag_values and flag_values[name[2:]].boolean:
    return
  close = difflib.get_close_matches(name, list(flag_values), n=1)
  hint = f" (did you mean --{close[0]}?)" if close else ""
  raise FlagfileError(f"{where}: unknown flag --{name}{hint}")
