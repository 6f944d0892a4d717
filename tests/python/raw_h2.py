"""A raw HTTP/2 client (no HTTP/2 library: hand-made frames, HPACK literals without Huffman) that
starts gRPC calls whose message never completes: each announces a message of `length` bytes and
sends all but its last `short`, as fast as the server's flow control allows, then stalls. What
the server holds for such calls is what gRPC buffers before the application sees anything
(tests/python/test_hostile.py).

    connection = raw_h2.Connection(port)
    stream, sent = connection.start_call("/da.v1.AttentionService/Attend", 60 << 20, stall_s=2)
    connection.reset  # {stream: HTTP/2 error code} of the calls the server reset

It also makes a slow reader, a client whose answer waits in the server's socket: with a window
and a small receive buffer, the server may send a whole answer at once, and the client reads it
only while `reading` is set, returning window as a gRPC client does (every `update_every` bytes).

    connection = raw_h2.Connection(port, window=1 << 30, receive_buffer=64 << 10)
    stream = connection.open_call("/da.v1.AttentionService/AttendStream")
    connection.send_message(stream, header_bytes)
    connection.reading.clear()  # Once it stops reading it no longer sees new window either.
    connection.send_message(stream, block_bytes, end_stream=True)
    ...
    connection.reading.set()
    connection.wait_ended(stream, 30)
    connection.messages(stream)  # The answer's gRPC messages.
"""
import socket
import struct
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def grpc_message(message):
    """message as gRPC frames it on a stream: uncompressed, its length, its bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def _string(text):
    data = text.encode()
    assert len(data) < 127
    return bytes([len(data)]) + data


def request_headers(path, authority):
    """HPACK without Huffman or indexing: :method POST, :scheme http from the static table."""
    return (b"\x83\x86" + b"\x04" + _string(path) + b"\x01" + _string(authority)
            + b"\x00" + _string("content-type") + _string("application/grpc")
            + b"\x00" + _string("te") + _string("trailers"))


class Connection:
    def __init__(self, port, window=None, receive_buffer=None, update_every=1 << 20):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.conn_window = 65535
        self.stream_windows = {}
        self.initial_window = 65535
        self.max_frame = 16384
        self.reset = {}  # stream -> error code
        self.goaway = None
        self.closed = False
        self.next_stream = 1
        self.reading = threading.Event()  # cleared: the reader stops taking frames
        self.reading.set()
        self.received = {}  # stream -> the DATA bytes of its answer so far
        self.ended = set()  # streams whose answer ended (END_STREAM)
        self.error = None  # how the reader's connection ended, if it did
        self.update_every = update_every
        self.unreturned = {}  # stream (0: the connection) -> DATA bytes read, window not returned
        settings = b"" if window is None else struct.pack(">HI", 4, window)
        hello = PREFACE + frame(SETTINGS, 0, 0, settings)
        if window is not None and window > 65535:
            hello += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - 65535))
        self.window = window
        self.sock.sendall(hello)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read(self):
        try:
            while True:
                self.reading.wait()
                head = self._recv(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv(length)
                with self.cv:
                    if kind == SETTINGS and not flags & 1:
                        for i in range(0, len(payload), 6):
                            key, value = struct.unpack(">HI", payload[i:i + 6])
                            if key == 4:
                                delta = value - self.initial_window
                                self.initial_window = value
                                for s in self.stream_windows:
                                    self.stream_windows[s] += delta
                            elif key == 5:
                                self.max_frame = value
                        self.sock.sendall(frame(SETTINGS, 1, 0))
                    elif kind == PING and not flags & 1:
                        self.sock.sendall(frame(PING, 1, 0, payload))
                    elif kind == WINDOW_UPDATE:
                        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
                        if stream == 0:
                            self.conn_window += increment
                        elif stream in self.stream_windows:
                            self.stream_windows[stream] += increment
                    elif kind == DATA:
                        self.received.setdefault(stream, bytearray()).extend(payload)
                        self._return_window(stream, length)
                        if flags & 1:
                            self.ended.add(stream)
                    elif kind == HEADERS and flags & 1:
                        self.ended.add(stream)
                    elif kind == RST_STREAM:
                        self.reset[stream] = int.from_bytes(payload, "big")
                    elif kind == GOAWAY:
                        self.goaway = payload
                    self.cv.notify_all()
        except (EOFError, OSError) as e:
            with self.cv:
                self.error = repr(e)
                self.closed = True
                self.cv.notify_all()

    def _return_window(self, stream, length):
        """Like a gRPC client: WINDOW_UPDATE for the stream and the connection once update_every
        bytes were read since the last one (only with a window of our own)."""
        if self.window is None:
            return
        for key in (stream, 0):
            self.unreturned[key] = self.unreturned.get(key, 0) + length
            if self.unreturned[key] >= self.update_every:
                self.sock.sendall(frame(WINDOW_UPDATE, 0, key,
                                        struct.pack(">I", self.unreturned[key])))
                self.unreturned[key] = 0

    def open_call(self, path):
        """Sends a call's HEADERS frame; returns its stream id."""
        with self.cv:
            stream = self.next_stream
            self.next_stream += 2
            self.stream_windows[stream] = self.initial_window
            self.sock.sendall(frame(HEADERS, 4, stream, request_headers(path, "localhost")))
        return stream

    def send_bytes(self, stream, data, stall_s=None, end_stream=False):
        """Sends data on stream as DATA frames as the server's flow control allows (the last one
        with END_STREAM when end_stream); returns the bytes sent, fewer when the stream was
        reset, the connection closed, or no window came for stall_s seconds."""
        sent = 0
        while sent < len(data):
            with self.cv:
                ok = self.cv.wait_for(
                    lambda: self.closed or stream in self.reset or (
                        self.conn_window > 0 and self.stream_windows[stream] > 0),
                    timeout=stall_s)
                if not ok or self.closed or stream in self.reset:
                    return sent
                n = min(self.max_frame, self.conn_window, self.stream_windows[stream],
                        len(data) - sent)
                self.conn_window -= n
                self.stream_windows[stream] -= n
                last = end_stream and sent + n == len(data)
                self.sock.sendall(frame(DATA, 1 if last else 0, stream, data[sent:sent + n]))
                sent += n
        return sent

    def send_message(self, stream, message, end_stream=False, stall_s=None):
        """Sends one whole gRPC message on stream (half-closing after it when end_stream); raises
        when it could not (see send_bytes)."""
        body = grpc_message(message)
        sent = self.send_bytes(stream, body, stall_s=stall_s, end_stream=end_stream)
        if sent != len(body):
            raise RuntimeError(f"stream {stream}: sent {sent} bytes of {len(body)}")

    def call(self, path, message, before_last=None):
        """Sends a whole call: HEADERS, then `message` as one gRPC message, half-closing with its
        last byte. before_last, if given, runs before that byte goes. Returns the stream id."""
        stream = self.open_call(path)
        body = grpc_message(message)
        sent = self.send_bytes(stream, body[:-1])
        if sent != len(body) - 1:
            raise RuntimeError(f"stream {stream}: sent {sent} bytes of {len(body)}")
        if before_last is not None:
            before_last()
        self.send_bytes(stream, body[-1:], end_stream=True)
        return stream

    def messages(self, stream):
        """The whole gRPC messages of stream's answer so far, in order."""
        data, out, at = bytes(self.received.get(stream, b"")), [], 0
        while at + 5 <= len(data):
            length = int.from_bytes(data[at + 1:at + 5], "big")
            if at + 5 + length > len(data):
                break
            out.append(data[at + 5:at + 5 + length])
            at += 5 + length
        return out

    def wait_ended(self, stream, timeout_s):
        """True once the stream's answer ended; False when the server reset the stream, the
        connection closed or the time ran out first."""
        with self.cv:
            return self.cv.wait_for(
                lambda: stream in self.ended or stream in self.reset or self.closed,
                timeout_s) and stream in self.ended

    def start_call(self, path, length, short=1, stall_s=None):
        """Sends a HEADERS frame and a message of `length` bytes of zeros less its last `short`;
        returns (stream id, bytes sent) once sent, or earlier when the stream was reset, the
        connection closed, or no window came for stall_s seconds."""
        stream = self.open_call(path)
        body = b"\x00" + struct.pack(">I", length) + bytes(length - short)
        return stream, self.send_bytes(stream, body, stall_s=stall_s)

    def close(self):
        self.sock.close()
