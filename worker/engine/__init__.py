"""The inference engine: continuous batching over a paged KV cache, with recovery.

Torch-free core (unit-tested in milliseconds): `sequence` (request state and sampling
parameters), `block_manager` (KV block allocation), `scheduler` (who runs next, token
budget, preemption by recompute), `plan` (a step as plain data). Torch side: `kv_cache`
(a rank's paged cache, readable and writable by layer/head/token range), `sampling`
(seeded by request and position), `runner` (one rank's share of each step; the driver
drives the pipeline), `engine` (the driver's API: submit, step, drain, export, resume).
"""
