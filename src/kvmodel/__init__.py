"""kvmodel: an executable model of x86 event virtualization, checked against bare metal."""

__version__ = "0.1.0"
