"""alignkit.eval: held-out evaluation of policy stages, and aligned-vs-base comparison.

- :func:`evaluate_policy` (:mod:`.heldout`): what every policy stage records after training;
- :class:`AdapterView` (from the core, :mod:`alignkit.handoff`): a model with a chosen adapter
  active (policy, reference);
- :func:`sequence_logprobs` (:mod:`.logprobs`): the log-prob scorer behind KL and NLL;
- :func:`~alignkit.eval.compare.run_compare` (:mod:`.compare`): ``alignkit compare`` and the
  ``eval`` stage: rewards, win rates with CIs, KL, lengths, NLL, BLEU/ROUGE-L, a report.
"""

from alignkit.eval.heldout import evaluate_policy
from alignkit.eval.logprobs import sequence_logprobs
from alignkit.handoff import AdapterView

__all__ = ["AdapterView", "evaluate_policy", "sequence_logprobs"]
