"""semivss.inference: whole/sliding-window prediction, evaluation and output writers."""

from semivss.inference.config import EvalConfig
from semivss.inference.evaluate import EvalResult, evaluate, evaluate_items
from semivss.inference.predict import (
    ProbFn,
    ensemble,
    eval_mode,
    input_logits,
    make_prob_fn,
    predict_probs,
)
from semivss.inference.video import iter_source, predict_source
from semivss.inference.writers import (
    Mp4Writer,
    OutputExistsError,
    check_new_output,
    colorize,
    overlay,
    save_label_png,
)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "Mp4Writer",
    "OutputExistsError",
    "ProbFn",
    "check_new_output",
    "colorize",
    "ensemble",
    "eval_mode",
    "evaluate",
    "evaluate_items",
    "input_logits",
    "iter_source",
    "make_prob_fn",
    "overlay",
    "predict_probs",
    "predict_source",
    "save_label_png",
]
