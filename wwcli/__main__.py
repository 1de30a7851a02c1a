"""Entry point for `python -m wwcli`."""

from wwcli.entry import main

main()
