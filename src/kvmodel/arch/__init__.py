"""arch layer (see DESIGN.md)."""
