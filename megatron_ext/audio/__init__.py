"""Audio at the bottom of the library: the shared pieces both checkpoint I/O and models use."""
