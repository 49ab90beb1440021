"""kvm layer (see DESIGN.md)."""
