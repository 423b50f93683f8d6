"""The `bus` command. `main.py` assembles subcommands registered by command modules."""
