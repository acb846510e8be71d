"""The ``--mesh`` / ``--distributed`` arguments that every inference command takes (argparse only,
so a command's ``--help`` stays quick; ``runtime.parse_mesh`` reads ``--mesh``)."""

from __future__ import annotations

import argparse

MESH_HELP = ("device mesh: 'auto' (one device when there is only one, otherwise all devices on"
             " fsdp, as in training), 'none' (one device, no mesh), or axis sizes"
             " 'data=N,fsdp=M,tensor=K' (axes left out are 1; one size may be -1 to take the"
             " remaining devices)")


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="auto", help=MESH_HELP)
    p.add_argument("--distributed", choices=("auto", "true", "false"), default="auto",
                   help="join a multi-host job (jax.distributed): 'auto' when the environment"
                        " describes one (JAX_COORDINATOR_ADDRESS, a multi-host TPU, SLURM, MPI)")
