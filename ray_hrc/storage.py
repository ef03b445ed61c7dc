"""Where bytes live: URIs and filesystems, with the sources a run reads configured apart from what it writes.

Two sides, each with its own fsspec options:

- **input**: the raw FITS files and manifests a run reads, e.g. MAST's public bucket ``s3://stpubdata`` read
  anonymously. Configured by ``read.storage_options`` (``data.read.storage_options`` for training), ``--anon`` and
  ``--s3-endpoint``.
- **output**: what a run writes and reads back as its own: run folders, checkpoints, catalog parts, catalogs, error
  tables, reports, cropped chips. Configured by ``run.storage_options`` (training), ``output.storage_options``
  (classification) and ``--out-s3-endpoint``. Credentials come from the usual places (instance profile, environment,
  ``~/.aws``) unless the options name them.

Options for reading never open a file for writing: anonymous reads of a public bucket and writes to your own bucket
live side by side. Each root is resolved once (`fsspec.core.url_to_fs`) into a `Storage`; its pyarrow filesystem,
for Ray Data and Ray Train, wraps the very same fsspec filesystem, so both see the same endpoint and credentials.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import fsspec


def s3_options(anon: bool = False, endpoint: str | None = None) -> dict[str, Any]:
    """fsspec options for S3 from the command line's flags: anonymous access, another S3-protocol endpoint."""
    opts: dict[str, Any] = {}
    if anon:
        opts["anon"] = True
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def merge_options(base: dict | None, extra: dict | None) -> dict[str, Any]:
    """`base` with `extra` on top; ``client_kwargs`` are merged key by key (an endpoint flag keeps a config's region)."""
    merged = dict(base or {})
    for key, value in (extra or {}).items():
        if key == "client_kwargs" and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A remote URI as it is; a local path made absolute (Ray workers run in other directories)."""
    return uri if "://" in uri else os.path.abspath(uri)


@dataclass(frozen=True)
class OutputConfig:
    """Where a run's results go: fsspec options for the output side (see the module docstring)."""

    storage_options: dict = field(default_factory=dict)  # e.g. {client_kwargs: {endpoint_url: ...}}; never {anon: true}


@dataclass(frozen=True)
class Storage:
    """One root (a local folder or a bucket prefix) and the filesystem that reaches it, resolved once.

    uri: the root as given (``s3://bucket/prefix`` or a local path); root: the same inside `fs` (``bucket/prefix``).
    """

    uri: str
    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def at(cls, uri: str, storage_options: dict | None = None) -> Storage:
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        return cls(uri.rstrip("/") or uri, fs, root.rstrip("/") or root)

    def path(self, *names: str) -> str:
        """The filesystem path of ``<root>/<names...>`` (for `fs` calls and pyarrow)."""
        return "/".join([self.root, *names])

    def uri_of(self, *names: str) -> str:
        """The URI of ``<root>/<names...>``, as users and logs see it."""
        return "/".join([self.uri, *names])

    def open(self, name: str, mode: str = "rb", **kwargs):
        return self.fs.open(self.path(name), mode, **kwargs)

    def exists(self, name: str | None = None) -> bool:
        return self.fs.exists(self.path(name) if name else self.root)

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def pyarrow(self):
        """A pyarrow filesystem over the same fsspec filesystem (Ray Data's ``filesystem=``, Ray Train's
        ``storage_filesystem``); pair it with `path`, not `uri_of`."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))


def open_uri(uri: str, mode: str = "rb", storage_options: dict | None = None):
    """Open one file by URI (a manifest, a checkpoint file) with the options of its side."""
    return fsspec.open(uri, mode, **(storage_options or {}))
