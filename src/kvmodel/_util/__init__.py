"""_util layer (see DESIGN.md)."""
