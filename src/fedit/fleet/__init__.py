"""Who trains each round: the server's client sampling (``selection``) and the simulated
devices that decide who is online and how long a round takes (``devices``). Plain numbers,
below privacy (whose accountant needs the sampling) and the engine."""
