"""Planner: cost model, configuration search, device mapping, migration plan, arrangement."""
