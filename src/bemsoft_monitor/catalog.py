"""Bemsoft's test catalogue: parsing ``GET /tests``, mapping files, item resolution, cache.

No HTTP here: :class:`CatalogCache` receives a ``fetch`` callable from the caller.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import logging
import os
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import CatalogUnavailable, MapFileError, MonitorError
from .models import CatalogEntry, LisItem
from .oserrors import json_error_reason, json_error_text, os_error_fix, os_error_text

__all__ = [
    "SPECIMEN_DUMMY",
    "Catalog",
    "CatalogCache",
    "CatalogFormatError",
    "MapReloader",
    "ParseReport",
    "Resolution",
    "Resolver",
    "catalog_to_json",
    "load_material_map",
    "load_test_map",
    "normalize_code",
    "normalize_material",
    "parse_catalog",
    "parse_catalog_report",
]

log = logging.getLogger(__name__)

#: Specimen sent in dry-run when no catalogue is loaded (the original monitor's dummy).
SPECIMEN_DUMMY = "SPECIMEN-TEST"

ResolutionStatus = Literal["ok", "missing_code", "not_in_catalog", "ambiguous", "no_catalog"]
CodeSource = Literal["convexames", "codigoexame"]
VariantPolicy = Literal["refuse", "first"]

_MAX_LISTED_VARIANTS = 10


class CatalogFormatError(MonitorError):
    """The body of ``/tests`` (or its saved copy) is not a usable catalogue."""


# --- normalisation ----------------------------------------------------------------------


def normalize_code(code: str | None) -> str:
    """Exam code as compared everywhere: trimmed and case-folded ('' for None)."""
    if code is None:
        return ""
    return str(code).strip().casefold()


_MATERIAL_PREFIX = re.compile(r"^\s*\d+\s*(?:[.)\-–—:]\s*)+")


def _fold(text: str) -> str:
    """Case-fold, strip accents and collapse whitespace."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(plain.casefold().split())


def normalize_material(text: str | None) -> str:
    """Material/specimen name for comparison: '0.Soro', ' SÔRO ', '1 - Soro' -> 'soro'."""
    if not text:
        return ""
    return " ".join(_MATERIAL_PREFIX.sub("", _fold(str(text))).split())


# --- GET /tests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseReport:
    """Result of reading a catalogue body: the entries and what was dropped."""

    entries: list[CatalogEntry]
    skipped: int = 0  # rows without id or specimen.id
    duplicates: int = 0  # repeats of the same id + specimen.id collapsed (the first is kept)
    #: The first few dropped rows, as "posição N: <problem>" (N counts from 1 in the list).
    skipped_examples: tuple[str, ...] = ()
    #: The first few repeated "id/specimen.id" pairs.
    duplicate_examples: tuple[str, ...] = ()


def _snippet(text: str, size: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= size else flat[:size] + "...")


def _decode_body(body: bytes | str | object, source: str) -> object:
    if isinstance(body, (bytes, bytearray)):
        raw = bytes(body)
        try:
            body = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            body = raw.decode("cp1252", errors="replace")
    if body is None:
        raise CatalogFormatError(f'{source}: resposta vazia; esperado JSON {{"tests": [...]}}')
    if not isinstance(body, str):
        return body
    text = body.strip()
    if not text:
        raise CatalogFormatError(
            f'{source}: resposta vazia; esperado JSON {{"tests": [...]}} — verifique '
            "BEMSOFT_BASE_URL e BEMSOFT_TESTS_ENDPOINT"
        )
    if text.startswith("<"):
        raise CatalogFormatError(
            f"{source}: resposta em HTML em vez de JSON (início: {_snippet(text)}); verifique "
            "BEMSOFT_BASE_URL e BEMSOFT_TESTS_ENDPOINT (um proxy ou página de login respondeu)"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogFormatError(
            f"{source}: resposta não é JSON válido (linha {exc.lineno}, coluna {exc.colno}; "
            f"início: {_snippet(text)})"
        ) from None


def _text(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 123.0 from a JSON encoder that writes every number as float
    if isinstance(value, (str, int)):
        return str(value).strip()
    return ""


def _entry(row: object) -> CatalogEntry | str:
    """The entry of one ``/tests`` row, or what is wrong with it (Portuguese)."""
    if not isinstance(row, Mapping):
        return f"não é um objeto JSON ({_snippet(json.dumps(row, ensure_ascii=False), 40)})"
    test_id = _text(row.get("id"))
    label = f'"id": "{test_id}"' if test_id else _snippet(
        json.dumps(row, ensure_ascii=False, default=str), 40)
    specimen = row.get("specimen")
    if not test_id:
        return f'sem "id" ({label})'
    if not isinstance(specimen, Mapping):
        return f'{label} sem "specimen" {{"id": ..., "name": ...}}'
    specimen_id = _text(specimen.get("id"))
    if not specimen_id:
        return f'{label} sem "specimen.id"'
    return CatalogEntry(
        test_id=test_id,
        name=_text(row.get("name")),
        specimen_id=specimen_id,
        specimen_name=_text(specimen.get("name")),
    )


def _variant_key(entry: CatalogEntry) -> tuple[str, str]:
    """The pair that is sent (supportTestId, supportSpecimenId): one variant, whatever its name."""
    return normalize_code(entry.test_id), normalize_code(entry.specimen_id)


_MAX_EXAMPLES = 5


def parse_catalog_report(body: bytes | str | object, *, source: str) -> ParseReport:
    """Read a ``/tests`` body (``{"tests": [...]}`` or a bare list) and report what was dropped.

    Raise :class:`CatalogFormatError` (Portuguese, naming ``source``) when the body is not
    JSON, is HTML, is empty, has another shape, or none of its rows is usable.
    """
    data = _decode_body(body, source)
    if isinstance(data, Mapping):
        if "tests" not in data:
            keys = ", ".join(sorted(str(k) for k in data)[:10]) or "nenhuma"
            raise CatalogFormatError(
                f'{source}: resposta sem a chave "tests" (chaves recebidas: {keys}); '
                'esperado {"tests": [...]}'
            )
        rows = data["tests"]
    else:
        rows = data
    if not isinstance(rows, list):
        raise CatalogFormatError(
            f'{source}: "tests" deveria ser uma lista, veio {type(rows).__name__}; '
            'esperado {"tests": [{"id": ..., "specimen": {"id": ...}}]}'
        )
    unique: dict[tuple[str, str], CatalogEntry] = {}
    skipped: list[str] = []
    duplicates: list[str] = []
    for position, row in enumerate(rows, start=1):
        entry = _entry(row)
        if isinstance(entry, str):
            skipped.append(f"posição {position}: {entry}")
            continue
        key = _variant_key(entry)
        if key in unique:
            duplicates.append(f"{entry.test_id}/{entry.specimen_id}")
        else:
            unique[key] = entry
    if rows and not unique:
        raise CatalogFormatError(
            f'{source}: nenhum dos {len(rows)} itens tem "id" e "specimen.id" (ex.: '
            f'{skipped[0]}); o formato do catálogo da Bemsoft mudou?'
        )
    return ParseReport(
        entries=list(unique.values()),
        skipped=len(skipped),
        duplicates=len(duplicates),
        skipped_examples=tuple(skipped[:_MAX_EXAMPLES]),
        duplicate_examples=tuple(dict.fromkeys(duplicates))[:_MAX_EXAMPLES],
    )


def _more(shown: Sequence[str], total: int) -> str:
    rest = total - len(shown)
    return "; ".join(shown) + (f"; e mais {rest}" if rest > 0 else "")


def parse_catalog(body: bytes | str | object, *, source: str) -> list[CatalogEntry]:
    """Entries of a ``/tests`` body; dropped and repeated rows are named in one WARNING each."""
    report = parse_catalog_report(body, source=source)
    if report.skipped:
        log.warning(
            "catálogo: %d itens sem id ou specimen.id ignorados em %s (%s); os demais exames "
            "seguem em uso — avise a Bemsoft se um exame que você usa estiver entre eles",
            report.skipped,
            source,
            _more(report.skipped_examples, report.skipped),
        )
    if report.duplicates:
        log.warning(
            "catálogo: %d itens repetidos (mesmo id e specimen.id) ignorados em %s (%s); "
            "vale o primeiro de cada",
            report.duplicates,
            source,
            _more(report.duplicate_examples, report.duplicates),
        )
    return report.entries


def catalog_to_json(entries: Sequence[CatalogEntry]) -> list[dict[str, Any]]:
    """Entries back in the ``/tests`` row shape (what :func:`parse_catalog` reads)."""
    return [
        {
            "id": e.test_id,
            "name": e.name,
            "specimen": {"id": e.specimen_id, "name": e.specimen_name},
        }
        for e in entries
    ]


# --- mapping files --------------------------------------------------------------------------

#: One well-formed UTF-8 sequence of an accented letter (two to four bytes).
_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)


def _read_text(path: Path, setting: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise MapFileError(f"arquivo {path} não encontrado; corrija {setting} no .env") from None
    except OSError as exc:
        raise MapFileError(
            f"arquivo {path} não pode ser lido ({os_error_text(exc)}); {os_error_fix(exc)} "
            f"(arquivo indicado em {setting})"
        ) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Notepad's and Excel's "Unicode"
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise MapFileError(
                f"arquivo {path}: UTF-16 corrompido perto do byte {exc.start}; salve o arquivo "
                f"de novo como UTF-8 ({setting})"
            ) from None
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise MapFileError(
            f"arquivo {path}, linha {line}: contém bytes nulos (UTF-16 sem marca de início ou "
            f"arquivo binário); salve como 'CSV UTF-8' ou UTF-8 no Bloco de Notas ({setting})"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_at = exc.start
    line = raw[:bad_at].count(b"\n") + 1
    if _UTF8_MULTIBYTE.search(raw):
        # Real UTF-8 accents next to a byte that is not UTF-8: two encodings in one file.
        # Decoding it all as Windows-1252 would silently turn "Á" into "Ã\x81".
        raise MapFileError(
            f"arquivo {path}, linha {line}: mistura UTF-8 com outra codificação (byte "
            f"0x{raw[bad_at]:02X} inválido); abra o arquivo e salve de novo como UTF-8 "
            f"({setting})"
        )
    try:
        return raw.decode("cp1252")  # Excel's "CSV (separado por vírgulas)" in pt-BR Windows
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise MapFileError(
            f"arquivo {path}, linha {line}: codificação não reconhecida (byte "
            f"0x{raw[exc.start]:02X} não é UTF-8 nem Windows-1252); salve o arquivo como UTF-8 "
            f"({setting})"
        ) from None


class _Pairs(list[tuple[str, Any]]):
    """A JSON object kept as its list of pairs, so repeated keys can be reported."""


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "uma lista [...]"
    if isinstance(value, str):
        return "um texto"
    if value is None:
        return "null"
    return f"um valor {type(value).__name__}"


def _load_json_map(text: str, path: Path, *, setting: str, value_name: str) -> dict[str, str]:
    try:
        data = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as exc:
        msg = json_error_reason(exc) or "JSON inválido"
        if exc.pos == len(text) - len(text.lstrip()):
            # Fails on the very first character: not JSON at all (often a CSV or a note).
            msg = (
                f'o arquivo não é JSON (começa com {_snippet(text.strip(), 30)}); escreva um '
                f'objeto como {{"<código local>": "<{value_name}>"}}'
            )
        raise MapFileError(
            f"arquivo {path}, linha {exc.lineno}, coluna {exc.colno}: {msg}; corrija o JSON "
            f"(arquivo indicado em {setting})"
        ) from None
    if not isinstance(data, _Pairs):
        raise MapFileError(
            f"arquivo {path}: o conteúdo deve ser um objeto JSON "
            f'{{"<código local>": "<{value_name}>"}}, não {_json_kind(data)}'
        )
    result: dict[str, str] = {}
    seen: dict[str, int] = {}  # raw key -> occurrences so far, to find the right line
    for key, value in data:
        seen[key] = seen.get(key, 0) + 1
        where = _key_where(text, path, key, seen[key])
        if not isinstance(value, str) or not value.strip():
            shown = json.dumps(value, ensure_ascii=False)
            raise MapFileError(
                f'{where}, chave "{key}": o valor deve ser um texto não vazio entre '
                f"aspas ({value_name}), veio {_snippet(shown, 40)}; corrija ({setting})"
            )
        norm = normalize_code(key)
        if not norm:
            raise MapFileError(
                f'{where}: chave vazia "{key}"; informe o código local do exame ({setting})'
            )
        if norm in result and result[norm] != value.strip():
            raise MapFileError(
                f'{where}, chave "{key}": aparece mais de uma vez com valores '
                f'diferentes ("{result[norm]}" e "{value.strip()}"); deixe só uma ({setting})'
            )
        result[norm] = value.strip()
    return result


def _key_where(text: str, path: Path, key: str, occurrence: int) -> str:
    """'arquivo X, linha N' for the ``occurrence``-th appearance of ``key`` as a JSON key."""
    forms = dict.fromkeys((json.dumps(key, ensure_ascii=False), json.dumps(key)))
    starts: list[int] = []
    for form in forms:
        starts += [m.start() for m in re.finditer(re.escape(form) + r"\s*:", text)]
    starts.sort()
    if len(starts) < occurrence:
        return f"arquivo {path}"
    return f"arquivo {path}, linha {text.count(chr(10), 0, starts[occurrence - 1]) + 1}"


def load_test_map(path: Path) -> dict[str, str]:
    """Read ``{"<local code>": "<supportTestId>"}``; keys trimmed and case-folded.

    UTF-8 (with or without BOM), UTF-16 with BOM and Windows-1252 are accepted.
    Raise :class:`MapFileError` naming the file (and line/column or key) otherwise.
    """
    text = _read_text(path, "BEMSOFT_TEST_MAP_PATH")
    if not text.strip():
        raise MapFileError(
            f"arquivo {path} está vazio; escreva um objeto JSON como "
            '{"HEMOGRAMA": "HB-001"} ou remova BEMSOFT_TEST_MAP_PATH do .env'
        )
    return _load_json_map(text, path, setting="BEMSOFT_TEST_MAP_PATH", value_name="supportTestId")


_HEADER_CODES = frozenset(
    {
        "codigo",
        "cod",
        "code",
        "exame",
        "teste",
        "test",
        "codigo local",
        "codigo_local",
        "codigo exame",
        "codigoexame",
        "codconvexames",
        "supporttestid",
    }
)
_HEADER_MATERIALS = frozenset(
    {"material", "amostra", "specimen", "especime", "material/amostra", "supportspecimenid"}
)


def _is_header(cells: list[str]) -> bool:
    if normalize_material(cells[0]) in _HEADER_CODES:
        return True
    return len(cells) > 1 and normalize_material(cells[1]) in _HEADER_MATERIALS


def _sniff_delimiter(text: str) -> str:
    first = next(
        (ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), ""
    )
    if ";" in first:
        return ";"
    if "\t" in first:
        return "\t"
    return ","


def _load_material_csv(text: str, path: Path) -> dict[str, str]:
    delim = _sniff_delimiter(text)
    shown = "TAB" if delim == "\t" else delim
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    result: dict[str, str] = {}
    lines: dict[str, int] = {}
    first_row = True
    try:
        for row in reader:
            lineno = reader.line_num
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if first_row:
                first_row = False
                if _is_header(cells):
                    continue
            if len(cells) < 2 or not cells[0] or not cells[1]:
                raise MapFileError(
                    f"arquivo {path}, linha {lineno}: esperado 'código{shown}material', veio "
                    f"{_snippet(shown.join(row))}; corrija a linha (arquivo indicado em "
                    "BEMSOFT_MATERIAL_MAP_PATH)"
                )
            code, material = normalize_code(cells[0]), cells[1]
            if code in result and normalize_material(result[code]) != normalize_material(material):
                raise MapFileError(
                    f'arquivo {path}, linha {lineno}: o código "{cells[0]}" já aparece na '
                    f'linha {lines[code]} com outro material ("{result[code]}"); deixe só uma'
                )
            result.setdefault(code, material)
            lines.setdefault(code, lineno)
    except csv.Error as exc:
        raise MapFileError(
            f"arquivo {path}, linha {reader.line_num}: CSV inválido ({exc}); salve de novo "
            "como CSV separado por ponto e vírgula"
        ) from None
    return result


def load_material_map(path: Path) -> dict[str, str]:
    """Read the material hints: test code (local or support) -> material name or specimen id.

    CSV ``codigo;material`` or ``codigo,material`` (header optional, extra columns ignored,
    lines starting with ``#`` skipped) or a JSON object. Excel's Windows-1252 files work.
    """
    text = _read_text(path, "BEMSOFT_MATERIAL_MAP_PATH")
    if not text.strip():
        raise MapFileError(
            f"arquivo {path} está vazio; escreva linhas 'código;material' (ex.: GLI;PLASMA) "
            "ou remova BEMSOFT_MATERIAL_MAP_PATH do .env"
        )
    if Path(path).suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return _load_json_map(
            text, path, setting="BEMSOFT_MATERIAL_MAP_PATH", value_name="material"
        )
    return _load_material_csv(text, path)


_Stamp = tuple[int, int] | None  # (st_mtime_ns, st_size), None when the file is missing
_MISSING = (-1, -1)


def _stamp(path: Path) -> _Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@dataclass
class _WatchedMap:
    setting: str
    path: Path | None
    load: Callable[[Path], dict[str, str]]
    data: dict[str, str]
    loaded: _Stamp = None
    failed: _Stamp = None
    problem: str | None = None
    reported: bool = False


class MapReloader:
    """The test and material maps, read again when their file changes (no restart needed).

    The files are read at construction and a bad one raises :class:`MapFileError`, so a
    monitor never starts on a broken map. Later, :meth:`refresh` re-reads a file whose time
    or size changed; a change that makes it unusable is logged once as ERROR (file and line)
    and the last good version stays in use, so nothing already resolved is lost.
    """

    def __init__(self, *, test_map_path: Path | None, material_map_path: Path | None) -> None:
        self._maps = (
            self._watch("BEMSOFT_TEST_MAP_PATH", test_map_path, load_test_map),
            self._watch("BEMSOFT_MATERIAL_MAP_PATH", material_map_path, load_material_map),
        )

    @staticmethod
    def _watch(
        setting: str, path: Path | None, load: Callable[[Path], dict[str, str]]
    ) -> _WatchedMap:
        if path is None:
            return _WatchedMap(setting, None, load, {})
        path = Path(path)
        stamp = _stamp(path)
        return _WatchedMap(setting, path, load, load(path), loaded=stamp)

    @property
    def test_map(self) -> dict[str, str]:
        """Local code -> supportTestId, as last read successfully."""
        return self._maps[0].data

    @property
    def material_map(self) -> dict[str, str]:
        """Test code -> material hint, as last read successfully."""
        return self._maps[1].data

    @property
    def problems(self) -> list[str]:
        """Why a changed file is not in use (Portuguese); empty when every file is fine."""
        return [m.problem for m in self._maps if m.problem]

    def refresh(self) -> bool:
        """Re-read the files that changed; True when a map in use changed."""
        changed = False
        for watched in self._maps:
            changed = self._refresh_one(watched) or changed
        return changed

    @staticmethod
    def _refresh_one(watched: _WatchedMap) -> bool:
        if watched.path is None:
            return False
        stamp = _stamp(watched.path) or _MISSING
        if stamp == watched.loaded:
            if watched.problem is not None:
                watched.problem, watched.failed, watched.reported = None, None, False
                log.info("%s: arquivo %s voltou à versão em uso", watched.setting, watched.path)
            return False
        if stamp == watched.failed:
            # Still broken and no longer being written: now it is worth an ERROR.
            if not watched.reported:
                watched.reported = True
                log.error(
                    "%s não recarregado: %s; continua valendo a versão anterior (%d linhas)",
                    watched.setting,
                    watched.problem,
                    len(watched.data),
                )
            return False
        try:
            data = watched.load(watched.path)
        except MapFileError as exc:
            # Reported on the next check only if it stays like this: an editor saving the
            # file may be caught half-way, and that is no reason for an alarm.
            watched.failed, watched.problem, watched.reported = stamp, str(exc), False
            return False
        watched.loaded, watched.failed, watched.problem, watched.reported = stamp, None, None, False
        if data == watched.data:
            return False
        watched.data = data
        log.info(
            "%s recarregado: %s (%d linhas)", watched.setting, watched.path, len(watched.data)
        )
        return True


# --- the catalogue ----------------------------------------------------------------------------


class Catalog:
    """Immutable index of entries by normalised test id."""

    __slots__ = ("_by_id", "_entries", "_keys")

    def __init__(self, entries: Sequence[CatalogEntry]) -> None:
        # One entry per (test, specimen): two names for the same pair are not two variants.
        first: dict[tuple[str, str], CatalogEntry] = {}
        for entry in entries:
            first.setdefault(_variant_key(entry), entry)
        unique = tuple(first.values())
        by_id: dict[str, list[CatalogEntry]] = {}
        for entry in unique:
            by_id.setdefault(normalize_code(entry.test_id), []).append(entry)
        self._entries = unique
        self._by_id = {key: tuple(group) for key, group in by_id.items()}
        self._keys = tuple((_fold(e.test_id), _fold(e.name)) for e in unique)

    @property
    def entries(self) -> tuple[CatalogEntry, ...]:
        """Every entry, in the catalogue's order."""
        return self._entries

    @property
    def test_count(self) -> int:
        """Distinct test ids (a test with three specimens counts once)."""
        return len(self._by_id)

    def variants(self, test_id: str) -> list[CatalogEntry]:
        """Entries (one per specimen) for a test id, trimmed and case-insensitive."""
        return list(self._by_id.get(normalize_code(test_id), ()))

    def search(self, text: str, limit: int = 50) -> list[CatalogEntry]:
        """Entries whose id or name contains ``text`` (accent/case-insensitive), best first."""
        needle = _fold(text or "")
        if not needle:
            return list(self._entries[:limit])
        exact: list[CatalogEntry] = []
        prefix: list[CatalogEntry] = []
        inside: list[CatalogEntry] = []
        for entry, (id_key, name_key) in zip(self._entries, self._keys, strict=True):
            if needle in (id_key, name_key):
                exact.append(entry)
            elif id_key.startswith(needle) or name_key.startswith(needle):
                prefix.append(entry)
            elif needle in id_key or needle in name_key:
                inside.append(entry)
        return (exact + prefix + inside)[: max(limit, 0)]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"Catalog({len(self._entries)} entries, {len(self._by_id)} tests)"


# --- resolution -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    """Outcome of resolving one LIS item: ids to send, or a refusal reason in Portuguese."""

    test_id: str | None
    specimen_id: str | None
    refusal: str | None
    status: ResolutionStatus
    variants: tuple[CatalogEntry, ...] = ()

    @property
    def ok(self) -> bool:
        """True when ``test_id`` and ``specimen_id`` can be sent."""
        return self.status == "ok"

    @property
    def retryable(self) -> bool:
        """True when the same item may resolve later without a person fixing anything."""
        return self.status == "no_catalog"


def _describe_variants(test_id: str, variants: Sequence[CatalogEntry]) -> str:
    shown = [
        f"{v.specimen_id} ({v.specimen_name})" if v.specimen_name else v.specimen_id
        for v in variants[:_MAX_LISTED_VARIANTS]
    ]
    more = len(variants) - len(shown)
    tail = f" e mais {more}" if more > 0 else ""
    return f"{test_id}: {', '.join(shown)}{tail}"


class Resolver:
    """Turns a LIS item into (supportTestId, supportSpecimenId) using maps and the catalogue."""

    def __init__(
        self,
        *,
        catalog: Catalog | None,
        test_map: Mapping[str, str],
        material_map: Mapping[str, str],
        code_source: CodeSource,
        variant_policy: VariantPolicy,
        dry_run: bool,
        material_map_path: Path | None = None,
    ) -> None:
        self.catalog = catalog
        # Keys are normalised again so callers may pass hand-written dicts.
        self.test_map = {normalize_code(k): v.strip() for k, v in test_map.items()}
        self.material_map = {normalize_code(k): v.strip() for k, v in material_map.items()}
        self.code_source = code_source
        self.variant_policy = variant_policy
        self.dry_run = dry_run
        # Only to name the file in refusals; None names the setting alone.
        self.material_map_path = Path(material_map_path) if material_map_path else None

    def with_catalog(self, catalog: Catalog | None) -> Resolver:
        """The same resolver over another catalogue snapshot (after a refresh)."""
        clone = object.__new__(Resolver)
        clone.__dict__.update(self.__dict__)
        clone.catalog = catalog
        return clone

    @property
    def code_column(self) -> str:
        """The LIS column the local code comes from (for messages)."""
        if self.code_source == "codigoexame":
            return "texame.CodigoExame"
        return "ItemSol.CodConvExames"

    def local_code(self, item: LisItem) -> str | None:
        """The item's local exam code, trimmed; None when blank."""
        raw = item.exam_code if self.code_source == "codigoexame" else item.conv_code
        text = str(raw).strip() if raw is not None else ""
        return text or None

    def material_hint(self, local_code: str, support_id: str) -> str | None:
        """Material from the material map, by local code first, then by support code."""
        return self.material_map.get(normalize_code(local_code)) or self.material_map.get(
            normalize_code(support_id)
        )

    def resolve(self, item: LisItem) -> Resolution:
        """Resolve one item; never raises for bad data."""
        code = self.local_code(item)
        if code is None:
            return self._missing_code(item)
        mapped = self.test_map.get(normalize_code(code))
        support_id = mapped if mapped else code.upper()
        if self.catalog is None:
            if self.dry_run:
                return Resolution(support_id, SPECIMEN_DUMMY, None, "ok")
            return Resolution(
                None,
                None,
                "catálogo /tests da Bemsoft indisponível (ainda não carregado); o item será "
                "tentado de novo quando o catálogo carregar — verifique BEMSOFT_TOKEN, "
                "BEMSOFT_BASE_URL e BEMSOFT_TESTS_ENDPOINT",
                "no_catalog",
            )
        variants = self.catalog.variants(support_id)
        if not variants:
            return self._not_in_catalog(item, code, support_id, mapped is not None)
        if len(variants) == 1:
            only = variants[0]
            return Resolution(only.test_id, only.specimen_id, None, "ok", tuple(variants))
        return self._choose_variant(code, support_id, variants)

    # --- refusal builders -----------------------------------------------------------------

    def _missing_code(self, item: LisItem) -> Resolution:
        if self.code_source == "codigoexame":
            extra = (
                " (ItemSol.CodTExame também vazio, o item não aponta para nenhum texame)"
                if item.exam_type_id is None
                else ""
            )
            reason = (
                f"código do exame ausente: coluna texame.CodigoExame vazia{extra}; preencha o "
                "CodigoExame no cadastro de exames do LIS ou use TEST_CODE_SOURCE=convexames"
            )
        else:
            reason = (
                "código do exame ausente: coluna ItemSol.CodConvExames vazia; preencha o código "
                "do convênio do exame no LIS ou use TEST_CODE_SOURCE=codigoexame"
            )
        return Resolution(None, None, reason, "missing_code")

    def _not_in_catalog(
        self, item: LisItem, code: str, support_id: str, was_mapped: bool
    ) -> Resolution:
        origin = " (valor vindo de BEMSOFT_TEST_MAP_PATH)" if was_mapped else ""
        reason = (
            f"exame {support_id} (código local {code}){origin} não existe no catálogo /tests "
            f'da Bemsoft; ajuste BEMSOFT_TEST_MAP_PATH com a linha "{code}": '
            '"<id do exame na Bemsoft>"'
        )
        hints: list[CatalogEntry] = []
        if self.catalog is not None:
            for text in (item.description, item.exam_description):
                if text and text.strip():
                    hints = self.catalog.search(text, limit=3)
                    if hints:
                        break
        if hints:
            names = ", ".join(dict.fromkeys(f"{h.test_id} ({h.name})" for h in hints))
            reason += f"; parecidos no catálogo: {names}"
        return Resolution(None, None, reason, "not_in_catalog")

    def _choose_variant(
        self, code: str, support_id: str, variants: list[CatalogEntry]
    ) -> Resolution:
        hint = self.material_hint(code, support_id)
        matches: list[CatalogEntry] = []
        if hint:
            wanted_id, wanted_name = normalize_code(hint), normalize_material(hint)
            matches = [
                v
                for v in variants
                if normalize_code(v.specimen_id) == wanted_id
                or normalize_material(v.specimen_id) == wanted_name
                or (v.specimen_name and normalize_material(v.specimen_name) == wanted_name)
            ]
            if matches and len({normalize_code(m.specimen_id) for m in matches}) == 1:
                chosen = matches[0]
                return Resolution(chosen.test_id, chosen.specimen_id, None, "ok", tuple(variants))
        elif self.variant_policy == "first":
            # Only without any hint: a hint that matches nothing is a mistake in the map, and
            # guessing the first tube would hide it (sending the wrong tube is a clinical error).
            first = variants[0]
            return Resolution(first.test_id, first.specimen_id, None, "ok", tuple(variants))
        listing = _describe_variants(variants[0].test_id, variants)
        if hint:
            where = (
                f"{self.material_map_path} (BEMSOFT_MATERIAL_MAP_PATH)"
                if self.material_map_path
                else "BEMSOFT_MATERIAL_MAP_PATH"
            )
            what = "nenhuma" if not matches else "mais de uma"
            policy = (
                " (BEMSOFT_VARIANT_POLICY=first não se aplica: ela vale só para exames sem "
                "material indicado)"
                if self.variant_policy == "first"
                else ""
            )
            advice = (
                f'o material "{hint}" indicado para {code} em {where} corresponde a {what} '
                f"das variantes; corrija essa linha usando um dos materiais acima{policy}"
            )
        else:
            example = variants[0].specimen_id
            advice = (
                f'indique o material de {code} no mapa de materiais BEMSOFT_MATERIAL_MAP_PATH: a '
                f'linha "{code};<material>" no CSV (ex.: {code};{example}) ou "{code}": '
                f'"{example}" no JSON (crie o arquivo e defina a variável no .env se ainda não '
                "existirem) — ou, aceitando o risco de tubo errado, BEMSOFT_VARIANT_POLICY=first"
            )
        reason = (
            f"exame {support_id} (código local {code}) tem {len(variants)} variantes de material "
            f"no catálogo da Bemsoft — {listing}; {advice}"
        )
        return Resolution(None, None, reason, "ambiguous", tuple(variants))


# --- cached copy ------------------------------------------------------------------------------

_CACHE_FORMAT = 1
#: A refresh keeping less than this share of the tests in use is taken for a cut answer...
_MIN_KEPT_SHARE = 0.5
#: ...once the copy in use is a real catalogue (tiny test catalogues may change wholesale).
_SHRINK_CHECK_FROM = 20


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, MonitorError):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return json_error_text(exc)
    if isinstance(exc, UnicodeDecodeError):
        return "o arquivo não está em UTF-8"
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(
            exc, ConnectionError):  # a file of ours, not the network
        return os_error_text(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "nunca"
    try:
        return dt.datetime.fromtimestamp(timestamp).strftime("%d/%m/%Y %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(timestamp)


class CatalogCache:
    """Catalogue kept in memory and persisted to a file; a failed refresh keeps the last good copy.

    Refreshes are serialised by a lock; ``refresh_on_miss`` and ``refresh_if_stale`` never
    wait for a refresh already running in another thread. After a failed attempt, neither
    tries again before ``min_refresh_s`` has passed (at most 30 s while no copy exists),
    so an outage does not turn every poll into a ``GET /tests``. Both first take up a newer
    copy another process wrote to the same file (``bemsoft-monitor catalog sync`` while the
    service runs), so a sync by hand reaches the running monitor at once.
    """

    def __init__(
        self,
        *,
        fetch: Callable[[], Sequence[CatalogEntry]],
        path: Path,
        ttl_s: float,
        min_refresh_s: float,
        clock: Callable[[], float] = time.time,
        log_refresh_failures: bool = True,
    ) -> None:
        self._fetch = fetch
        # False for a command that shows ``last_error`` itself: one failure, one line.
        self._log_refresh_failures = log_refresh_failures
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_attempt_at: float | None = None
        self._last_attempt_failed = False
        self.catalog: Catalog | None = None
        self.loaded_at: float | None = None
        self.last_error: str | None = None
        self._file_stamp: _Stamp = None  # the saved copy as last read or written here
        self._load_persisted()

    # --- state ------------------------------------------------------------------------------

    def age_s(self) -> float | None:
        """Seconds since the current snapshot was fetched; None without a snapshot."""
        if self.loaded_at is None:
            return None
        return self._clock() - self.loaded_at

    def require(self) -> Catalog:
        """The current snapshot, or :class:`CatalogUnavailable` when none was ever loaded."""
        catalog = self.catalog
        if catalog is None:
            detail = f": {self.last_error}" if self.last_error else ""
            raise CatalogUnavailable(f"catálogo /tests da Bemsoft indisponível{detail}")
        return catalog

    # --- refreshing -----------------------------------------------------------------------

    def refresh(self, *, accept_shrink: bool = False) -> bool:
        """Fetch now; True on success (copy persisted), False keeping the old copy.

        A catalogue with less than half the tests of the copy in use is refused as
        incomplete unless ``accept_shrink`` (``catalog sync``: a person asked for it).
        """
        with self._lock:
            return self._refresh_locked(accept_shrink=accept_shrink)

    def refresh_if_stale(self) -> bool:
        """Refresh when there is no snapshot or it is older than ``ttl_s``; True when it changed."""
        adopted = self.adopt_newer_copy()
        age = self.age_s()
        stale = self.catalog is None or age is None or age > self.ttl_s or age < 0
        if not stale or self._backing_off():
            return adopted
        return self._try_refresh() or adopted

    def refresh_on_miss(self) -> bool:
        """Refresh because a code was not found; at most once per ``min_refresh_s``."""
        if self.adopt_newer_copy():
            return True
        if self._last_attempt_at is not None:
            since = self._clock() - self._last_attempt_at
            if 0 <= since < self.min_refresh_s:
                return False
        return self._try_refresh()

    def _backing_off(self) -> bool:
        if not self._last_attempt_failed or self._last_attempt_at is None:
            return False
        wait = self.min_refresh_s if self.catalog is not None else min(self.min_refresh_s, 30.0)
        since = self._clock() - self._last_attempt_at
        return 0 <= since < wait

    def _try_refresh(self) -> bool:
        if not self._lock.acquire(blocking=False):
            return False  # another thread is refreshing right now
        try:
            return self._refresh_locked()
        finally:
            self._lock.release()

    def _refresh_locked(self, *, accept_shrink: bool = False) -> bool:
        self._last_attempt_at = self._clock()
        try:
            entries = list(self._fetch())
            if not entries:
                raise CatalogFormatError(
                    "GET /tests devolveu um catálogo vazio (nenhum exame na lista); confira "
                    "BEMSOFT_TESTS_ENDPOINT e se o token tem acesso ao catálogo do laboratório"
                )
            catalog = Catalog(entries)
            if not accept_shrink:
                self._check_not_truncated(catalog)
        except Exception as exc:
            self._last_attempt_failed = True
            self.last_error = f"falha ao atualizar o catálogo /tests: {_describe_error(exc)}"
            if not self._log_refresh_failures:
                pass
            elif self.catalog is not None:
                log.warning(
                    "catálogo não atualizado; usando cópia de %s (%s)",
                    _when(self.loaded_at),
                    self.last_error,
                )
            else:
                log.warning(
                    "catálogo não atualizado; nenhuma cópia disponível (%s)", self.last_error
                )
            return False
        fetched_at = self._clock()
        self.catalog, self.loaded_at, self.last_error = catalog, fetched_at, None
        self._last_attempt_failed = False
        self._persist(catalog, fetched_at)
        log.info("catálogo atualizado: %d itens", len(catalog))
        return True

    def _check_not_truncated(self, new: Catalog) -> None:
        # A first page of a paginated answer, or a proxy cutting the body, would otherwise
        # replace a good catalogue and refuse every exam that vanished from it.
        old = self.catalog
        if old is None or old.test_count < _SHRINK_CHECK_FROM:
            return
        if new.test_count < old.test_count * _MIN_KEPT_SHARE:
            raise CatalogFormatError(
                f"GET /tests devolveu só {new.test_count} exames, e a cópia em uso tem "
                f"{old.test_count}; a resposta parece incompleta (paginação ou corte no "
                "caminho?) — se a redução é real, rode 'bemsoft-monitor catalog sync' para "
                "aceitá-la"
            )

    # --- file -------------------------------------------------------------------------------

    def _persist(self, catalog: Catalog, fetched_at: float) -> None:
        data = {
            "format": _CACHE_FORMAT,
            "fetched_at": fetched_at,
            "fetched_at_text": _when(fetched_at),
            "tests": catalog_to_json(catalog.entries),
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(data, fh, ensure_ascii=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            self._file_stamp = _stamp(self.path)
        except OSError as exc:
            log.warning(
                "cópia do catálogo não gravada em %s (%s); %s (BEMSOFT_CATALOG_CACHE)",
                self.path,
                os_error_text(exc),
                os_error_fix(exc),
            )
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _read_persisted(self) -> tuple[Catalog, float] | None:
        """The saved copy and when it was fetched; None (with a WARNING) when unusable."""
        source = f"cópia local {self.path}"
        try:
            self._file_stamp = _stamp(self.path)
            data = json.loads(self.path.read_bytes().decode("utf-8-sig"))
            if not isinstance(data, dict):
                raise CatalogFormatError(f"{source}: não é um objeto JSON")
            entries = parse_catalog(data, source=source)
            if not entries:
                raise CatalogFormatError(f"{source}: catálogo vazio")
            fetched_at = data.get("fetched_at")
            if isinstance(fetched_at, bool) or not isinstance(fetched_at, (int, float)):
                fetched_at = self.path.stat().st_mtime
        except (OSError, ValueError, MonitorError) as exc:
            log.warning(
                "cópia do catálogo ignorada: %s ilegível (%s); será baixada de novo",
                self.path,
                _describe_error(exc),
            )
            return None
        return Catalog(entries), float(fetched_at)

    def _load_persisted(self) -> None:
        if not self.path.exists():
            return
        copy = self._read_persisted()
        if copy is not None:
            self.catalog, self.loaded_at = copy

    def adopt_newer_copy(self) -> bool:
        """Take up the saved copy when another process wrote a newer one; True when taken.

        Costs one ``stat`` when the file has not changed since it was last read or written.
        """
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._file_stamp:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # a refresh is running here; it will write the file itself
        try:
            copy = self._read_persisted()
            if copy is None:
                return False
            catalog, fetched_at = copy
            if self.loaded_at is not None and fetched_at <= self.loaded_at:
                return False  # older than what is in memory (or our own write)
            self.catalog, self.loaded_at, self.last_error = catalog, fetched_at, None
            self._last_attempt_failed = False
        finally:
            self._lock.release()
        log.info(
            "catálogo atualizado a partir da cópia gravada por outro processo em %s: %d itens, "
            "de %s",
            self.path,
            len(catalog),
            _when(fetched_at),
        )
        return True
