"""Local mode: the SpotServe control loop on one machine, no Kubernetes.

- `tiny_model`: a tiny random Llama (numpy + hand-written safetensors, word tokenizer);
- `cloud`: an availability trace (SpotServe formats or the built-in one) as timed add /
  notice / kill events, compressed;
- `configure`: a `WorkerAssignment` as the Worker `Configure` call (pure);
- `backend`: `LocalBackend`, the controller's actuator over `spotserve worker` processes
  on 127.0.0.N plus the emulated cloud that boots, warns and kills them;
- `runner`: one run — router, controller, backend, script, request stream, reference;
- `report`: summary numbers, JSON report, PNG timeline;
- `demo_cli`/`demo`: `spotserve demo`; `up_cli`/`up`: `spotserve up --local`.
"""
