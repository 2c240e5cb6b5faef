"""Reading a `.drv` file: Nix's ATerm serialisation of a derivation.

    Derive([("out","/nix/store/...-name","",""),...],      outputs: name, path, hash algo, hash
           [("/nix/store/...-dep.drv",["out"]),...],         input derivations and their outputs
           ["/nix/store/...-source",...],                    input sources
           "x86_64-linux","/nix/store/...-bash",[args],[(name,value),...])

Only what a verifier needs is kept: the outputs' paths, the input derivations and the input
sources. Strings are escaped as Nix prints them (`\\"`, `\\\\`, `\\n`, `\\r`, `\\t`; any other
escaped character stands for itself). Anything malformed raises DerivationError: the bytes
come from an untrusted build pod.
"""

from __future__ import annotations

from dataclasses import dataclass

from niphas_schemas.types import STORE_DIR

from .errors import NixError, StorePathError
from .store_path import StorePath

MAX_DEPTH = 4
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}

Term = str | list["Term"] | tuple["Term", ...]


class DerivationError(NixError, ValueError):
    """A `.drv` that is not a derivation Nix would write."""


@dataclass(frozen=True, slots=True)
class Derivation:
    outputs: dict[str, StorePath | None]
    """Output name -> path (None for a floating content-addressed output, known only once
    built)."""
    input_drvs: dict[StorePath, tuple[str, ...]]
    input_srcs: tuple[StorePath, ...]
    platform: str
    builder: str
    env: dict[str, str]

    @property
    def output_paths(self) -> frozenset[StorePath]:
        return frozenset(p for p in self.outputs.values() if p is not None)

    @property
    def references(self) -> frozenset[StorePath]:
        """What the `.drv` file refers to: its input derivations and sources."""
        return frozenset(self.input_drvs) | frozenset(self.input_srcs)


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> DerivationError:
        near = self.text[self.pos : self.pos + 20]
        return DerivationError(f"malformed derivation at offset {self.pos}: {what} ({near!r})")

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise self.fail(f"expected {token!r}")
        self.pos += len(token)

    def term(self, depth: int = 0) -> Term:
        if depth > MAX_DEPTH:
            raise self.fail("nested too deeply")
        char = self.text[self.pos : self.pos + 1]
        if char == '"':
            return self.string()
        if char in ("[", "("):
            close = "]" if char == "[" else ")"
            items = self.sequence(char, close, depth)
            return items if char == "[" else tuple(items)
        raise self.fail("expected a string, a list or a tuple")

    def sequence(self, open_: str, close: str, depth: int) -> list[Term]:
        self.expect(open_)
        items: list[Term] = []
        while not self.text.startswith(close, self.pos):
            if items:
                self.expect(",")
            items.append(self.term(depth + 1))
        self.pos += 1
        return items

    def string(self) -> str:
        self.expect('"')
        out: list[str] = []
        text, pos = self.text, self.pos
        while True:
            end = min(_find(text, '"', pos), _find(text, "\\", pos))
            if end == len(text):
                self.pos = pos
                raise self.fail("unterminated string")
            out.append(text[pos:end])
            if text[end] == '"':
                self.pos = end + 1
                return "".join(out)
            if end + 1 == len(text):
                self.pos = end
                raise self.fail("unterminated escape")
            out.append(_ESCAPES.get(text[end + 1], text[end + 1]))
            pos = end + 2


def _find(text: str, char: str, start: int) -> int:
    found = text.find(char, start)
    return len(text) if found < 0 else found


def parse_derivation(data: bytes | str, store_dir: str = STORE_DIR) -> Derivation:
    """Parse the contents of a `.drv` file."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise DerivationError(f"a derivation is UTF-8 text: {exc}") from exc
    reader = _Reader(text)
    reader.expect("Derive")
    fields = reader.term()
    if reader.pos != len(text):
        raise reader.fail("trailing bytes")
    if not isinstance(fields, tuple) or len(fields) != 7:
        raise DerivationError("a derivation has 7 fields: Derive(outputs, inputDrvs, ...)")
    outputs, input_drvs, input_srcs, platform, builder, _args, env = fields
    try:
        return Derivation(
            outputs=_outputs(outputs, store_dir),
            input_drvs=_input_drvs(input_drvs, store_dir),
            input_srcs=tuple(StorePath.parse(_str(p), store_dir) for p in _list(input_srcs)),
            platform=_str(platform),
            builder=_str(builder),
            env=dict(_pair(item) for item in _list(env)),
        )
    except StorePathError as exc:
        raise DerivationError(f"malformed derivation: {exc}") from exc


def _outputs(term: Term, store_dir: str) -> dict[str, StorePath | None]:
    outputs: dict[str, StorePath | None] = {}
    for item in _list(term):
        name, path, _algo, _hash = _tuple(item, 4)
        path = _str(path)
        outputs[_str(name)] = StorePath.parse(path, store_dir) if path else None
    if not outputs:
        raise DerivationError("a derivation has at least one output")
    return outputs


def _input_drvs(term: Term, store_dir: str) -> dict[StorePath, tuple[str, ...]]:
    inputs: dict[StorePath, tuple[str, ...]] = {}
    for item in _list(term):
        path, names = _tuple(item, 2)
        drv = StorePath.parse(_str(path), store_dir)
        if not drv.is_derivation:
            raise DerivationError(f"input derivation {drv} is not a .drv")
        inputs[drv] = tuple(_str(n) for n in _list(names))
    return inputs


def _pair(term: Term) -> tuple[str, str]:
    name, value = _tuple(term, 2)
    return _str(name), _str(value)


def _str(term: Term) -> str:
    if not isinstance(term, str):
        raise DerivationError(f"expected a string, not {type(term).__name__}")
    return term


def _list(term: Term) -> list[Term]:
    if not isinstance(term, list):
        raise DerivationError(f"expected a list, not {type(term).__name__}")
    return term


def _tuple(term: Term, size: int) -> tuple[Term, ...]:
    if not isinstance(term, tuple) or len(term) != size:
        raise DerivationError(f"expected a tuple of {size}")
    return term
