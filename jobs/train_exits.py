import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.train_exits(sys.argv[1:]))
