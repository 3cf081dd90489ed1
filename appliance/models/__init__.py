"""The model repository as an operator manages it: list, pack, import, remove (``inferbox models``).

A package moves from the box that exported it to the box that serves it as one tar
(:mod:`.archive`); import checks it against the publisher's key and signs it for this box
(:mod:`.importing`); removal takes a version out in one step (:mod:`.removing`); the
listing says, per version, whether the server would load it and who signed it
(:mod:`.listing`).  Import and removal are recorded in the audit log by the CLI
(``model_import``, ``model_remove``), as is packing (``model_pack``: the weights leave the box).
"""
