"""Data preparation for Devstral Audio (synthetic spoken coding instructions in `synth`)."""
