"""python main.py: jax_ddpm's command line, the same as the console command `jax-ddpm`.

  python main.py --config=configs/mnist.py --workdir=runs/mnist          # train (or resume)
  python main.py --mode=sample --config=configs/mnist.py --workdir=runs/mnist
  python main.py --help                                                  # every mode

The flags and the modes live in jax_ddpm/cli.py.
"""

from jax_ddpm import cli

if __name__ == "__main__":
  cli.run()
