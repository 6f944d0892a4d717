"""da.aio.Client: da.Client on grpc.aio, so that many requests can be in flight from one event
loop.

    async with da.aio.Client("localhost:50051") as client:
        outputs = await asyncio.gather(*(client.attend(q, q, q, segments=[2048], dilations=[1])
                                         for q in batches))

The same arguments, results and exceptions as da.Client (da/_client.py).
"""

import grpc
import grpc.aio

from da import _client, errors
from da._client import Result
from da.v1 import attention_pb2 as pb
from da.v1 import attention_pb2_grpc as pb_grpc


class Client:
    """da.Client's asyncio twin; see da.Client for the arguments."""

    def __init__(self, target, *, tls_ca=None, tls_cert=None, tls_key=None, token=None,
                 timeout=None, options=(), max_message_bytes=1 << 30):
        self._channel = _client._make_channel(grpc.aio, target, tls_ca, tls_cert, tls_key,
                                              options, max_message_bytes)
        self._stub = pb_grpc.AttentionServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout
        self._message_limit = None

    async def close(self):
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _options(self, timeout, request_id):
        metadata = list(self._metadata)
        if request_id:
            metadata.append(("x-request-id", request_id))
        return {"timeout": timeout if timeout is not None else self._timeout,
                "metadata": metadata}

    async def _call(self, method, request, timeout, request_id=""):
        try:
            return await method(request, **self._options(timeout, request_id))
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    async def info(self, timeout=None):
        return await self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    async def health(self, service="", timeout=None):
        check = self._channel.unary_unary("/grpc.health.v1.Health/Check")
        return _client._health_status(
            await self._call(check, _client._health_request(service), timeout))

    async def _server_message_limit(self, timeout):
        if self._message_limit is None:
            limit = (await self.info(timeout)).limits.max_message_bytes
            self._message_limit = limit if limit > 0 else _client._DEFAULT_MESSAGE_BYTES
        return self._message_limit

    async def attend(self, q, k, v, *, segments, dilations, causal=False, mode="longnet",
                     precision="auto", scale=None, stream=None, block_tokens=0, request_id="",
                     priority=0, timeout=None, return_info=False):
        """da.Client.attend, awaited."""
        q, k, v, spec = _client._prepare(q, k, v, segments, dilations, causal, mode, precision,
                                         scale)
        limit = await self._server_message_limit(timeout)
        if stream is None:
            stream = _client._wants_stream(q, k, v, limit)
        if stream:
            assembler = _client._OutputAssembler(q)
            call = self._stub.AttendStream(
                _client._stream_requests(q, k, v, spec,
                                         _client._block_tokens(q, k, limit, block_tokens),
                                         request_id, priority),
                **self._options(timeout, request_id))
            try:
                async for message in call:
                    assembler.add(message)
            except grpc.RpcError as error:
                raise errors.from_rpc_error(error) from None
            output, info = assembler.finish()
        else:
            response = await self._call(
                self._stub.Attend, _client._unary_request(q, k, v, spec, request_id, priority),
                timeout, request_id)
            output, info = _client._unary_output(q, response)
        return Result(output, info) if return_info else output
