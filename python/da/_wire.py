"""The protobuf wire format of the messages that carry tensors, written and read here so that a
tensor's bytes are copied once on the way out (from the caller's array into the message) and once
on the way in (from the message into the output array).

The generated classes would copy them more often: a bytes field is copied when it is set, again
when the message is serialised, and again when it is read back. Small parts (the spec, the
header, the execution info) still go through the generated classes; only the fields that hold
tensor data are framed here. Encoding follows the protobuf rules exactly (fields in number order,
defaults omitted), so the bytes equal SerializeToString's (checked by test_python_client).
"""

_VARINT = 0
_LENGTH = 2


def varint(value):
    """The base-128 varint of value (negative int32/int64 as their 64-bit two's complement)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field, wire_type):
    return varint(field << 3 | wire_type)


def _size(parts):
    return sum(memoryview(p).nbytes for p in parts)


def int_field(field, value):
    """A varint field; nothing for 0 (proto3 omits defaults)."""
    return _tag(field, _VARINT) + varint(value) if value else b""


def bytes_field(field, parts):
    """A length-delimited field holding the concatenation of parts (buffers, not copied here)."""
    return [_tag(field, _LENGTH) + varint(_size(parts)), *parts]


def message_field(field, message):
    """A field holding a generated message (small: spec, header); nothing for an empty one."""
    encoded = message.SerializeToString()
    return _tag(field, _LENGTH) + varint(len(encoded)) + encoded if encoded else b""


def join(parts):
    """One bytes object of all parts: the one copy of the tensor data on the way out."""
    return b"".join(parts)


def _read_varint(view, pos):
    result = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def fields(data):
    """(field number, value) of each field of an encoded message, in order: varints as ints,
    length-delimited fields as memoryviews into data (not copied). Fixed-width fields, which none
    of the messages read here has, are skipped."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(view, pos)
        elif wire_type == _LENGTH:
            size, pos = _read_varint(view, pos)
            value, pos = view[pos:pos + size], pos + size
        elif wire_type == 1:
            value, pos = None, pos + 8
        elif wire_type == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire_type} at byte {pos}")
        yield field, value
