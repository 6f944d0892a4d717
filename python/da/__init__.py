"""da: the Python client of the da dilated-attention service.

    import da
    client = da.Client("localhost:50051")
    out = client.attend(q, k, v, segments=[2048, 4096], dilations=[1, 2])

`q` is [batch, seq_len, heads, head_dim], `k` and `v` [batch, seq_len, kv_heads, head_dim], as
numpy arrays (float32, float16, ml_dtypes.bfloat16) or torch tensors (float32, float16,
bfloat16); the output has q's shape, kind, dtype and device. `attend` sends small requests in one
message and streams large ones (AttendStream), filling the output as blocks arrive;
`attend_blocks` streams a sequence produced block by block. A call a draining server refused
unread is sent again (da.Retry). Errors are da.Error subclasses (da/errors.py). da.aio.Client
is the same on asyncio; da.torch.DilatedAttention (import da.torch; needs torch) is an
nn.Module computing on the server.
"""

from da import aio
from da._client import BlockStream, Client, OutputBlock, Result, Retry
from da.errors import (Cancelled, DeadlineExceeded, Error, InvalidArgument, PermissionDenied,
                       ResourceExhausted, Unauthenticated, Unavailable)

__all__ = ["Client", "Retry", "Result", "OutputBlock", "BlockStream", "aio", "Error",
           "InvalidArgument",
           "ResourceExhausted", "DeadlineExceeded", "Unavailable", "Unauthenticated",
           "PermissionDenied", "Cancelled"]
__version__ = "0.1.0"
