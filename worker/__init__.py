"""Data plane: the sharded model, the inference engine, and the worker gRPC service.

`model/` and `engine/` know nothing of gRPC (see their own docstrings). The service, one
concept per module:

- `server`: the Worker servicer and its state machine (Configure, Submit, Cancel, Drain,
  PullTensors, Status), `start_server`; `cli`: `spotserve worker`.
- `epoch`: a Configure's role → the pipeline's `ParallelConfig`, position and rank; each
  pipeline of an epoch is its own torch.distributed world.
- `weights`: gather a role's weight slices (kept / peer / checkpoint, failing over to the
  checkpoint) and serve the built stage's parameters to peers. What a Configure asks for
  is built by the controller (`spotserve.operator.controller.configure`), the one builder.
- `driver`: the pipeline driver's engine on its own thread; a drain publishes each rank's
  share of the paused requests' KV into its `engine.kv_shares`, which `kv_store` serves to
  peers and fills with the pieces a new role imports.
- `greedy_check`: every output token checked as the greedy choice for its prefix (the
  chaos campaign's and the demo's verdict).
- `kv_sizing`: how many KV-cache blocks a configuration's shard gets (`--kv-blocks
  auto|N`, `--gpu-memory-utilization`, `--kv-memory-gib`), from `spotserve.memory`.
- `requests`: a SubmitRequest checked and turned into engine state; token events into
  deltas. `transfer`, `tensor_store`, `peer_service`: chunked tensor streaming over
  gRPC, or over the `bulk` port (plain TCP behind a one-time ticket from `OpenBulkPull`);
  `checksum`: the CRC-32 both use (zlib-ng's when installed).
- `health` (grpc.health.v1 without a dependency), `metrics` (Prometheus).
"""
