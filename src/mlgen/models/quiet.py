"""Library chatter (weight-loading bars, info logs) kept out of mlgen's output.

Called by the modules that load models, when they are imported: the command line itself starts without torch,
diffusers or transformers, so ``mlgen --help`` and a refused command answer at once.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import huggingface_hub
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
