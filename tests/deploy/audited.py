"""`fedit` with every reply a data owner sends recorded, for the message audit.

    python audited.py AUDIT_FILE fedit-args...

With FEDIT_TEST_CRASH_AT_ROUND=N in the environment the owner kills itself (SIGKILL) when
round N's task arrives, as a machine that goes down mid-round.

Wraps fedit.deploy.flower.flower_io.send_reply (every Message an owner sends goes through it) so
that each reply is described in AUDIT_FILE, one JSON line each: its record names and, per
record, the arrays' dtypes and shapes (and a secure round's masked vector itself), the
metric keys and values, the config items. The
test then checks that nothing but adapter tensors, counts and scalar metrics left.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedit.deploy.flower import flower_io
from fedit.deploy.owner import DataOwner


def describe(reply) -> dict:
    if reply.has_error():
        return {"error": {"code": reply.error.code, "reason": reply.error.reason}}
    records = {}
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            arrays = {k: [a.dtype, list(a.shape), a.stype] for k, a in record.items()}
            records[name] = {"type": "arrays", "arrays": arrays}
            if name == "masked":  # secure aggregation's input: the values, to show the mask
                records[name]["values"] = record["vector"].numpy().tolist()
        elif isinstance(record, MetricRecord):
            records[name] = {"type": "metrics", "items": dict(record)}
        elif isinstance(record, ConfigRecord):
            records[name] = {"type": "config", "items": {k: v for k, v in record.items()}}
        else:
            records[name] = {"type": type(record).__name__}
    return {"records": records}


def main() -> None:
    audit = Path(sys.argv[1])
    send = flower_io.send_reply

    def recording(client, reply, context) -> None:
        with audit.open("a") as out:
            out.write(json.dumps(describe(reply), default=str) + "\n")
        send(client, reply, context)

    flower_io.send_reply = recording
    crash_at = os.environ.get("FEDIT_TEST_CRASH_AT_ROUND")
    if crash_at:  # the owner dies mid-round: after its task arrived, before it answers
        handle = DataOwner.handle

        def crashing(self, message):
            if message.content["round"]["round"] == int(crash_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return handle(self, message)

        DataOwner.handle = crashing
    from fedit.cli.main import app

    sys.argv = ["fedit", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    main()
