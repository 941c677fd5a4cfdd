"""Controller: the SpotServe control loop, shared by the Kubernetes operator and local mode.

- `events`: what can happen (instance booting/ready, notice, lost, load or spec change);
- `view`: the controller's picture of the instances, updated by events (pure);
- `epoch`: a `Plan` turned into per-worker assignments (role + where each slice comes from,
  kept / peer / checkpoint) and a router topology (pure);
- `actuator`: the contract a backend (local processes, Kubernetes pods) implements;
- `journal`: every transition, persisted so a restarted controller resumes;
- `controller`: the asyncio loop that serialises events, asks the planner, and drives the
  actuator through drain → configure → switch → release.
"""
