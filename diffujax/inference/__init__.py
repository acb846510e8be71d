"""A loaded model (``runtime.LoadedModel``) put to work: ``perplexity`` (AR perplexity and the
diffusion ELBO bound of a text) and ``generation`` (the samplers over a canvas, the cached
decoders). The commands, the task harness and the demo share them."""
