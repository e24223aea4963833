"""``python -m mimscale.train [CONFIG] [key=value ...]`` == ``mimscale pretrain ...``.

This is the module launchers start: ``deepspeed --module mimscale.train``, ``torchrun -m mimscale.train``,
``accelerate launch -m mimscale.train``, ``srun python -m mimscale.train``.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
