"""Recipe search: a space of recipes (``space``), optimisers over it (``optimizers``), candidates merged in memory
(``in_memory``) and scored (``fitness``), run locally or on Ray (``runner``)."""
