"""Build the fused CPU kernel ahead of time, and say where it is:

    python -m lem.kernels.build

The first forward or backward on CPU tensors builds it otherwise (~1-2 min, once per source,
compiler flags, torch version and Python). For a cluster whose compute nodes have no compiler:
run this on a node that has one, with the same environment, the same kind of CPU (the flags
follow its vector units, AVX2 or AVX-512) and TORCH_EXTENSIONS_DIR set to a folder the compute
nodes see; jobs run with that TORCH_EXTENSIONS_DIR then find the build and compile nothing.
"""
import argparse
import sys

import torch

from . import cpu


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lem.kernels.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    try:
        module = cpu.load()
    except Exception as error:  # the BuildError names the compiler's log; anything else says what stopped it
        p.exit(1, f"lem: no fused CPU kernel ({type(error).__name__}: {error})\n")
    flags = " ".join(cpu.compiler_flags())
    print(f"the fused CPU kernel for torch {torch.__version__}, Python {sys.version.split()[0]}, flags {flags}:\n"
          f"  {module.__file__}")


if __name__ == "__main__":
    main()
