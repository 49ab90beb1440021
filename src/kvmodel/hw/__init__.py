"""hw layer (see DESIGN.md)."""
