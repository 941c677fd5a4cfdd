"""Control plane: planner, controller, router, simulator, local mode and the Kubernetes operator."""
