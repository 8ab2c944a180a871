"""``python -m loadtest bench ...`` (see ``loadtest.bench``)."""

import sys

from loadtest.bench import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["bench"]:
        args = args[1:]
    sys.exit(main(args))
