"""Reading a W&B offline run file (run-<id>.wandb) back: W&B's LevelDB-style log of protobuf `Record`s (the
record messages come from wandb's own `wandb.proto`; wandb 0.2x+ has no Python reader of its own)."""

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7  # log block size; record header: crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic, version)
    pos, chunk = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero fill at the end of a block
            pos += left
            continue
        chunk += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            yield rec
            chunk = b""


def history(run_dir: Path) -> list[dict]:
    """Every `wandb.log` row of every offline run file under <run_dir>/wandb, in order: {'_step': n, key: value}."""
    rows = []
    for f in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for rec in records(f):
            if rec.WhichOneof("record_type") == "history":
                row = {"_step": rec.history.step.num}
                row.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
                rows.append(row)
    return rows
