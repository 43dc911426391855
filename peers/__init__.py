"""Peers: the same DAug computations written in another framework, timed against daug-jax.

``daug-jax bench --peer torch`` imports these modules; the library itself never does.  Each peer
builds one program of the benchmark (a train step, a translation) as a `PeerStep`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class PeerStep:
    """One peer program, ready to time.

    call: runs it once on fixed inputs, to completion (returns a Python float: the loss, or a
      checksum of a translation); flops: matmul and convolution FLOPs of one call, counted by
      the peer's framework; params: trainable parameter elements; name: what the program is.
    """
    call: Callable[[], float]
    flops: float
    params: int
    name: str
