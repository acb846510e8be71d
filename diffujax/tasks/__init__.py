"""The paper's evaluation tasks from local files (``diffujax tasks``) and an
lm-evaluation-harness model (``diffujax lm-eval``).

``readers`` (file formats) -> ``formats`` (items, the reference's prompts) -> ``encode`` (token
rows) -> ``engine`` (batched scoring / decoding over the mesh) -> ``metrics`` (scores, standard
errors); ``execution`` runs generated code; ``runner`` ties one task together, ``harness`` is
the lm-eval model. The commands are ``commands/tasks.py`` and ``commands/lm_eval.py``.
"""
