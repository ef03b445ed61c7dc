"""Remote FITS sources (``s3://``, ``https://``, any fsspec URL) -> the same fast walker as local files.

A remote file is fetched into memory in as few requests as the object store needs, then its bytes go through
`ray_hrc.chips.read_fits` exactly as a local file's do (`map_fits` -> `_read_selected`, astropy only for the
files the walker declines), into the same `ChipError` records. Two ways to fetch, both bounded:

* ``whole`` (the default): one ranged GET of bytes ``0 .. max_object_bytes``: the whole object in one request,
  and an object larger than the cap is refused after reading at most ``max_object_bytes + 1`` bytes.
* ``ranges``: the object's size (one HEAD), then its headers and only the SCI extensions' data, by byte range,
  each SCI range read with the next headers behind it: 4 requests for a raw ACS/WFC3 file, and ERR/DQ data
  (calibrated files) never fetched. The buffer is the object's size but zero-filled by the kernel on demand,
  so skipped data cost no memory.

``whole`` measures faster on the local S3 server for raw files (bench section ``s3``: raw ERR/DQ extensions hold
no data, so both read the same bytes and ``ranges`` only adds round trips); ``ranges`` is there for calibrated
files, where it skips two thirds of the bytes.

Memory per read: at most ``max_object_bytes`` (default 256 MiB; a raw file is about 35 MB, a calibrated one
about 170 MB) of fetched bytes, plus the chips cropped from them (16 MiB each for raw files).

Transient failures (timeouts, dropped connections, 5xx answers) are retried ``attempts`` times in all, with
exponential back-off and jitter, and no new try after ``deadline_s``; the filesystem's own retries are turned off
where this module builds it, so that the bound is this one. Connect and read timeouts make a server that never
answers an ``unreadable`` error row, not a hung task: after at most ``attempts`` x (``connect_timeout_s`` +
``read_timeout_s``) plus the back-offs (about 100 s by default). A missing object, a refused credential or another
4xx answer is not retried. (An HTTP server that ignores the Range header sends the whole object: the cap is then
checked after the fact; S3 honours it.)

No Ray here: `read_remote` is what `read_fits` calls for a remote URI, in any process.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 2880  # FITS block size
MIB = 2**20


@dataclass(frozen=True)
class FetchConfig:
    """How a remote file is fetched: requests, bounds, retries and timeouts."""

    mode: str = "whole"  # "whole": one GET of the object; "ranges": HEAD, then headers + SCI data by byte range
    max_object_bytes: int = 256 * MIB  # larger objects are refused (an `unreadable` row); bounds memory per read
    attempts: int = 4  # tries in all for a transient failure (timeout, dropped connection, 5xx), then an error row
    backoff_s: float = 0.25  # first back-off; doubled each retry, with up to 50% random jitter
    deadline_s: float = 120.0  # no new attempt starts after this many seconds on one file
    connect_timeout_s: float = 5.0  # per connection attempt
    read_timeout_s: float = 20.0  # longest wait for the next bytes of an answer
    readahead_bytes: int = 64 * 1024  # ranges mode: bytes read past each range, to get the next headers with it
    max_hdus: int = 64  # ranges mode: a file with more HDUs than this is fetched whole instead

    def __post_init__(self):
        if self.mode not in ("whole", "ranges"):
            raise ValueError(f"FetchConfig.mode is {self.mode!r}; expected 'whole' or 'ranges'")
        if self.attempts < 1 or self.max_object_bytes < BLOCK:
            raise ValueError(f"FetchConfig needs attempts >= 1 and max_object_bytes >= {BLOCK}; got {self}")

    @classmethod
    def from_dict(cls, d: dict | None) -> FetchConfig:
        return cls(**(d or {}))

    def to_dict(self) -> dict:
        return asdict(self)


class FetchError(Exception):
    """A remote object that could not be fetched: the message names the URI, the attempts and the last error."""


class _Permanent(Exception):
    """Not worth retrying: the object is missing, forbidden or too large."""


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, _Permanent)

_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}
_FS_LOCK = threading.Lock()


def filesystem(uri: str, storage_options: dict | None, config: FetchConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for `uri` with `config`'s timeouts and no retries of its own, and the path in it.

    Built once per process for each (protocol, options, config): fsspec's shared instance for the same options
    keeps its own retries for other callers (listing, writing catalogs).
    """
    protocol = fsspec.utils.get_protocol(uri)
    cls = fsspec.get_filesystem_class(protocol)
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        conf = dict(options.get("config_kwargs") or {})
        conf.setdefault("connect_timeout", config.connect_timeout_s)
        conf.setdefault("read_timeout", config.read_timeout_s)
        conf.setdefault("retries", {"total_max_attempts": 1})  # botocore's retries off: ours are the bound
        options["config_kwargs"] = conf
    elif protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault(
            "timeout", aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s)
        )
        options["client_kwargs"] = client
    key = (protocol, fsspec.utils.tokenize(options), config.connect_timeout_s, config.read_timeout_s)
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = cls(skip_instance_cache=True, **options)
            if hasattr(fs, "retries"):
                fs.retries = 1  # s3fs retries timeouts and dropped connections 5 times by default
            _FILESYSTEMS[key] = fs
    return fs, cls._strip_protocol(uri)


def _is_client_error(exc: BaseException) -> bool:
    """An HTTP 4xx answer other than 408 (timeout) and 429 (slow down): asking again gets the same answer."""
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _with_retries(uri: str, what: str, call, config: FetchConfig, started: float) -> Any:
    """`call()` until it succeeds, a permanent error, `config.attempts` tries, or `config.deadline_s`."""
    last: BaseException | None = None
    for attempt in range(1, config.attempts + 1):
        try:
            return call()
        except _PERMANENT:
            raise
        except Exception as exc:  # noqa: BLE001 - backends raise their own types (botocore, aiohttp, OSError)
            if _is_client_error(exc):
                raise _Permanent(f"{uri} could not be fetched ({what}): {type(exc).__name__}: {exc}") from exc
            last = exc
        wait = config.backoff_s * 2 ** (attempt - 1) * (1 + 0.5 * random.random())
        if attempt == config.attempts or time.monotonic() - started + wait > config.deadline_s:
            break
        logger.info(
            "%s: %s failed (%s: %s); retry %d of %d in %.2f s", uri, what, type(last).__name__, last, attempt, config.attempts - 1, wait
        )
        time.sleep(wait)
    raise FetchError(
        f"{uri} could not be fetched ({what}) after {attempt} attempt(s) in {time.monotonic() - started:.1f} s: "
        f"{type(last).__name__}: {last}"
    ) from last


def _fetch_whole(fs, path: str, uri: str, config: FetchConfig, started: float) -> bytes:
    """The whole object in one GET of at most ``max_object_bytes + 1`` bytes (a ranged GET: no HEAD first)."""
    data = _with_retries(uri, "GET", lambda: fs.cat_file(path, start=0, end=config.max_object_bytes + 1), config, started)
    if len(data) > config.max_object_bytes:
        raise _Permanent(
            f"{uri} is larger than max_object_bytes={config.max_object_bytes} ({config.max_object_bytes / MIB:.0f} MiB); "
            "expected a Hubble raw or calibrated file (about 35 MB raw); raise read.fetch.max_object_bytes to read it"
        )
    return data


def _header_cards(buf: np.ndarray, start: int, stop: int) -> tuple[int, dict[str, str]] | None:
    """(end of the header, its structural cards) if the header at `start` ends (END card) before `stop`."""
    cards: dict[str, str] = {}
    for block in range(start, stop - BLOCK + 1, BLOCK):
        raw = buf[block : block + BLOCK].tobytes()
        for i in range(0, BLOCK, 80):
            key = raw[i : i + 8].rstrip().decode("ascii", "replace")
            if key == "END":
                return block + BLOCK, cards
            if raw[i + 8 : i + 10] == b"= " and (key in ("BITPIX", "PCOUNT", "GCOUNT", "EXTNAME") or key.startswith("NAXIS")):
                cards[key] = raw[i + 10 : i + 80].decode("ascii", "replace").split("/", 1)[0].strip().strip("'").strip()
    return None


def _fetch_ranges(fs, path: str, uri: str, config: FetchConfig, started: float) -> np.ndarray | bytes:
    """The object's headers and SCI data in a zero-filled buffer of its size; ERR/DQ data are not fetched.

    Anything unexpected in the headers (no END within reach, a size past the object) falls back to `_fetch_whole`,
    so that the walker and astropy judge the file from all its bytes.
    """
    size = int(_with_retries(uri, "HEAD", lambda: fs.info(path)["size"], config, started))
    if size > config.max_object_bytes:
        raise _Permanent(f"{uri} has {size} bytes, more than max_object_bytes={config.max_object_bytes}; expected a Hubble raw file")
    buf = np.zeros(size, np.uint8)  # calloc: pages never written are never touched
    have: list[tuple[int, int]] = []  # byte ranges fetched

    def ensure(start: int, stop: int) -> None:
        if any(a <= start and stop <= b for a, b in have):
            return
        stop = min(size, max(stop, start + config.readahead_bytes))
        data = _with_retries(uri, "GET range", lambda: fs.cat_file(path, start=start, end=stop), config, started)
        buf[start : start + len(data)] = np.frombuffer(data, np.uint8)
        have.append((start, start + len(data)))

    pos = 0
    for _ in range(config.max_hdus):
        if pos >= size:
            return buf
        ensure(pos, pos + BLOCK)
        found = _header_cards(buf, pos, max(b for a, b in have if a <= pos < b))
        if found is None:  # a header longer than the read-ahead: read up to 1 MiB more once
            ensure(pos, min(size, pos + MIB))
            found = _header_cards(buf, pos, max(b for a, b in have if a <= pos < b))
        if found is None:
            break
        data_start, cards = found
        try:
            bitpix, naxis = abs(int(cards["BITPIX"])), int(cards["NAXIS"])
            axes = [int(cards[f"NAXIS{i}"]) for i in range(1, naxis + 1)]
            nbytes = bitpix // 8 * int(cards.get("GCOUNT", 1)) * (int(cards.get("PCOUNT", 0)) + (math.prod(axes) if naxis else 0))
        except (KeyError, ValueError):
            break
        end = data_start + -(-nbytes // BLOCK) * BLOCK
        if nbytes < 0 or end > size:
            break
        if nbytes and cards.get("EXTNAME", "").upper() == "SCI":
            ensure(data_start, end + config.readahead_bytes)  # and the next headers with it
        pos = end
    logger.info("%s: headers not as expected for a range read; fetching it whole", uri)
    return _fetch_whole(fs, path, uri, config, started)


def fetch(
    uri: str,
    storage_options: dict | None = None,
    config: FetchConfig = FetchConfig(),
    fs: fsspec.AbstractFileSystem | None = None,
) -> bytes | np.ndarray:
    """The bytes of a remote FITS file (`config.mode`), or `FetchError` naming the URI and the last error.

    `fs` is a ready filesystem for the URI (its own timeouts and retries then apply, inside ours); by default one is
    built from `storage_options` (`filesystem`).
    """
    started = time.monotonic()
    if fs is None:
        fs, path = filesystem(uri, storage_options, config)
    else:
        path = fs._strip_protocol(uri)
    try:
        if config.mode == "ranges":
            return _fetch_ranges(fs, path, uri, config, started)
        return _fetch_whole(fs, path, uri, config, started)
    except _Permanent as exc:
        raise FetchError(str(exc)) from exc
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise FetchError(f"{uri} could not be opened: no such object ({exc})") from exc
    except PermissionError as exc:
        raise FetchError(f"{uri} could not be opened: access denied ({exc})") from exc


def read_remote(
    uri: str,
    hdus: list[int] | None = None,
    storage_options: dict | None = None,
    config: FetchConfig | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
) -> list:
    """The chips (and error records) of one remote FITS file: `fetch`, then `read_fits` on its bytes.

    Never raises for a bad file or a failed fetch: the file becomes one ``unreadable`` `ChipError` per requested HDU.
    """
    from ray_hrc.chips import ChipError, read_fits

    try:
        data = fetch(uri, storage_options, config or FetchConfig(), fs)
    except FetchError as exc:
        logger.warning("%s", exc)
        return [ChipError(uri, h, "unreadable", str(exc)) for h in (hdus or [-1])]
    return read_fits(memoryview(data), uri=uri, hdus=hdus)
