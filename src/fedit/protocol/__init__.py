"""fedit's messages, the same for both engines: a client's task and its reply as Flower
records (``wire``) and what they carry and weigh (``traffic``). The simulation counts the
bytes a deployment would send through these, so it sits below the engine and deploy."""
