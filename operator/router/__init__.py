"""router (see DESIGN.md)."""
