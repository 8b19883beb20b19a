"""jax_ddpm: denoising diffusion models (DDPM, DDIM) in JAX and Flax NNX."""

import os as _os

# gs:// paths through gcsfs (etils.epath's fsspec backend) rather than TensorFlow's GCS client,
# for our files, orbax's and TFDS's alike, in main.py and in a notebook. gcsfs honours
# STORAGE_EMULATOR_HOST, so the pod rehearsal (tests/pod_rehearsal_test.py) runs the very
# client a pod runs. epath decides once, at its first use of any path, so this is set on
# import of the package; EPATH_USE_TF=true in the environment keeps TensorFlow's client.
_os.environ.setdefault("EPATH_USE_TF", "false")
