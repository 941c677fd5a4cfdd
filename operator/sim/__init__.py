"""sim (see DESIGN.md)."""
