"""Tokenizers that work offline.

Two tokenizers share one small interface (:class:`Tokenizer`):

* ``"mistral"``: the Mistral 7B v1 SentencePiece model (32,000 pieces, byte fallback) that ships
    inside the PyPI wheel ``mistral-common`` as ``mistral_common/data/tokenizer.model.v1``. The file
    is located inside the *installed* package and loaded with ``sentencepiece``; nothing is ever
    downloaded.
* ``"byte"``: UTF-8 bytes 0..255 plus three specials (pad 256, bos 257, eos 258); vocab 259.

``encode`` never adds BOS/EOS; callers (the text pipeline) insert them explicitly.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import pathlib
from typing import Protocol, Sequence, runtime_checkable

MISTRAL_MODEL_RESOURCE = ("mistral_common", "data/tokenizer.model.v1")
MISTRAL_VOCAB_SIZE = 32000
TOKENIZER_NAMES = ("mistral", "byte")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: ids 0..255 are bytes, then pad=256, bos=257, eos=258.

    ``decode`` drops special ids and replaces invalid UTF-8 sequences with U+FFFD.
    """

    name = "byte"
    pad_id = 256
    _BOS = 257
    _EOS = 258

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def bos_id(self) -> int:
        return self._BOS

    @property
    def eos_id(self) -> int:
        return self._EOS

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def mistral_model_path() -> pathlib.Path:
    """Path of ``tokenizer.model.v1`` inside the installed ``mistral-common`` package.

    Raises:
        ModuleNotFoundError: ``mistral-common`` is not installed.
        FileNotFoundError: the installed package lacks the model file.
    """
    package, resource = MISTRAL_MODEL_RESOURCE
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            "The 'mistral' tokenizer needs the PyPI package 'mistral-common', which ships the Mistral "
            "7B v1 SentencePiece model (mistral_common/data/tokenizer.model.v1). Install the pinned "
            "requirements (pip install -r requirements.txt) or use tokenizer='byte'.")
    path = importlib.resources.files(package).joinpath(resource)
    if not path.is_file():
        raise FileNotFoundError(
            f"The installed mistral-common package has no {resource} (looked at {path}); "
            "install the version pinned in requirements.txt.")
    return pathlib.Path(str(path))


class MistralTokenizer:
    """Mistral 7B v1 SentencePiece tokenizer (32,000 pieces: unk=0, bos=1, eos=2).

    Args:
        model_path: optional explicit ``.model`` file; default is the one inside ``mistral-common``.
    """

    name = "mistral"

    def __init__(self, model_path: str | pathlib.Path | None = None):
        try:
            import sentencepiece  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ModuleNotFoundError(
                "The 'mistral' tokenizer needs the PyPI package 'sentencepiece' "
                "(pip install -r requirements.txt), or use tokenizer='byte'.") from e
        self.model_path = pathlib.Path(model_path) if model_path is not None else mistral_model_path()
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"MistralTokenizer.encode expects str, got {type(text).__name__}")
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if not texts:
            return []
        return [list(ids) for ids in self._sp.encode(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"MistralTokenizer(vocab_size={self.vocab_size}, model={self.model_path})"


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer called ``name`` ("mistral" or "byte"); cached per process."""
    if name == "mistral":
        return MistralTokenizer()
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"Unknown tokenizer {name!r}; expected one of {TOKENIZER_NAMES}.")
