"""prepare-data's inputs, read document by document with the place of each, and their identity for resuming.

JSON Lines and text files are read here, line by line from bytes, so that a malformed line, bytes that are not
UTF-8 or a text that is not a string come out as a :class:`BadDocument` at ``file:line`` (1-based) instead of an
error from deep inside a parser. Parquet files and directories saved with ``datasets.save_to_disk`` stream through
Hugging Face ``datasets``; their bad documents are named by file and row index (0-based).

Text files hold one document per line (as ``datasets``' text loader: a trailing ``\\r`` is dropped, empty lines
are empty documents); only ``\\n`` ends a line, so a U+2028 inside a document does not split it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SUFFIX_FORMATS = {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text", "text": "text"}
_UTF8_BOM = b"\xef\xbb\xbf"


class InputError(ValueError):
    """An input that cannot be read at all (missing, empty, unknown format, unreadable); names the file."""


@dataclass(frozen=True)
class BadDocument:
    """A document that cannot be tokenised, in place of its text: where it is and why."""

    where: str  # "corpus.jsonl:12" or "corpus.parquet: row index 3"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def check_inputs(inputs: list[str], fmt: str | None) -> None:
    """Fail before anything is written when an input is missing, empty or of an unknown format."""
    for name in inputs:
        path = Path(name)
        if is_saved_dataset(path):
            if len(inputs) > 1:
                raise InputError(f"{name}: a saved datasets directory must be the only input")
            continue
        if path.is_dir():
            raise InputError(f"{name}: a directory, but not one saved with datasets.save_to_disk")
        if not path.is_file():
            raise InputError(f"{name}: no such input file")
        if path.stat().st_size == 0:
            raise InputError(f"{name}: empty input file (0 bytes); remove it from the inputs")
        format_of(name, fmt)


def format_of(name: str, fmt: str | None) -> str:
    found = fmt or _SUFFIX_FORMATS.get(Path(name).suffix.lower().lstrip("."))
    if found is None:
        raise InputError(f"{name}: cannot tell the format from the file name; pass --format json|parquet|text")
    return found


def describe_inputs(inputs: list[str], text_key: str, fmt: str | None) -> dict:
    """What identifies the input of a run, recorded in progress.json and the manifest.

    NOTE: files are identified by resolved path, size and modification time (ns), not by a content hash: hashing
    would read every input once more before any work (inputs can be terabytes on network storage), while size and
    mtime are what make and rsync trust, and they catch a replaced, appended or edited file. A file that is only
    touched reads as changed: the error is on the side of refusing a resume, never of splicing two inputs.
    """
    files = []
    for name in inputs:
        path = Path(name).resolve()
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            st = member.stat()
            files.append({"path": str(member), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": files, "text_key": text_key, "format": fmt}


def inputs_difference(before: dict, now: dict) -> str | None:
    """The first difference between two :func:`describe_inputs` records (or other descriptions), in words."""
    if before == now:
        return None
    old_files = {f["path"]: f for f in before.get("files", [])}
    new_files = {f["path"]: f for f in now.get("files", [])}
    for path, f in new_files.items():
        if path not in old_files:
            return f"input {path} was not an input of the earlier run"
        old = old_files[path]
        if (old["bytes"], old["mtime_ns"]) != (f["bytes"], f["mtime_ns"]):
            return (f"input {path} changed since the earlier run (size {old['bytes']} -> {f['bytes']} bytes, "
                    f"mtime_ns {old['mtime_ns']} -> {f['mtime_ns']})")
    for path in old_files:
        if path not in new_files:
            return f"input {path} of the earlier run is not an input now"
    if list(old_files) != list(new_files):
        return "the inputs are given in another order than in the earlier run"
    for key in sorted((set(before) | set(now)) - {"files"}):
        if before.get(key) != now.get(key):
            return f"{key} was {before.get(key)!r} in the earlier run, now {now.get(key)!r}"
    return "the input description differs from the earlier run's"


@dataclass
class InputSize:
    """The size of the input in ``unit`` (bytes of json/text files, rows of parquet files and saved datasets), and
    how much of it :func:`read_documents` has read so far (a progress bar's total and position)."""

    total: int
    unit: str  # "B" or " rows"
    read: int = 0


def input_size(inputs: list[str], fmt: str | None) -> InputSize | None:
    """The input's size when it is known without reading it: the sum of the file sizes of json/text inputs, the row
    count of parquet files (from their footers) and saved datasets; None for a mix of the two kinds."""
    if len(inputs) == 1 and is_saved_dataset(Path(inputs[0])):
        import datasets

        ds = datasets.load_from_disk(inputs[0])  # memory-mapped: its length costs no reading
        ds = ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
        return InputSize(len(ds), " rows")
    formats = {format_of(name, fmt) for name in inputs}
    if formats <= {"json", "text"}:
        return InputSize(sum(Path(name).stat().st_size for name in inputs), "B")
    if formats == {"parquet"}:
        import pyarrow.parquet as pq

        return InputSize(sum(pq.read_metadata(name).num_rows for name in inputs), " rows")
    return None


def read_documents(inputs: list[str], text_key: str, fmt: str | None,
                   size: InputSize | None = None) -> Iterator[str | BadDocument]:
    """Each input document's text in order, or a :class:`BadDocument` where it has none; ``size.read`` (if given)
    counts the bytes (json/text) or rows (parquet, datasets) read up to the document last yielded."""
    size = size or InputSize(0, "B")
    if len(inputs) == 1 and is_saved_dataset(Path(inputs[0])):
        yield from _saved_dataset(inputs[0], text_key, size)
        return
    for name in inputs:
        found = format_of(name, fmt)
        if found == "json":
            yield from _json_documents(name, text_key, size)
        elif found == "text":
            yield from _text_documents(name, size)
        else:
            yield from _parquet_documents(name, text_key, size)


def _text_documents(name: str, size: InputSize) -> Iterator[str | BadDocument]:
    with open(name, "rb") as f:
        for lineno, line in enumerate(f, 1):
            size.read += len(line)
            line = line.removesuffix(b"\n").removesuffix(b"\r")
            if lineno == 1:
                line = line.removeprefix(_UTF8_BOM)
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadDocument(f"{name}:{lineno}", f"not UTF-8 (byte {e.start + 1} of the line)")


def _json_documents(name: str, text_key: str, size: InputSize) -> Iterator[str | BadDocument]:
    """JSON Lines (one object per line, blank lines skipped), or one JSON array of objects."""
    with open(name, "rb") as f:
        head = f.read(64).removeprefix(_UTF8_BOM).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # a whole-file array: parsed at once (as datasets does), items by index
            data = f.read()
            size.read += len(data)
            yield from _json_array(name, data.removeprefix(_UTF8_BOM), text_key)
            return
        found = False
        for lineno, line in enumerate(f, 1):
            size.read += len(line)
            if lineno == 1:
                line = line.removeprefix(_UTF8_BOM)
            if line.strip():
                found = True
                yield _json_line(f"{name}:{lineno}", line, text_key)
    if not found:
        raise InputError(f"{name}: no documents (only blank lines)")


def _json_line(where: str, line: bytes, text_key: str) -> str | BadDocument:
    try:
        text = line.decode("utf-8").rstrip("\r\n")  # so that an error's column is on this line
    except UnicodeDecodeError as e:
        return BadDocument(where, f"not UTF-8 (byte {e.start + 1} of the line)")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return BadDocument(where, f"malformed JSON ({e.msg} at column {e.colno})")
    return _text_of(where, row, text_key)


def _json_array(name: str, data: bytes, text_key: str) -> Iterator[str | BadDocument]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 (byte {e.start + 1} of the file)") from e
    except json.JSONDecodeError as e:  # one array: nothing after the error can be read, so no skipping
        raise InputError(f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(rows, list):
        raise InputError(f"{name}: {_json_type(rows)}, neither JSON Lines nor an array of objects")
    for i, row in enumerate(rows):
        yield _text_of(f"{name}: item index {i}", row, text_key)


def _text_of(where: str, row, text_key: str) -> str | BadDocument:
    if not isinstance(row, dict):
        return BadDocument(where, f"{_json_type(row)}, not a JSON object")
    if text_key not in row:
        return BadDocument(where, f"no field {text_key!r} (fields: {sorted(row)[:8]}); set --text-key")
    text = row[text_key]
    if not isinstance(text, str):
        return BadDocument(where, f"field {text_key!r} is {_json_type(text)}, not a string")
    return text


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _parquet_documents(name: str, text_key: str, size: InputSize) -> Iterator[str | BadDocument]:
    import datasets

    stream = datasets.load_dataset("parquet", data_files=[name], split="train", streaming=True)
    yield from _rows(name, stream, text_key, size)


def _saved_dataset(name: str, text_key: str, size: InputSize) -> Iterator[str | BadDocument]:
    import datasets

    ds = datasets.load_from_disk(name)
    ds = ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
    yield from _rows(name, ds.to_iterable_dataset(), text_key, size)


def _rows(name: str, stream, text_key: str, size: InputSize) -> Iterator[str | BadDocument]:
    rows = iter(stream)
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # NOTE: a library boundary: pyarrow/datasets errors do not say which file
            raise InputError(f"{name}: cannot be read ({type(e).__name__}: {e})") from e
        size.read += 1
        yield _text_of(f"{name}: row index {i}", row, text_key)
        i += 1
