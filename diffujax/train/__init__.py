"""Training: ``diffujax train``'s loop and what it is made of.

The method: ``state`` (the pytree a resumed run needs), ``optim`` (AdamW and its schedule),
``step`` (the compiled training and evaluation steps), ``loop`` (the loop itself), ``evaluation``
(held-out perplexity and samples), ``data`` (the run's pipelines) and ``checkpointing``.
The rest prepares a run (``startup``: restore or initialise; ``resume``: what a resumed run may
change) or exports its model (``export``). The operations that keep a run going and write what it
reports (lock, run directory, preemption, metrics and logging backends) are ``diffujax.runs``.

Nothing is imported here: each module is imported by its own name.
"""
