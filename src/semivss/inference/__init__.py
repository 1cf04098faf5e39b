"""semivss.inference: whole/sliding-window prediction with TTA and ensembles, evaluation,
pseudo-labelling and output writers."""

from semivss.inference.config import EvalConfig
from semivss.inference.evaluate import EvalResult, evaluate, evaluate_items
from semivss.inference.predict import (
    Member,
    Predictor,
    ProbFn,
    as_predictor,
    ensemble,
    eval_mode,
    input_logits,
    make_prob_fn,
    normalise_weights,
    predict_probs,
)
# The function ``pseudo_label`` is deliberately not re-exported: it would shadow its module
# ``semivss.inference.pseudo_label`` (import it from there).
from semivss.inference.pseudo_label import make_manifest, read_pseudo_label, shard_frames
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
    "Member",
    "Mp4Writer",
    "OutputExistsError",
    "Predictor",
    "ProbFn",
    "as_predictor",
    "check_new_output",
    "colorize",
    "ensemble",
    "eval_mode",
    "evaluate",
    "evaluate_items",
    "input_logits",
    "iter_source",
    "make_manifest",
    "make_prob_fn",
    "normalise_weights",
    "overlay",
    "predict_probs",
    "predict_source",
    "read_pseudo_label",
    "save_label_png",
    "shard_frames",
]
