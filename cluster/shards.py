"""Input shards, their output files and the manifest that says which are complete (no Ray here).

One input file is one shard. Its output is committed whole (``deltalm.atomic.atomic_output``) and
then recorded in ``DIR/corpus-manifest.json`` with its line count and SHA-256, the identity of the
input (size, modification time) and a fingerprint of everything that decides the output (model,
search options, format). A rerun skips a shard only when all of these still match the file on
disk; anything else (no output, a changed input or option, a file edited since) is redone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..atomic import atomic_output, write_json_atomic
from ..errors import InputError

MANIFEST_NAME = "corpus-manifest.json"
MANIFEST_FORMAT = "deltalm-corpus/1"
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Shard:
    """One input file. ``path`` is as its filesystem names it (``fs``: a pyarrow FileSystem)."""

    index: int
    uri: str  # as given on the command line
    fs: object
    path: str
    size: int
    mtime_ns: int | None
    output: str  # file name in the output directory

    @property
    def identity(self) -> dict:
        return {"input": self.uri, "input_size": self.size, "input_mtime_ns": self.mtime_ns}


def output_name(input_name: str, fmt: str) -> str:
    """``NAME.txt`` -> ``NAME.txt`` (text) or ``NAME.jsonl`` (jsonl); other names keep their
    suffix and gain ``.jsonl``."""
    if fmt == "text":
        return input_name
    return input_name.removesuffix(".txt") + ".jsonl"


GLOB_CHARS = "*?["


def _open(uri: str):
    """(pyarrow FileSystem, path on it) of a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own words
        raise InputError(f"cannot open --input {uri}: {e}") from None


def expand_inputs(inputs: list[str]) -> list[str]:
    """``inputs`` with each wildcard pattern (``*``, ``?``, ``[...]`` within one path component,
    as a shell expands them; local paths and URIs alike: ``s3://bucket/mono/part-*.txt``, where
    ``?`` starts a query and is no wildcard) replaced by the files it matches, sorted. A pattern
    that matches no file is an error; a path that exists as written is taken as written."""
    import pyarrow.fs as pafs

    out = []
    for uri in inputs:
        wildcards = GLOB_CHARS.replace("?", "") if "://" in uri else GLOB_CHARS
        if not any(c in uri for c in wildcards):
            out.append(uri)
            continue
        fs, pattern = _open(uri)
        try:
            if fs.get_file_info(pattern).type != pafs.FileType.NotFound:
                out.append(uri)
                continue
            parts = PurePosixPath(pattern).parts
            fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
            base = str(PurePosixPath(*parts[:fixed])) if fixed else ""
            found = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=fixed < len(parts) - 1))
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot list --input {uri}: {e}") from None
        matches = sorted(
            i.path
            for i in found
            if i.type == pafs.FileType.File
            and len(PurePosixPath(i.path).parts) == len(parts)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(PurePosixPath(i.path).parts, parts))
        )
        if not matches:
            raise InputError(f"--input {uri} matches no file")
        prefix = uri[: len(uri) - len(pattern)] if "://" in uri and uri.endswith(pattern) else ""
        out += [prefix + m for m in matches] if "://" in uri else matches
    return out


def resolve_shards(inputs: list[str], fmt: str, output_dir: Path) -> list[Shard]:
    """The input files (local paths or URIs that pyarrow reads: s3://, gs://, hdfs://...; wildcard
    patterns expanded by ``expand_inputs``), checked to exist, to be files and to map to distinct
    output names."""
    import pyarrow.fs as pafs

    shards, by_output = [], {}
    for uri in expand_inputs(inputs):
        fs, path = _open(uri)
        try:
            info = fs.get_file_info(path)
        except Exception as e:
            raise InputError(f"cannot read --input {uri}: {e}") from None
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input file {uri} does not exist")
        if info.type != pafs.FileType.File:
            raise InputError(f"--input {uri} is not a file")
        name = output_name(PurePosixPath(path).name, fmt)
        if name == MANIFEST_NAME:
            raise InputError(f"--input {uri}: its output name {name} is the manifest's; rename the file")
        if name in by_output:
            raise InputError(f"--input {by_output[name]} and {uri} would both be written to {name}; rename one")
        by_output[name] = uri
        if isinstance(fs, pafs.LocalFileSystem) and Path(path).resolve() == (output_dir / name).resolve():
            raise InputError(f"--input {uri} is its own output file; give another --output directory")
        shards.append(Shard(len(shards), uri, fs, path, int(info.size), info.mtime_ns, name))
    return shards


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a file as ``deltalm translate --input`` reads them: split at ``\\n`` (kept
    off), a last line without newline included, a UTF-8 byte order mark at the start removed
    (``\\r`` is left for the translator, which removes it as ``deltalm translate`` does)."""
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM) :]
    return lines


def fingerprint(values: dict) -> str:
    """A short stable hash of the settings that decide a shard's output."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Manifest:
    """``DIR/corpus-manifest.json``: the shards committed so far. Written by the driver only,
    atomically, after each commit."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / MANIFEST_NAME
        self.shards: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format") == MANIFEST_FORMAT:
                    self.shards = dict(data.get("shards") or {})
            except (OSError, ValueError, AttributeError):
                self.shards = {}  # unreadable: every shard is redone (and the manifest rewritten)

    def is_complete(self, shard: Shard, config: str, output_dir: Path) -> bool:
        """Whether ``shard``'s output is on disk, recorded for this input and these settings,
        and still has the recorded line count and hash."""
        entry = self.shards.get(shard.output)
        if not entry or entry.get("config") != config:
            return False
        if any(entry.get(k) != v for k, v in shard.identity.items()):
            return False
        path = output_dir / shard.output
        if not path.is_file():
            return False
        lines, digest = file_digest(path)
        return lines == entry.get("lines") and digest == entry.get("sha256")

    def commit(self, shard: Shard, config: str, lines: list[str], output_dir: Path) -> None:
        """Writes the shard's output (``lines`` without newlines) atomically, then records it."""
        h = hashlib.sha256()
        with atomic_output(output_dir / shard.output) as f:
            for line in lines:
                data = (line + "\n").encode("utf-8")
                h.update(data)
                f.write(data)
        self.shards[shard.output] = {**shard.identity, "config": config, "lines": len(lines), "sha256": h.hexdigest()}
        write_json_atomic(self.path, {"format": MANIFEST_FORMAT, "shards": self.shards})


def file_digest(path: Path) -> tuple[int, str]:
    """(number of lines, SHA-256) of a file."""
    h, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            lines += block.count(b"\n")
    return lines, h.hexdigest()
