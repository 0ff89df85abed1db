"""Read back a wandb offline run file (``run-ID.wandb``) in tests.

The file is wandb's transaction log: a 7-byte ``:W&B`` header, then LevelDB-log framed
records (32 KiB blocks, 7-byte record headers, full/first/middle/last fragments), each a
``wandb_internal_pb2.Record``. wandb no longer ships a Python reader for it.
"""
from __future__ import annotations

import json
from pathlib import Path

import wandb
from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def written_run_file(run_dir: Path) -> Path:
    """The one ``run-ID.wandb`` under ``run_dir/wandb``, once every record of it is on disk.

    wandb's service writes the file on a thread of its own: a finished run's last records (its exit code) may land
    after ``finish`` returns. Tearing the service down waits for them; the next ``wandb.init`` starts a new one.
    """
    wandb.teardown()
    (path,) = Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    return path


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def history(path: Path) -> list[dict]:
    """Every logged history row as ``{key: value}``."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def summary(path: Path) -> dict:
    """The run's summary as its updates left it (a run's last history values and what it set itself)."""
    values = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def run_config(path: Path) -> dict:
    """The run's config as wandb.init received it."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return {item.key: json.loads(item.value_json) for item in record.run.config.update}
    raise AssertionError(f"{path} holds no run record")


def exit_code(path: Path) -> int | None:
    """The exit code the run ended with, ``None`` while it has not ended."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "exit":
            return record.exit.exit_code
    return None
