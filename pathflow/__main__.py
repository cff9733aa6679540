# `python -m pathflow`: the command line lives above the flows, in pathflow_cli (the science package
# itself imports no Prefect and no flows); this entry point only hands over to it.
from pathflow_cli import console_main

console_main()
