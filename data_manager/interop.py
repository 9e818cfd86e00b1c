"""Interop: streamed range reads, DataFrames/Arrow tables, and CSV/Parquet import and export.

Everything here takes a :class:`~data_manager.router.DataRouter` and uses its public API:

* :func:`iter_candles` streams candles of a range in time windows of ``batch_size`` bars
  (``DataRouter.iter_ticks`` already streams ticks through a server-side cursor), so memory
  stays bounded however long the range is.
* :func:`get_candles_df` / :func:`get_ticks_df` return a pandas or polars ``DataFrame`` or a
  pyarrow ``Table``, built column by column from the stream (no list of models is kept).
  The libraries are optional extras: ``pip install 'data_manager[pandas]'`` (``[polars]``,
  ``[arrow]``); asking for a missing one raises :class:`ConfigurationError` naming the extra.
* :func:`import_file` reads ticks or candles from CSV or Parquet, validates every row with
  the models, stores the good rows through the bulk methods (COPY on PostgreSQL) in batches
  and reports the rejected ones by reason with their line numbers. Reading and validating the
  next batch runs in a worker thread while the previous one is being stored.
* :func:`export_file` streams a range into CSV or Parquet, a chunk at a time.

A ``.tsv`` file is CSV separated by tabs, on import and on export; every other CSV name
(``.csv``, ``.txt``, ``-``) is separated by commas.

Column layout (import, export and DataFrames): the model's fields, in :data:`TICK_COLUMNS` /
:data:`CANDLE_COLUMNS` order. Times are Unix ms in CSV and ``timestamp[ms, UTC]`` in Parquet
and DataFrames; an import accepts Unix ms, ISO-8601 with a timezone, or aware datetimes.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

from data_manager._tasks import finish_despite_cancel
from data_manager.errors import ConfigurationError, ValidationError
from data_manager.models import (
    MAX_SOURCE_LENGTH,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    CandleData,
    TickData,
    _check_count,
    _check_text,
    epoch_ms_range,
    normalize_symbol,
    timeframe_ms,
    to_epoch_ms,
)

if TYPE_CHECKING:
    from data_manager.router import DataRouter

__all__ = [
    "CANDLE_COLUMNS",
    "MIN_WINDOW_BARS",
    "TICK_COLUMNS",
    "DataFrameBackend",
    "ExportReport",
    "FileFormat",
    "ImportReport",
    "Kind",
    "RejectReason",
    "detect_format",
    "export_file",
    "get_candles_df",
    "get_ticks_df",
    "import_file",
    "iter_candles",
    "parse_timestamp",
]

Kind = Literal["ticks", "candles"]
FileFormat = Literal["csv", "parquet"]
DataFrameBackend = Literal["pandas", "polars", "arrow"]
_ColumnType = Literal["str", "float", "int", "bool", "time"]

#: Stored tick fields and their column types, in file order (``mid``/``spread`` are derived
#: and only added to DataFrames).
TICK_COLUMNS: Final[tuple[tuple[str, _ColumnType], ...]] = (
    ("symbol", "str"),
    ("timestamp", "time"),
    ("bid", "float"),
    ("ask", "float"),
    ("source", "str"),
    ("volume", "float"),
    ("exchange", "int"),
    ("event_type", "str"),
    ("use_case", "str"),
    ("bid_size", "float"),
    ("ask_size", "float"),
    ("last_price", "float"),
    ("last_size", "float"),
    ("aggressor", "str"),
    ("seq", "int"),
    ("received_at", "time"),
)
#: Candle fields and their column types, in file order.
CANDLE_COLUMNS: Final[tuple[tuple[str, _ColumnType], ...]] = (
    ("symbol", "str"),
    ("timeframe", "str"),
    ("timestamp", "time"),
    ("open", "float"),
    ("high", "float"),
    ("low", "float"),
    ("close", "float"),
    ("source", "str"),
    ("volume", "float"),
    ("vwap", "float"),
    ("range_pips", "float"),
    ("num_trades", "int"),
    ("start_time", "time"),
    ("end_time", "time"),
    ("event_type", "str"),
    ("is_closed", "bool"),
)
_DERIVED_TICK_COLUMNS: Final[tuple[tuple[str, _ColumnType], ...]] = (
    ("mid", "float"),
    ("spread", "float"),
)
_SPECS: Final[dict[str, tuple[tuple[str, _ColumnType], ...]]] = {
    "ticks": TICK_COLUMNS,
    "candles": CANDLE_COLUMNS,
}
_MODELS: Final[dict[str, type[TickData] | type[CandleData]]] = {
    "ticks": TickData,
    "candles": CandleData,
}
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "ticks": ("symbol", "timestamp", "bid", "ask", "source"),
    "candles": ("symbol", "timeframe", "timestamp", "open", "high", "low", "close", "source"),
}
_EXTRAS: Final = {"pandas": "pandas", "polars": "polars", "arrow": "arrow", "pyarrow": "arrow"}
#: Smallest read window of :func:`iter_candles`, in bars: empty stretches of a long range
#: (an export from 1973 on) then cost a few thousand queries at most, at ~10 MB a window.
MIN_WINDOW_BARS: Final = 10_000
#: How many line numbers each reject reason keeps for the report.
FIRST_LINES_KEPT: Final = 5
#: Text columns whose empty value is a value of its own, not a missing one: an empty
#: ``event_type`` is kept as ``""`` (not replaced by the model's default) when the file
#: format tells an empty string from a missing value (Parquet; CSV cannot).
_EMPTY_IS_A_VALUE: Final = frozenset({"event_type", "use_case"})
_NUMBER: Final = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_QUOTED: Final = re.compile(r"'[^']*'")


def _require_module(name: str) -> Any:
    """Import an optional dependency or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        extra = _EXTRAS.get(name.split(".")[0], name)
        msg = f"{name} is not installed; install it with: pip install 'data_manager[{extra}]'"
        raise ConfigurationError(msg) from exc


# --------------------------------------------------------------------------- time values


def parse_timestamp(value: object, *, field: str = "timestamp") -> int:
    """Unix ms from Unix ms (int or digit string), ISO-8601 text with a timezone, or an aware
    datetime.

    Raises:
        ValidationError: A naive time, an unparsable string, or a value outside the range the
            models accept (plainly seconds or nanoseconds).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():  # the common case in files: skip the regular expressions
            return to_epoch_ms(int(text), field=field)
        if re.fullmatch(r"-?\d+", text):
            return to_epoch_ms(int(text), field=field)
        if re.fullmatch(r"-?\d+\.0*", text):
            return to_epoch_ms(int(text.split(".")[0]), field=field)
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            msg = f"{field} {value!r} is neither Unix ms nor ISO-8601 with a timezone"
            raise ValidationError(msg) from None
        if parsed.tzinfo is None:
            msg = f"{field} {value!r} has no timezone; add a Z or +hh:mm suffix"
            raise ValidationError(msg)
        return to_epoch_ms(parsed, field=field)
    return to_epoch_ms(value, field=field)


# --------------------------------------------------------------------------- streaming reads


async def iter_candles(
    router: DataRouter,
    symbol: str,
    timeframe: str,
    start: int | datetime,
    end: int | datetime,
    *,
    source: str | None = None,
    batch_size: int = 10_000,
) -> AsyncIterator[CandleData]:
    """Stream candles whose bucket starts in ``[start, end)``, oldest first.

    The range is read in windows of ``max(batch_size, MIN_WINDOW_BARS)`` bars (one
    primary-key range scan each), so only one window's candles are held at a time. The end
    is first clamped to the newest candle, so an open-ended range does not scan the future;
    an empty stretch still costs one cheap query per window. Without ``source`` the source is
    chosen once, as :meth:`DataRouter.get_candles` chooses it (the strategy's preferred
    sources, else the one with the newest candle), and used for the whole range.

    Raises:
        ValidationError: Unknown timeframe, naive datetimes, ``end`` before ``start``, a
            ``source`` that is not a valid source name (checked and trimmed as writes do),
            or a ``batch_size`` that is not a positive int (as ``iter_ticks`` refuses it).
    """
    _check_count(batch_size, "batch_size")
    sym = normalize_symbol(symbol)
    bar_ms = timeframe_ms(timeframe)
    start_ms, end_ms = epoch_ms_range(start, end)
    if source is not None:
        source = _check_text(source, field="source", max_length=MAX_SOURCE_LENGTH)
    # The database get_candles reads (replicas only if its route names them), so the end
    # is not clamped to a lagging replica's newest candle.
    db = router._db_for(router.strategy.routing.get_candles)
    newest = await db.latest_candles(
        sym,
        timeframe,
        1,
        source=source,
        preferred_sources=router.strategy.sources.candle_preference,
    )
    if not newest:
        return
    source = newest[-1].source
    end_ms = min(end_ms, newest[-1].timestamp + 1)
    window = max(batch_size, MIN_WINDOW_BARS) * bar_ms
    cursor = start_ms
    while cursor < end_ms:
        upper = min(end_ms, cursor + window)
        for candle in await router.get_candles(sym, timeframe, cursor, upper, source=source):
            yield candle
        cursor = upper


# --------------------------------------------------------------------------- DataFrames


class _Columns:
    """Column-wise accumulation of models (one list per column, no model kept)."""

    __slots__ = ("_getters", "data", "spec")

    def __init__(self, spec: Sequence[tuple[str, _ColumnType]]) -> None:
        self.spec = tuple(spec)
        self.data: dict[str, list[Any]] = {name: [] for name, _ in self.spec}
        self._getters = [(self.data[name].append, name) for name, _ in self.spec]

    def add(self, item: TickData | CandleData) -> None:
        values = item.__dict__
        for append, name in self._getters:
            # mid/spread are computed properties, not in __dict__.
            append(values[name] if name in values else getattr(item, name))

    def __len__(self) -> int:
        return len(self.data[self.spec[0][0]])

    def clear(self) -> None:
        for column in self.data.values():
            column.clear()


def _to_frame(columns: _Columns, backend: DataFrameBackend) -> Any:
    if backend == "arrow":
        return _arrow_table(columns)
    if backend == "pandas":
        pd = _require_module("pandas")
        data: dict[str, Any] = {}
        for name, kind in columns.spec:
            values = columns.data[name]
            if kind == "time":
                data[name] = pd.to_datetime(pd.array(values, dtype="Int64"), unit="ms", utc=True)
            elif kind == "int":
                data[name] = pd.array(values, dtype="Int64")
            elif kind == "bool":
                data[name] = pd.array(values, dtype="boolean")
            elif kind == "float":
                data[name] = pd.array(values, dtype="Float64").astype("float64")
            else:
                data[name] = pd.array(values, dtype="string")
        return pd.DataFrame(data)
    if backend == "polars":
        pl = _require_module("polars")
        types = {
            "str": pl.Utf8,
            "float": pl.Float64,
            "int": pl.Int64,
            "bool": pl.Boolean,
            "time": pl.Int64,
        }
        series = []
        for name, kind in columns.spec:
            s = pl.Series(name, columns.data[name], dtype=types[kind])
            if kind == "time":
                s = s.cast(pl.Datetime("ms", "UTC"))
            series.append(s)
        return pl.DataFrame(series)
    msg = f"unknown DataFrame backend {backend!r}; expected pandas, polars or arrow"
    raise ValidationError(msg)


def _arrow_schema(spec: Sequence[tuple[str, _ColumnType]]) -> Any:
    pa = _require_module("pyarrow")
    types = {
        "str": pa.string(),
        "float": pa.float64(),
        "int": pa.int64(),
        "bool": pa.bool_(),
        "time": pa.timestamp("ms", tz="UTC"),
    }
    return pa.schema([(name, types[kind]) for name, kind in spec])


def _arrow_table(columns: _Columns) -> Any:
    pa = _require_module("pyarrow")
    return pa.Table.from_pydict(columns.data, schema=_arrow_schema(columns.spec))


async def get_ticks_df(
    router: DataRouter,
    symbol: str,
    start: int | datetime,
    end: int | datetime,
    *,
    source: str | None = None,
    backend: DataFrameBackend = "pandas",
    batch_size: int = 10_000,
) -> Any:
    """Ticks in ``[start, end)`` as a pandas/polars ``DataFrame`` or a pyarrow ``Table``.

    Columns: :data:`TICK_COLUMNS` plus ``mid`` and ``spread``; times are UTC with millisecond
    resolution. The ticks are streamed (``iter_ticks``) into per-column lists, so the only
    large allocation is the result itself.

    Raises:
        ConfigurationError: The backend's library is not installed (names the extra).
        ValidationError: Bad arguments (naive datetimes, ``end`` before ``start``, ...).
    """
    if backend not in ("pandas", "polars", "arrow"):
        msg = f"unknown DataFrame backend {backend!r}; expected pandas, polars or arrow"
        raise ValidationError(msg)
    _require_module("pyarrow" if backend == "arrow" else backend)
    columns = _Columns(TICK_COLUMNS + _DERIVED_TICK_COLUMNS)
    async for tick in router.iter_ticks(symbol, start, end, source=source, batch_size=batch_size):
        columns.add(tick)
    return _to_frame(columns, backend)


async def get_candles_df(
    router: DataRouter,
    symbol: str,
    timeframe: str,
    start: int | datetime,
    end: int | datetime,
    *,
    source: str | None = None,
    backend: DataFrameBackend = "pandas",
    batch_size: int = 10_000,
) -> Any:
    """Candles whose bucket starts in ``[start, end)`` as a DataFrame or an Arrow table.

    Columns: :data:`CANDLE_COLUMNS`; ``timestamp`` is the bucket start (UTC, ms). The source
    is chosen as in :func:`iter_candles`.

    Raises:
        ConfigurationError: The backend's library is not installed (names the extra).
        ValidationError: Bad arguments.
    """
    if backend not in ("pandas", "polars", "arrow"):
        msg = f"unknown DataFrame backend {backend!r}; expected pandas, polars or arrow"
        raise ValidationError(msg)
    _require_module("pyarrow" if backend == "arrow" else backend)
    columns = _Columns(CANDLE_COLUMNS)
    async for candle in iter_candles(
        router, symbol, timeframe, start, end, source=source, batch_size=batch_size
    ):
        columns.add(candle)
    return _to_frame(columns, backend)


# --------------------------------------------------------------------------- files


def detect_format(path: str | os.PathLike[str], explicit: str | None = None) -> FileFormat:
    """``csv`` or ``parquet``: ``explicit`` when given, else from the file name's suffix
    (``.csv``/``.txt``/``.tsv`` or ``-``; ``.parquet``/``.pq``). Compressed CSV is not read.

    Raises:
        ValidationError: Unknown format or suffix.
    """
    if explicit is not None:
        fmt = explicit.lower()
        if fmt not in ("csv", "parquet"):
            msg = f"unknown file format {explicit!r}; expected csv or parquet"
            raise ValidationError(msg)
        return fmt  # type: ignore[return-value]
    name = os.fspath(path).lower()
    if name == "-" or name.endswith((".csv", ".txt", ".tsv")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    msg = f"cannot tell the format of {os.fspath(path)!r} from its name; pass --format"
    raise ValidationError(msg)


def _csv_delimiter(path: str | os.PathLike[str]) -> str:
    """A tab for ``.tsv`` files, else a comma."""
    return "\t" if os.fspath(path).lower().endswith(".tsv") else ","


@dataclass
class RejectReason:
    """Rows refused for one reason."""

    count: int = 0
    first_lines: list[int] = field(default_factory=list)
    example: str = ""


@dataclass
class ImportReport:
    """What :func:`import_file` did.

    Attributes:
        rows: Data rows read (header excluded).
        accepted: Rows that passed validation.
        rejected: Rows that did not (see ``reasons``).
        stored: Rows the database reported as new (ticks) or inserted/changed (candles);
            re-importing a file stores nothing new.
        reasons: Rejected rows per reason: count, first line numbers, one full message.
        last_line: Line (CSV) or row number (Parquet) up to which every accepted row is
            stored.
        interrupted: The import was cancelled (signal) before the end of the file. The
            batch being written at that moment may or may not have been committed (it is
            all or nothing); the counters only include batches known to be stored.
    """

    path: str
    kind: str
    format: str
    rows: int = 0
    accepted: int = 0
    rejected: int = 0
    stored: int = 0
    batches: int = 0
    seconds: float = 0.0
    last_line: int = 0
    interrupted: bool = False
    reasons: dict[str, RejectReason] = field(default_factory=dict)

    def reject(self, line: int, key: str, message: str) -> None:
        """Count one rejected row."""
        self.rejected += 1
        reason = self.reasons.get(key)
        if reason is None:
            reason = self.reasons[key] = RejectReason(example=message)
        reason.count += 1
        if len(reason.first_lines) < FIRST_LINES_KEPT:
            reason.first_lines.append(line)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "path": self.path,
            "kind": self.kind,
            "format": self.format,
            "rows": self.rows,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "stored": self.stored,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "last_line": self.last_line,
            "interrupted": self.interrupted,
            "reasons": {
                key: {"count": r.count, "first_lines": r.first_lines, "example": r.example}
                for key, r in sorted(self.reasons.items(), key=lambda kv: -kv[1].count)
            },
        }


def _reason_key(exc: ValidationError) -> str:
    """A reason that groups rows refused for the same cause (values stripped out)."""
    cause = exc.__cause__
    errors = getattr(cause, "errors", None)
    if callable(errors):
        parts = []
        for err in errors(include_url=False, include_input=False):
            loc = ".".join(str(p) for p in err["loc"])
            text = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {text}" if loc else text)
        text = "; ".join(parts)
    else:
        text = str(exc)
    return _QUOTED.sub("'…'", _NUMBER.sub("N", text))


class _RowSource:
    """Rows of one file as ``(line, mapping)``; blocking I/O (run it in a worker thread)."""

    columns: list[str]
    total: int | None  # progress total (bytes or rows)
    unit: str
    #: The format tells an empty string from a missing value (Parquet's null; CSV has none).
    empty_is_not_missing: bool = False

    def position(self) -> int:
        raise NotImplementedError

    def rows(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        """Yield ``(line, values)``, or ``(line, problem)`` for a row that cannot be read."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _CsvSource(_RowSource):
    unit = "bytes"

    def __init__(self, path: Path) -> None:
        self._raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self.total = os.fstat(self._raw.fileno()).st_size
            # newline="" lets the csv module handle quoted line breaks; utf-8-sig drops a BOM.
            self._text = io.TextIOWrapper(self._raw, encoding="utf-8-sig", newline="")
            self._reader = csv.reader(self._text, delimiter=_csv_delimiter(path))
            # The first read decodes a whole chunk (~8 KB), so a bad byte several lines
            # below the header, or a broken header, fails here: as in rows(), that is the
            # file's problem (ValidationError), not a crash.
            try:
                header = next(self._reader, None)
            except csv.Error as exc:
                line = max(1, self._reader.line_num)
                msg = f"CSV syntax error near line {line}: {exc}"
                raise ValidationError(msg) from exc
            except UnicodeDecodeError as exc:
                raise self._not_utf8(exc, max(1, self._reader.line_num)) from exc
        except BaseException:
            self._raw.close()
            raise
        if not header:
            self.close()
            msg = f"{path} is empty (no header line)"
            raise ValidationError(msg)
        self.columns = [h.strip() for h in header]

    def position(self) -> int:
        # The text layer reads ahead in chunks: this is where the reader is, give or take one.
        return self._raw.tell()

    def rows(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        header = self.columns
        width = len(header)
        reader = self._reader
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != width:
                    yield reader.line_num, f"expected {width} fields, found {len(row)}"
                    continue
                yield reader.line_num, dict(zip(header, row, strict=True))
        except csv.Error as exc:
            msg = f"CSV syntax error near line {reader.line_num}: {exc}"
            raise ValidationError(msg) from exc
        except UnicodeDecodeError as exc:
            raise self._not_utf8(exc, reader.line_num) from exc

    def _not_utf8(self, exc: UnicodeDecodeError, near: int) -> ValidationError:
        """The error for a byte that is not UTF-8, naming the line that holds it.

        The text layer decodes what it just read (plus any bytes it held back), so the bad
        byte's offset in the file follows from where the binary file is now; the lines
        before it are counted by reading the file again (once, on this failure only).
        ``near`` (the reader's last line) is the fallback.
        """
        line = near
        with contextlib.suppress(OSError, ValueError):
            offset = self._raw.tell() - len(exc.object) + exc.start
            if offset >= 0:
                line = 1 + _count_newlines(self._raw.fileno(), offset)
        return ValidationError(f"the file is not UTF-8 text (near line {line})")

    def close(self) -> None:
        self._text.close()  # closes the binary file under it too


def _count_newlines(fd: int, size: int) -> int:
    """Newlines in the first ``size`` bytes of the open file ``fd`` (position untouched)."""
    count = 0
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count


class _ParquetSource(_RowSource):
    unit = "rows"
    empty_is_not_missing = True

    def __init__(self, path: Path, batch_size: int) -> None:
        pq = _require_module("pyarrow.parquet")
        try:
            self._file = pq.ParquetFile(path)
        except (OSError, ValueError) as exc:
            msg = f"cannot read {path} as Parquet: {exc}"
            raise ValidationError(msg) from exc
        self.columns = list(self._file.schema_arrow.names)
        self.total = int(self._file.metadata.num_rows)
        self._batch = max(1, batch_size)
        self._row = 0

    def position(self) -> int:
        return self._row

    def rows(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        for batch in self._file.iter_batches(batch_size=self._batch):
            for values in batch.to_pylist():
                self._row += 1
                yield self._row, values

    def close(self) -> None:
        self._file.close()


def _open_source(path: Path, fmt: FileFormat, batch_size: int) -> _RowSource:
    try:
        if fmt == "csv":
            return _CsvSource(path)
        return _ParquetSource(path, batch_size)
    except FileNotFoundError as exc:
        msg = f"no such file: {path}"
        raise ValidationError(msg) from exc
    except IsADirectoryError as exc:
        msg = f"{path} is a folder, not a file"
        raise ValidationError(msg) from exc
    except PermissionError as exc:
        msg = f"cannot read {path}: permission denied"
        raise ValidationError(msg) from exc


class _RowParser:
    """Turns file rows into models; collects refusals in the report (worker thread)."""

    def __init__(
        self,
        kind: Kind,
        columns: Sequence[str],
        defaults: dict[str, str],
        report: ImportReport,
        *,
        empty_is_not_missing: bool = False,
    ) -> None:
        self._model = _MODELS[kind]
        spec = dict(_SPECS[kind])
        allowed = set(spec) | {"timestamp_ms"}
        if kind == "ticks":
            allowed |= {name for name, _ in _DERIVED_TICK_COLUMNS}
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            msg = f"column(s) {', '.join(map(repr, repeated))} given more than once"
            raise ValidationError(msg)
        unknown = [c for c in columns if c not in allowed]
        if unknown:
            msg = (
                f"unknown column(s) {', '.join(map(repr, unknown))}; expected some of "
                f"{', '.join(n for n, _ in _SPECS[kind])}"
            )
            raise ValidationError(msg)
        present = set(columns) | set(defaults)
        if "timestamp_ms" in present:
            present.add("timestamp")
        missing = [c for c in _REQUIRED[kind] if c not in present]
        if missing:
            hints = {"symbol": "--symbol", "source": "--source", "timeframe": "--timeframe"}
            extra = [hints[m] for m in missing if m in hints]
            tail = f" (or pass {', '.join(extra)})" if extra else ""
            msg = f"missing column(s) {', '.join(map(repr, missing))}{tail}"
            raise ValidationError(msg)
        self._times = {n for n, t in spec.items() if t == "time"} | {"timestamp_ms"}
        self._keep_empty = _EMPTY_IS_A_VALUE if empty_is_not_missing else frozenset()
        self._defaults = defaults
        self._report = report

    def parse(
        self, rows: Iterator[tuple[int, dict[str, Any] | str]], limit: int
    ) -> tuple[list[Any], int, bool]:
        """Read until ``limit`` models are ready or the rows end: (models, last line, ended)."""
        out: list[Any] = []
        report = self._report
        line = 0
        for line, values in rows:
            report.rows += 1
            if isinstance(values, str):
                report.reject(line, _NUMBER.sub("N", values), values)
                continue
            try:
                out.append(self._model(**self._prepare(values)))
            except ValidationError as exc:
                report.reject(line, _reason_key(exc), str(exc))
                continue
            if len(out) >= limit:
                return out, line, False
        return out, line, True

    def _prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        # Absent (None or empty) cells are left out, so the model's defaults apply; an
        # empty event_type stays "" where the format can tell it from a missing value.
        keep = self._keep_empty
        data = {k: v for k, v in values.items() if v is not None and (v != "" or k in keep)}
        for key in self._times.intersection(data):
            data[key] = parse_timestamp(data[key], field=key)
        for key, value in self._defaults.items():
            data.setdefault(key, value)
        return data


async def import_file(
    router: DataRouter,
    path: str | os.PathLike[str],
    *,
    kind: Kind,
    symbol: str | None = None,
    source: str | None = None,
    timeframe: str | None = None,
    batch_size: int = 10_000,
    file_format: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    report: ImportReport | None = None,
) -> ImportReport:
    """Import ticks or candles from a CSV or Parquet file.

    Every row is validated by the model; refused rows are counted per reason (with their
    first line numbers) and skipped, the others are stored with ``save_ticks`` /
    ``save_candles_bulk`` in batches of ``batch_size`` (COPY on PostgreSQL). Writes are
    idempotent, so importing a file again, or again after an interruption, is safe.

    Args:
        router: An open router.
        path: The file (``.csv`` with a header line, ``.tsv`` the same with tabs, or
            ``.parquet``).
        kind: ``"ticks"`` or ``"candles"``.
        symbol: Symbol for rows without one (a missing column, or an empty cell).
        source: Source for rows without one.
        timeframe: Timeframe for candle rows without one.
        batch_size: Rows per stored batch.
        file_format: ``"csv"`` or ``"parquet"``; default from the file name.
        progress: Called as ``progress(position, total)`` after each batch (bytes for CSV,
            rows for Parquet).
        report: A report to fill (lets a caller read it after a cancellation).

    Returns:
        The report. When the import is cancelled, ``report.interrupted`` is set before the
        ``CancelledError`` propagates; ``report.last_line`` says how far it got.

    Raises:
        ValidationError: Unreadable file, unknown or missing columns, bad arguments.
        DatabaseConnectionError, QueryExecutionError, ...: The database failed a batch (the
            batches before it are stored).
    """
    if kind not in _MODELS:
        msg = f"unknown kind {kind!r}; expected ticks or candles"
        raise ValidationError(msg)
    if batch_size < 1:
        msg = f"batch_size must be at least 1, got {batch_size}"
        raise ValidationError(msg)
    defaults = {"symbol": symbol, "source": source}
    if kind == "candles":
        defaults["timeframe"] = timeframe
        if timeframe is not None:
            timeframe_ms(timeframe)
    given = {k: v for k, v in defaults.items() if v is not None}
    file = Path(path)
    fmt = detect_format(file, file_format)
    report = report or ImportReport(path=str(file), kind=kind, format=fmt)
    report.format = fmt
    started = time.perf_counter()
    src = await asyncio.to_thread(_open_source, file, fmt, batch_size)
    # Parses run in worker threads, which cannot be stopped: each one is awaited (shielded
    # from our own cancellation) before the file is closed under it.
    parses: list[asyncio.Future[tuple[list[Any], int, bool]]] = []
    try:
        parser = _RowParser(
            kind, src.columns, given, report, empty_is_not_missing=src.empty_is_not_missing
        )
        rows = src.rows()
        save = router.save_ticks if kind == "ticks" else router.save_candles_bulk

        def parse_next() -> asyncio.Future[tuple[list[Any], int, bool]]:
            parses.append(asyncio.ensure_future(asyncio.to_thread(parser.parse, rows, batch_size)))
            return parses[-1]

        pending: asyncio.Future[tuple[list[Any], int, bool]] | None = parse_next()
        while pending is not None:
            batch, line, ended = await asyncio.shield(pending)
            parses.remove(pending)  # done: it must not keep its batch alive
            # Validate the next batch while this one is being stored.
            pending = None if ended else parse_next()
            if batch:
                report.stored += await save(batch)
                report.accepted += len(batch)
                report.batches += 1
            report.last_line = max(report.last_line, line)
            if progress is not None:
                progress(src.position(), src.total)
    except asyncio.CancelledError:
        report.interrupted = True
        raise
    finally:
        report.seconds = time.perf_counter() - started
        await finish_despite_cancel(_close_after_parses(src, parses))
    return report


async def _close_after_parses(src: _RowSource, parses: list[asyncio.Future[Any]]) -> None:
    """Close ``src`` once no parse is reading it any more."""
    running = [f for f in parses if not f.done()]
    if running:
        await asyncio.wait(running)
    for f in parses:
        if not f.cancelled():
            f.exception()  # marks it retrieved; a failure was already raised above
    await asyncio.to_thread(src.close)


@dataclass
class ExportReport:
    """What :func:`export_file` wrote."""

    path: str
    kind: str
    format: str
    rows: int = 0
    per_symbol: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "path": self.path,
            "kind": self.kind,
            "format": self.format,
            "rows": self.rows,
            "per_symbol": self.per_symbol,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
        }


class _Writer:
    """Appends column chunks to a CSV or Parquet file (blocking; run in a worker thread)."""

    def __init__(self, path: str, fmt: FileFormat, spec: Sequence[tuple[str, _ColumnType]]):
        self._spec = tuple(spec)
        self._fmt = fmt
        self._stdout = path == "-"
        self._parquet: Any = None
        self._text: TextIO | None = None
        if fmt == "parquet":
            if self._stdout:
                msg = "Parquet cannot be written to standard output; name a file"
                raise ValidationError(msg)
            pq = _require_module("pyarrow.parquet")
            self._schema = _arrow_schema(self._spec)
            self._parquet = pq.ParquetWriter(path, self._schema, compression="zstd")
        else:
            self._text = sys.stdout if self._stdout else open(path, "w", newline="")  # noqa: SIM115
            self._csv = csv.writer(self._text, delimiter=_csv_delimiter(path), lineterminator="\n")
            self._csv.writerow([name for name, _ in self._spec])

    def write(self, data: dict[str, list[Any]]) -> None:
        if self._parquet is not None:
            pa = _require_module("pyarrow")
            self._parquet.write_table(pa.Table.from_pydict(data, schema=self._schema))
            return
        columns = []
        for name, kind in self._spec:
            values = data[name]
            if kind == "float":
                columns.append(["" if v is None else repr(v) for v in values])
            elif kind == "bool":
                columns.append(["" if v is None else ("true" if v else "false") for v in values])
            else:
                columns.append(["" if v is None else v for v in values])
        self._csv.writerows(zip(*columns, strict=True))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        elif self._text is not None:
            if self._stdout:
                self._text.flush()
            else:
                self._text.close()


def _open_writer(target: str, fmt: FileFormat, spec: Sequence[tuple[str, _ColumnType]]) -> _Writer:
    """A :class:`_Writer` for ``target``; a path that cannot be written is a ValidationError."""
    try:
        return _Writer(target, fmt, spec)
    except FileNotFoundError as exc:
        msg = f"cannot write {target}: no such folder {os.path.dirname(target) or '.'!r}"
        raise ValidationError(msg) from exc
    except IsADirectoryError as exc:
        msg = f"cannot write {target}: it is a folder, not a file"
        raise ValidationError(msg) from exc
    except OSError as exc:
        msg = f"cannot write {target}: {exc.strerror or exc}"
        raise ValidationError(msg) from exc


async def export_file(
    router: DataRouter,
    path: str | os.PathLike[str],
    *,
    kind: Kind,
    symbols: Sequence[str],
    timeframe: str | None = None,
    source: str | None = None,
    start: int | datetime | None = None,
    end: int | datetime | None = None,
    file_format: str | None = None,
    batch_size: int = 10_000,
    progress: Callable[[int], None] | None = None,
    report: ExportReport | None = None,
) -> ExportReport:
    """Stream ticks or candles of ``symbols`` in ``[start, end)`` into a CSV or Parquet file.

    Rows go out ``batch_size`` at a time (one Parquet row group per chunk), so memory stays
    bounded. Ticks stream through :meth:`DataRouter.iter_ticks` (every source unless
    ``source`` is given); candles through :func:`iter_candles`. ``path`` ``"-"`` writes CSV
    to standard output.

    Args:
        start: Default: the oldest time the models accept.
        end: Default: the newest time the models accept.

    Raises:
        ValidationError: Bad arguments (no symbol, candles without a timeframe, a path in
            a folder that does not exist or cannot be written, ...).
    """
    if kind not in _MODELS:
        msg = f"unknown kind {kind!r}; expected ticks or candles"
        raise ValidationError(msg)
    if not symbols:
        msg = "name at least one symbol to export"
        raise ValidationError(msg)
    if kind == "candles":
        if timeframe is None:
            msg = "exporting candles needs a timeframe"
            raise ValidationError(msg)
        timeframe_ms(timeframe)
    start_ms, end_ms = epoch_ms_range(
        MIN_TIMESTAMP_MS if start is None else start, MAX_TIMESTAMP_MS if end is None else end
    )
    target = os.fspath(path)
    fmt = detect_format(target, file_format)
    report = report or ExportReport(path=target, kind=kind, format=fmt)
    started = time.perf_counter()
    spec = _SPECS[kind]
    writer = await asyncio.to_thread(_open_writer, target, fmt, spec)
    columns = _Columns(spec)
    size = max(1, batch_size)

    async def drain() -> None:
        if len(columns):
            chunk = {name: list(values) for name, values in columns.data.items()}
            columns.clear()
            await asyncio.to_thread(writer.write, chunk)
            if progress is not None:
                progress(report.rows)

    try:
        for raw in symbols:
            sym = normalize_symbol(raw)
            stream: AsyncIterator[TickData | CandleData]
            if kind == "ticks":
                stream = router.iter_ticks(sym, start_ms, end_ms, source=source, batch_size=size)
            else:
                assert timeframe is not None
                stream = iter_candles(
                    router, sym, timeframe, start_ms, end_ms, source=source, batch_size=size
                )
            count = 0
            try:
                async for item in stream:
                    columns.add(item)
                    count += 1
                    report.rows += 1
                    if len(columns) >= size:
                        await drain()
            finally:
                # Releases the server-side cursor (and its connection) at once if we stop early.
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            report.per_symbol[sym] = count
        await drain()
    except asyncio.CancelledError:
        report.interrupted = True
        raise
    finally:
        report.seconds = time.perf_counter() - started
        await asyncio.to_thread(writer.close)
    return report
