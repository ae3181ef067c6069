"""`quiet_lightning()`: drop two notices Lightning prints on every run, and nothing else.

- the "💡 Tip: ... install litlogger" line, logged by `pytorch_lightning.utilities.rank_zero` whenever a Trainer
  has no LitLogger: a logging filter on that logger drops that one message;
- torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised from Lightning's own pytree
  helper (pytorch_lightning.utilities._pytree, not from user code): a warnings filter matching that message
  from that module only.
Every other message and warning still shows. Calling it again changes nothing (warnings.filterwarnings
replaces an identical filter; the logging filter is added once). The runner calls it before building the
Trainer; `ProgressBar` calls it too, for plain Lightning code.
"""

from __future__ import annotations

import logging
import warnings

_TIP_LOGGER = "pytorch_lightning.utilities.rank_zero"
_TIP_MARK = "[litlogger](https://pypi.org/project/litlogger/)"


def _not_the_litlogger_tip(record: logging.LogRecord) -> bool:
    return _TIP_MARK not in str(record.msg)


def quiet_lightning() -> None:
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"pytorch_lightning\.utilities\._pytree",
    )
    logger = logging.getLogger(_TIP_LOGGER)
    if _not_the_litlogger_tip not in logger.filters:
        logger.addFilter(_not_the_litlogger_tip)
