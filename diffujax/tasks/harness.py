"""An lm-evaluation-harness model: ``--model diffujax`` (``diffujax lm-eval`` registers it and
hands its arguments to lm-eval's own command line, offline).

    diffujax lm-eval --model diffujax --model_args checkpoint=CKPT,objective=diffusion \\
        --tasks lambada_openai --include_path my_tasks/ --limit 100

``model_args``: keys, defaults and checks in ``tasks.model_args`` (README: Tasks), every one
checked before the model loads. ``loglikelihood`` is the negated T = 32 multiple-choice score
(``score=reference``) or LLaDA's Monte-Carlo estimate (``score=mc``); ``loglikelihood_rolling``
the ELBO's lower bound with ``rolling_draws`` draws of t per window, stratified;
``generate_until`` honours stop sequences and EOS (``steps`` defaults to the tokens to
generate).

With ``objective=ar`` every request is exact causal scoring, so an unadapted model gives the
numbers of lm-eval's own ``hf`` model (tested to 1e-4).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them
    # only while it is empty, and registering ours makes it non-empty)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences
except ModuleNotFoundError as e:  # an optional extra
    raise ModuleNotFoundError(f"{e}: diffujax lm-eval needs lm-evaluation-harness, pip install"
                              " 'diffujax[eval]'") from e

from diffujax.runtime import load_for_inference, layout_from_args
from diffujax.tasks.engine import Engine, Row, by_span_length
from diffujax.tasks.model_args import model_args


def _in_order(rows, compute):
    """``compute`` on ``rows`` longest first (full batches of similar length), its output (an
    array per row, or a tuple of them) back in the order of ``rows``."""
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k].tokens))
    out, back = compute([rows[k] for k in order]), np.argsort(order)
    return tuple(v[back] for v in out) if isinstance(out, tuple) else out[back]


@register_model("diffujax")
class DiffujaxLM(TemplateLM):
    def __init__(self, **values):
        """``values``: the model_args (``tasks.model_args``: keys, defaults, checks)."""
        super().__init__()
        a = model_args(values)  # every key and value checked before the model loads
        mesh = "none" if a["mesh"] is None else a["mesh"]  # lm-eval reads mesh=none as None
        layout = layout_from_args(argparse.Namespace(mesh=mesh, distributed="auto"))
        self.model = load_for_inference(a["checkpoint"], dtype=a["dtype"], layout=layout)
        if a["objective"] == "diffusion":
            self.model.mask_token_id()  # one clear line if the checkpoint has none
        batch = 8 if isinstance(a["batch_size"], str) else a["batch_size"]  # auto / auto:N
        self.engine = Engine(self.model, batch_size=batch, seed=a["seed"])
        self.tokenizer = self.model.tokenizer
        self.args = a
        temp = a["confidence_temperature"]
        self.decoding = dict(sampler=a["sampler"], temperature=float(a["temperature"]),
                             ranking=a["ranking"],
                             confidence_temperature=None if temp is None else float(temp))
        positions = getattr(self.model.config, "max_positions", None) or 2048
        if a["max_length"] is not None and a["max_length"] > positions:
            raise ValueError(f"model_args max_length={a['max_length']}: more than the model's"
                             f" {positions} positions")
        self._max_length = a["max_length"] or positions - 1

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm-eval's own settings (``--batch_size``, ...) under the model_args: a key given in
        both is the model's (lm-eval would pass it twice, a TypeError)."""
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**dict(harness, **arg_dict))

    # --- what TemplateLM needs ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return os.path.basename(str(self.tokenizer))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        if add_special_tokens is None:
            add_special_tokens = self.args["add_bos_token"]
        bos = self.tokenizer.bos_id
        return ([bos] if add_special_tokens and bos is not None else []) + list(
            self.tokenizer.encode(string))

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    # --- scoring ---------------------------------------------------------------------------------

    def _rows(self, pairs):
        """A row per (context, continuation), cut on the left to ``max_length + 1`` tokens."""
        wholes = [(list(ctx) + list(cont))[-(self.max_length + 1):] for ctx, cont in pairs]
        return [Row.make(w[:len(w) - len(cont)], w[len(w) - len(cont):], k)
                for k, (w, (_, cont)) in enumerate(zip(wholes, pairs))]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = self._rows([(ctx, cont) for _, ctx, cont in requests])
        if not rows:
            return []
        if self.args["objective"] == "ar":
            sums, _, greedy = _in_order(rows, self.engine.ar_logprob)
            return [(float(s), bool(g)) for s, g in zip(sums, greedy)]
        a, engine = self.args, self.engine
        values = _in_order(rows, lambda r: engine.diffusion_score(r, num_levels=a["levels"])
                           if a["score"] == "reference" else
                           engine.conditional_nll(r, num_draws=a["mc_num"]))
        greedy = _in_order(rows, self.engine.diffusion_greedy)
        return [(-float(v), bool(g)) for v, g in zip(values, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """AR: the exact log-likelihood over lm-eval's disjoint rolling windows. Diffusion: the
        sum over windows of the negative ELBO's negation (``rolling_draws`` draws of t per
        window): a lower bound on each document's log-likelihood."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            for context, target in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(string),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
                windows.append((context, target))
                owner.append(k)
        rows = self._rows(windows)
        if not rows:
            values = []
        elif self.args["objective"] == "ar":
            values = _in_order(rows, self.engine.ar_logprob)[0]
        else:
            values = -_in_order(rows, lambda r: self.engine.conditional_elbo(
                r, num_draws=self.args["rolling_draws"]))[0]
        totals = [0.0] * len(requests)
        for k, v in zip(owner, values):
            totals[k] += float(v)
        return totals

    # --- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False):
        eos_text = self.tok_decode([self.eot_token_id])
        rows, stops = [], []
        for k, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            stops.append(handle_stop_sequences(gen_kwargs.pop("until", None), eos=eos_text))
            count = int(gen_kwargs.pop("max_gen_toks", self.args["max_gen_toks"]))
            ids = self.tok_encode(context) or [self.prefix_token_id]
            rows.append(Row.make(ids[-max(1, self.max_length - count):], [0] * count, k))
        if self.args["objective"] == "ar":
            spans = by_span_length(rows, lambda group, n: self.engine.ar_decode(group))
        else:
            spans = by_span_length(rows, lambda group, n: self.engine.diffusion_decode(
                group, steps=self.args["steps"] or n, **self.decoding))
        texts = []
        for span, until in zip(spans, stops):
            text = self.tokenizer.decode_generated(span)  # cut before the first EOS
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts
