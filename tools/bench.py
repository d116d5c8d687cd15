"""``python tools/bench.py [options]``: the same as ``mdu-dist bench`` (see mdu_dist/bench.py)."""

import argparse
import sys

from mdu_dist.bench import add_arguments, cmd_bench

if __name__ == "__main__":  # spawned ranks re-import this file: only the parent runs the bench
    parser = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__)
    add_arguments(parser)
    sys.exit(cmd_bench(parser.parse_args()))
