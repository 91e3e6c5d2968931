"""fedit across machines on Flower 1.42 (docs/design/deployment.md): a coordinator and one
process per data owner run the simulation's client trainers and strategies, with Flower
carrying the messages.

Flower is imported in this package only (and by the CLI commands that need it, inside the
command), so simulations and `fedit --help` never pay for it. Importing the package itself
imports nothing: each module loads what it uses.
"""
