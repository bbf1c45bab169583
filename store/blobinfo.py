"""What kiln has learned about blobs beyond the store: where registries hold them
(for cross-repository mounts) and which digest a layer got when re-compressed
(so a second push in gzip neither re-compresses nor re-uploads).

One small JSON file per digest under ``cache/blobinfo/``; a lost or stale entry
only costs speed, so nothing read here is trusted beyond a hint: mounts are
checked by the registry, re-compressed blobs by the store's digest checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from store.digest import digest_hex, validate_digest
from store.fsutil import atomic_write
from store.locks import file_lock

MAX_REPOS_PER_REGISTRY = 16


class BlobInfoCache:
    def __init__(self, store_root: str | os.PathLike):
        self.dir = Path(store_root) / "cache" / "blobinfo"
        self._lock = Path(store_root) / "locks" / "blobinfo.lock"

    def _path(self, digest: str) -> Path:
        return self.dir / f"{digest_hex(validate_digest(digest))}.json"

    def _read(self, digest: str) -> dict:
        try:
            with open(self._path(digest), "rb") as f:
                doc = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _update(self, digest: str, change) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock):
            doc = self._read(digest)
            if change(doc):
                atomic_write(self._path(digest), json.dumps(doc, sort_keys=True).encode(),
                             tmp_dir=self.dir, durable=False)

    def add_location(self, digest: str, registry: str, repository: str) -> None:
        def change(doc: dict) -> bool:
            locs = doc.setdefault("locations", {})
            repos = locs.get(registry) if isinstance(locs, dict) else None
            if not isinstance(repos, list):
                repos = []
            if repository in repos:
                return False
            locs[registry] = ([repository] + repos)[:MAX_REPOS_PER_REGISTRY]
            return True

        self._update(digest, change)

    def locations(self, digest: str, registry: str) -> list[str]:
        locs = self._read(digest).get("locations")
        repos = locs.get(registry) if isinstance(locs, dict) else None
        return [r for r in repos if isinstance(r, str)] if isinstance(repos, list) else []

    def remember_compressed(self, diff_id: str, compression: str, digest: str,
                            media_type: str, size: int) -> None:
        validate_digest(digest)

        def change(doc: dict) -> bool:
            doc.setdefault("compressed", {})[compression] = {
                "digest": digest, "mediaType": media_type, "size": size}
            return True

        self._update(diff_id, change)

    def compressed(self, diff_id: str, compression: str) -> dict | None:
        entry = (self._read(diff_id).get("compressed") or {}).get(compression)
        if not isinstance(entry, dict):
            return None
        try:
            validate_digest(entry.get("digest", ""))
        except Exception:  # noqa: BLE001 - a hint that does not parse is no hint
            return None
        return entry if isinstance(entry.get("size"), int) else None
