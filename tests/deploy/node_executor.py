"""A data owner's resident executor for the deploy tests, run as its own process.

    python node_executor.py RUNTIME_ADDRESS DELTA REPORT_FILE [SUPEREXEC_SECRET_FILE]

Answers each message with x + DELTA (x: the numpy array in the ArrayRecord "x"), and the
process id and a load counter in a MetricRecord "node", so a test sees which process
answered and that it loaded once. A message with ConfigRecord "sleep" {"seconds": s} is
held that long first (a round a test can interrupt). Writes one JSON line per event to
REPORT_FILE: "handling" when a message arrives, "sent" for every reply pushed (through
flower_io.send_reply, wrapped here), then the task's report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.runtime import RuntimeHttpClient

from fedit.deploy.flower import flower_io

LOADS = 1  # the stand-in for the base model: loaded once, when the process starts


def main(runtime_address: str, delta: float, report_file: Path, secret: bytes | None) -> None:
    def report(event: str, **fields: object) -> None:
        with report_file.open("a") as out:
            out.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")

    def handle(message: Message) -> RecordDict:
        report("handling", round=message.metadata.group_id)
        if "sleep" in message.content:
            time.sleep(float(message.content["sleep"]["seconds"]))
        if "raise" in message.content:
            raise ValueError("secret record text that must not leave this process")
        x = message.content["x"]["x"].numpy()
        return RecordDict(
            {
                "x": ArrayRecord({"x": Array(x + np.float32(delta))}),
                "node": MetricRecord({"pid": os.getpid(), "loads": LOADS}),
            }
        )

    send = flower_io.send_reply

    def recording_send(client: RuntimeHttpClient, reply: Message, context: Context) -> None:
        report(
            "sent",
            error=reply.has_error(),
            records=sorted(reply.content) if reply.has_content() else [],
        )
        send(client, reply, context)

    flower_io.send_reply = recording_send  # every reply passes here (the audit hook)
    report("ready")
    flower_io.serve_client_tasks(
        runtime_address,
        handle,
        on_task=lambda r: report("task", **asdict(r)),
        superexec_secret=secret,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    secret = Path(sys.argv[4]).read_bytes() if len(sys.argv) > 4 else None
    main(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), secret)
