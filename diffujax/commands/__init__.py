"""The subcommands of ``diffujax`` (``cli.py``), one module each: the arguments checked, the
library called, the result printed, the exit status returned by its ``run_<command>(args)``.

``convert`` (convert, export, default-model), ``evaluate`` (eval), ``generate``, ``tasks``,
``lm_eval``, ``train``, ``plan``, ``demo``. Their arguments are ``arguments.py``'s (light, for
``--help``); ``api.py`` calls the same checks and work as Python functions.
"""
