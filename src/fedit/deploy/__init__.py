"""fedit across machines on Flower 1.42 (docs/design/deployment.md).

flwr is imported only inside this package, and only by the modules that talk to Flower
(`flower_io`, the app placeholders), so importing `fedit.deploy` itself stays light.
"""
