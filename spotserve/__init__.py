"""spotserve: serve large language models on preemptible (spot) GPUs without losing requests.

This package is the torch-free shared core: model shapes (`ModelSpec`), the GPU and
instance catalog, parallel layout math and the `spotserve` command line. The operator
(`spotserve.operator`), the worker (`spotserve.worker`) and the wire contract
(`spotserve.v1`) all build on it.
"""

__version__ = "0.1.0"
