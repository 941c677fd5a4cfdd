"""The Kubernetes operator (docs/kubernetes.md): LLMServices served on spot GPU node pools.

- `nodes`: a Node (+ its Events, + DisruptionTarget pods) → capacity, GPUs, notices (pure);
- `spec`: an LLMService spec → controller settings, or problems naming the field (pure);
- `manifests`: worker pods, router Deployment/Service, token Secret, capacity pods (pure);
- `status`: the status patch: conditions, parallelism, placement, migration (pure);
- `fleet`: the nodes of a service's pools → controller events (pure);
- `api`, `wire`: thin REST and gRPC adapters;
- `backend`: `KubernetesBackend`, the controller's actuator on a cluster;
- `runner`: one LLMService's reconciliation tick; `app`: the kopf indices and daemon;
  `cli`: `spotserve operator`.
"""
