"""TFRecord files of ``tf.train.Example`` protobufs, read without TensorFlow.

Framing of each record::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

The length CRC is always checked (it catches corrupt or misaligned files at once); the data
CRC costs a pure-Python pass over the bytes, so it is checked only with ``check_data=True``.
``tf.train.Example`` is ``Features{ map<string, Feature> }`` with a Feature holding a bytes,
float or int64 list; :func:`parse_example` decodes that subset of the protobuf wire format.
"""

from __future__ import annotations

import struct
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as used by TFRecord; crc32c(b"123456789") == 0xE3069283."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record_offsets(path: str | Path) -> list[tuple[int, int]]:
    """(offset of the data, length) of every record, reading only the 12-byte headers."""
    out = []
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(12)
            if len(head) != 12:
                raise ValueError(f"{path}: truncated record header at byte {pos}")
            length, crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != crc:
                raise ValueError(f"{path}: corrupt record header at byte {pos} (length CRC mismatch)")
            if pos + 12 + length + 4 > size:
                raise ValueError(f"{path}: truncated record at byte {pos} (needs {length} bytes of data)")
            out.append((pos + 12, length))
            pos += 12 + length + 4
    return out


def read_record(path: str | Path, offset: int, length: int, check_data: bool = False) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
        crc = f.read(4)
    if len(data) != length or len(crc) != 4:
        raise ValueError(f"{path}: truncated record at byte {offset - 12}")
    if check_data and masked_crc(data) != struct.unpack("<I", crc)[0]:
        raise ValueError(f"{path}: corrupt record at byte {offset - 12} (data CRC mismatch)")
    return data


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a message; LEN values are memoryview slices."""
    i, n = 0, len(buf)
    mv = memoryview(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = bytes(mv[i:i + 8]), i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = mv[i:i + ln], i + ln
        elif wt == 5:
            v, i = bytes(mv[i:i + 4]), i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield num, wt, v


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf) -> list:
    for num, _, v in _fields(bytes(buf)):
        body = bytes(v)
        if num == 1:  # BytesList
            return [bytes(x) for n, _, x in _fields(body) if n == 1]
        if num == 2:  # FloatList: packed or not
            out = []
            for n, wt, x in _fields(body):
                if wt == 2:
                    out.extend(struct.unpack(f"<{len(x) // 4}f", bytes(x)))
                else:
                    out.append(struct.unpack("<f", x)[0])
            return out
        if num == 3:  # Int64List: packed or not
            out = []
            for n, wt, x in _fields(body):
                if wt == 2:
                    b, j = bytes(x), 0
                    while j < len(b):
                        val, j = _varint(b, j)
                        out.append(_signed64(val))
                else:
                    out.append(_signed64(x))
            return out
    return []


def parse_example(buf: bytes) -> dict[str, list]:
    """A serialized tf.train.Example -> {feature name: list of bytes | float | int}."""
    out: dict[str, list] = {}
    for num, _, features in _fields(buf):
        if num != 1:
            continue
        for fnum, _, entry in _fields(bytes(features)):
            if fnum != 1:
                continue
            name, value = None, b""
            for enum, _, ev in _fields(bytes(entry)):
                if enum == 1:
                    name = bytes(ev).decode("utf-8")
                elif enum == 2:
                    value = ev
            if name is not None:
                out[name] = _feature(value)
    return out
