"""The bridge to real machines: a scenario as a bootable image for QEMU (DESIGN.md "Layers").

`reset.py` reads the model's CPU at reset, `boot.py` writes the boot stub and
the logging stubs that reproduce it, `image.py` links the multiboot image,
`qemu.py` runs it and turns QEMU's log and monitor answers into a trace.
"""
