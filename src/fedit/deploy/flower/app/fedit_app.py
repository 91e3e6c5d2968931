"""Placeholder components of fedit's Flower App (design §2.1).

fedit runs the SuperLink and every SuperNode with `--isolation process`: the coordinator
and each data owner take the tasks in their own long-lived processes, and Flower never
loads this module. If it does (a SuperLink or SuperNode started without
`--isolation process`), both components refuse with the reason instead of running.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

REFUSAL = (
    "fedit's Flower App is a placeholder: start the SuperLink and SuperNodes with "
    "`--isolation process` through `fedit coordinate` / `fedit join`, which run the rounds"
)

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def refuse_server(grid: Grid, context: Context) -> None:
    raise RuntimeError(REFUSAL)


@client_app.train()
def refuse_train(message: Message, context: Context) -> Message:
    raise RuntimeError(REFUSAL)
