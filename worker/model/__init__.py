"""model (see DESIGN.md)."""
