"""Training: ``diffujax train``'s loop and what it is made of.

The method: ``state`` (the pytree a resumed run needs), ``optim`` (AdamW and its schedule),
``step`` (the compiled training and evaluation steps), ``loop`` (the loop itself), ``evaluation``
(held-out perplexity and samples), ``data`` (the run's pipelines) and ``checkpointing``.
The rest keeps a run going (``lock``, ``run_dir``, ``preemption``, ``resume``, ``startup``),
writes what it reports (``metrics``, ``tb_remote``, ``wandb_log``) or exports its model
(``export``).

Nothing is imported here: each module is imported by its own name.
"""
