"""A raw HTTP/2 client (no HTTP/2 library: hand-made frames, HPACK literals without Huffman) that
starts gRPC calls whose message never completes: each announces a message of `length` bytes and
sends all but its last `short`, as fast as the server's flow control allows, then stalls. What
the server holds for such calls is what gRPC buffers before the application sees anything
(tests/python/test_hostile.py).

    connection = raw_h2.Connection(port)
    stream, sent = connection.start_call("/da.v1.AttentionService/Attend", 60 << 20, stall_s=2)
    connection.reset  # {stream: HTTP/2 error code} of the calls the server reset
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
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
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
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
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
                    elif kind == RST_STREAM:
                        self.reset[stream] = int.from_bytes(payload, "big")
                    elif kind == GOAWAY:
                        self.goaway = payload
                    self.cv.notify_all()
        except (EOFError, OSError):
            with self.cv:
                self.closed = True
                self.cv.notify_all()

    def start_call(self, path, length, short=1, stall_s=None):
        """Sends a HEADERS frame and a message of `length` bytes less its last `short`; returns
        (stream id, bytes sent) once sent, or earlier when the stream was reset, the connection
        closed, or no window came for stall_s seconds."""
        with self.cv:
            stream = self.next_stream
            self.next_stream += 2
            self.stream_windows[stream] = self.initial_window
            self.sock.sendall(frame(HEADERS, 4, stream, request_headers(path, "localhost")))
        body = b"\x00" + struct.pack(">I", length) + bytes(length - short)
        sent = 0
        while sent < len(body):
            with self.cv:
                ok = self.cv.wait_for(
                    lambda: self.closed or stream in self.reset or (
                        self.conn_window > 0 and self.stream_windows[stream] > 0),
                    timeout=stall_s)
                if not ok or self.closed or stream in self.reset:
                    return stream, sent
                n = min(self.max_frame, self.conn_window, self.stream_windows[stream],
                        len(body) - sent)
                self.conn_window -= n
                self.stream_windows[stream] -= n
                self.sock.sendall(frame(DATA, 0, stream, body[sent:sent + n]))
                sent += n
        return stream, sent

    def close(self):
        self.sock.close()
