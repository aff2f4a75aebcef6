"""Audio at the bottom of the library, shared by checkpoint I/O, models, evaluation and data synthesis.

waveform.py decodes, resamples (soxr, the one resampler) and encodes 16 kHz mono audio; features.py is the
one log-mel front-end; positions.py holds Whisper's sinusoidal position table.
"""
