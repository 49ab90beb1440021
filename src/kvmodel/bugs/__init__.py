"""bugs layer (see DESIGN.md)."""
