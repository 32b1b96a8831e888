import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.prepare_data(sys.argv[1:]))
