"""The names attention gives the residuals its backward pass reads, so that a rematerialisation
policy can save them (``jax.ad_checkpoint.checkpoint_name``; ``models.layers.REMAT_POLICIES``).

A flash kernel's backward needs the forward's output ``o`` (for the softmax correction
``sum_d o * do``) and the row log-sum-exp of the scores; with both saved, the backward kernels
run on them and the forward kernel never runs again. Where they are named:

- ``pallas_tpu`` / ``pallas_gpu`` (our kernels): in the ``custom_vjp`` forward rule
  (``flash_common.flash_vjp``), as ``OUTPUT`` and ``LOGSUMEXP``;
- ``splash`` (JAX's kernel): splash tags both with the one ``residual_checkpoint_name`` it
  accepts, ``SPLASH``;
- ``xla`` (the reference): its output as ``OUTPUT``. It keeps no log-sum-exp, so its backward
  still recomputes the scores and the softmax; only the output's own recompute is saved;
- ``cudnn``: nothing (JAX's cuDNN call names none of its residuals).

Outside ``jax.checkpoint`` a name is the identity: it costs nothing.
"""

from __future__ import annotations

OUTPUT = "attention_output"
LOGSUMEXP = "attention_logsumexp"
SPLASH = "attention_splash_residuals"  # splash's output and log-sum-exp, under one name
NAMES = (OUTPUT, LOGSUMEXP, SPLASH)

