"""Compressed uploads: the codecs (fedit.compression.codecs), shared by the client, the wire
and the simulated devices. The client's error feedback, which keeps per-round memories on
its disk, lives with the client (fedit.client.feedback)."""
