"""Read the records of an offline W&B run file (``run-*.wandb``) to check what was logged.

The file is W&B's 7-byte header followed by a LevelDB-style log of 32 KiB blocks, each
record a ``wandb_internal_pb2.Record`` protobuf split into FULL/FIRST/MIDDLE/LAST chunks.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7  # ":W&B" ident, magic, version in the file; crc, length, type per chunk


def read_records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, records, parts = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block  # zero padding at the end of a block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            break
        if kind in (1, 2):  # FULL or FIRST
            parts = chunk
        else:  # MIDDLE or LAST
            parts += chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(parts)
            records.append(r)
    return records


def finished_records(run_dir: Path, timeout: float = 60.0) -> list[pb.Record]:
    """The records of a finished run. W&B's service process may still be writing the file when
    ``finish()`` returns (seen with wandb 0.31 offline): wait for the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        (run_file,) = run_dir.glob("run-*.wandb")
        records = read_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def logged_config(run_dir: Path) -> dict[str, Any]:
    """The run config as logged (top-level keys to JSON-decoded values)."""
    config: dict[str, Any] = {}
    for r in finished_records(run_dir):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                config[item.key] = json.loads(item.value_json)
    return config


def logged_metric_keys(run_dir: Path) -> set[str]:
    keys: set[str] = set()
    for r in finished_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            keys.update(item.key or item.nested_key[0] for item in r.history.item)  # images nest
    return keys
