"""Rewrites computed once, ahead of training (METHOD step 2: the rewrite depends only on the data).

``tools/precompute_rewrites.py`` runs the frozen rewriter over the SIP samples a run will see and
writes a rewrite store; ``train_sip --rewriter-store PATH`` then reads rewrites from it instead of
running a rewriter. The file is jsonl: a header line that says what the rewrites were made from,
then one line per sample::

    {"format": "megatron-sip-rewrites", "version": 1, "identity": {...}}
    {"key": [dataset, document, split_point], "rewrite": "text" or null}

A null rewrite is one the rewriter failed to produce: it stays missing in training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional

FORMAT = "megatron-sip-rewrites"
VERSION = 1

SampleKey = tuple[int, int, int]


class RewriteStore:
    """Rewrites keyed by ``SIPSample.key``."""

    def __init__(self, rewrites: Mapping[SampleKey, Optional[str]], identity: Mapping):
        self.rewrites = dict(rewrites)
        self.identity = dict(identity)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RewriteStore:
        """Reads a store; malformed lines raise ValueError naming ``path:line``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no rewrite store (make one with tools/precompute_rewrites.py)"
            )
        rewrites: dict[SampleKey, Optional[str]] = {}
        identity = None
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
                if identity is None:
                    if not isinstance(row, dict) or row.get("format") != FORMAT:
                        raise ValueError(f"{path}:{number}: not a rewrite store header")
                    if row.get("version") != VERSION:
                        raise ValueError(
                            f"{path}:{number}: unsupported store version {row.get('version')!r}"
                        )
                    identity = row.get("identity", {})
                    continue
                key, rewrite = _parse_row(row, path, number)
                rewrites[key] = rewrite
        if identity is None:
            raise ValueError(f"{path}: empty file, not a rewrite store")
        return cls(rewrites, identity)

    def get(self, key: Sequence[int]) -> Optional[str]:
        return self.rewrites.get(tuple(int(k) for k in key))

    def __contains__(self, key: Sequence[int]) -> bool:
        return tuple(int(k) for k in key) in self.rewrites

    def __len__(self) -> int:
        return len(self.rewrites)

    def check_identity(self, expected: Mapping, path: str) -> None:
        """Fails when the store was made for other data or sample settings than this run's."""
        for name, value in expected.items():
            stored = self.identity.get(name)
            if stored != value:
                raise ValueError(
                    f"{path}: rewrites were made with {name}={stored!r}, this run has "
                    f"{value!r}; recompute them with tools/precompute_rewrites.py"
                )


def _parse_row(row, path: Path, number: int) -> tuple[SampleKey, Optional[str]]:
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: expected an object")
    key = row.get("key")
    if not (isinstance(key, list) and len(key) == 3 and all(isinstance(k, int) for k in key)):
        raise ValueError(f"{path}:{number}: 'key' must be [dataset, document, split_point]")
    rewrite = row.get("rewrite")
    if rewrite is not None and not isinstance(rewrite, str):
        raise ValueError(f"{path}:{number}: 'rewrite' must be a string or null")
    return (key[0], key[1], key[2]), rewrite


def write_rewrite_store(
    path: str | os.PathLike,
    identity: Mapping,
    rows: Iterable[tuple[Sequence[int], Optional[str]]],
) -> int:
    """Writes a store atomically (a temporary file renamed into place); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({"format": FORMAT, "version": VERSION, "identity": identity}))
        handle.write("\n")
        for key, rewrite in rows:
            handle.write(json.dumps({"key": [int(k) for k in key], "rewrite": rewrite}) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
