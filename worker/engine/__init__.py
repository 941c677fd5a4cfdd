"""engine (see DESIGN.md)."""
