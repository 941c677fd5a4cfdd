"""local (see DESIGN.md)."""
