"""check layer (see DESIGN.md)."""
