"""The data stage: corpora (:mod:`.corpus`, :mod:`.wikidump`), the token stream (:mod:`.prepare`,
:mod:`.loader`), MLM masking (:mod:`.mlm`) and the finetuning tasks (:mod:`.glue`, :mod:`.pairs`,
:mod:`.task_data`). :class:`CorpusError` is shared by the corpus readers."""


class CorpusError(ValueError):
    """The corpus cannot be read: wrong format, corrupt file, empty after filtering, unreachable hub."""
