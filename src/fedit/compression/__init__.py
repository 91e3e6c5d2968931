"""Compressed uploads: the codecs (fedit.compression.codecs) and the client's error
feedback (fedit.compression.feedback), used alike by the simulation's clients and a
deployment's data owners."""
