"""fsspec filesystems for any URL, configured from the storage section.

Credentials and endpoints come from the config when given there, else from the standard
AWS / GCP environment (s3fs / gcsfs read it themselves).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import fsspec

from re2tal.config import StorageConfig


def protocol(url: str) -> str:
    scheme = urlsplit(str(url)).scheme
    return "file" if len(scheme) <= 1 else scheme


def storage_options(url: str, storage: StorageConfig) -> dict[str, Any]:
    """Keyword arguments for fsspec for this URL's protocol."""
    proto = protocol(url)
    if proto in ("s3", "s3a"):
        opts: dict[str, Any] = {"anon": storage.anon}
        client: dict[str, Any] = {}
        if storage.endpoint_url:
            client["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client["region_name"] = storage.region
        if client:
            opts["client_kwargs"] = client
        if storage.access_key_id is not None:
            opts["key"] = storage.access_key_id.get_secret_value()
            opts["secret"] = storage.secret_access_key.get_secret_value()
        return opts
    if proto in ("gs", "gcs"):
        return {"token": "anon"} if storage.anon else {}
    return {}


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL."""
    return fsspec.core.url_to_fs(str(url), **storage_options(url, storage))
